"""The running service: one place that wires config, database, homeserver, policy and HTTP.

Start order matters: the instance lock and migrations first (nothing may run on
an old schema or beside a twin), then the HTTP server (Synapse may already be
waiting to deliver), then the workers, which resume whatever a previous run
left unfinished. The homeserver may be down: the service still serves and keeps
trying in the background, and /health says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from dataclasses import asdict
from typing import Any

from aiohttp import web

from appservice.config import Config, check_runnable
from appservice.database import InstanceLock, create_engine, ping, upgrade
from appservice.homeserver import NioHomeserver
from appservice.registration import load_registration
from appservice.server import AppServiceServer
from appservice.webhook import HttpWebhook
from bot.checkin import CheckinScheduler
from bot.context import PolicyContext
from bot.delivery import OutboxDelivery
from bot.dispatch import Dispatcher
from bot.intake import Intake
from bot.metrics import Metrics
from bot.ports import HomeserverUnavailable, Refused
from bot.retention import purge
from bot.staff_room import connect_staff_room, staff_room_problem
from bot.staff_tools import StaffTools
from bot.store import audit, cases, ingest
from bot.store.audit import Provenance
from bot.timers import Timers
from bot.worker import Worker
from bot.workflow import CaseWorkflow

log = logging.getLogger(__name__)
# A check-in this far past its due time and still not open is reported as overdue.
OVERDUE_GRACE = dt.timedelta(minutes=5)
# Retrying the staff room backs off to this (seconds); /health shows the problem meanwhile.
STAFF_ROOM_RETRY_MAX = 60.0


class Service:
    def __init__(self, config: Config, *, connect_retry_seconds: float = 5.0) -> None:
        check_runnable(config)
        self.config = config
        self.registration = load_registration(config.registration_path)
        self.metrics = Metrics()
        self.context = PolicyContext(
            policy=config.policy,
            checkin=config.checkin,
            messages=config.messages,
            resources=list(config.resources),
            bot_user_id=config.bot_user_id,
            provenance=Provenance(config.policy.policy_version, config.config_hash),
            may_invite=config.may_invite,
            metrics=self.metrics,
        )
        self._connect_retry = connect_retry_seconds
        self._lock = InstanceLock(config.database_url)
        self.engine = create_engine(config.database_url)
        self.homeserver = NioHomeserver(
            config.homeserver.url,
            self.registration.as_token,
            config.bot_user_id,
            on_rate_limited=self.metrics.rate_limited.inc,
        )
        self.connected = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._background: list[asyncio.Task[Any]] = []
        self.workflow = CaseWorkflow(self.engine, self.homeserver, self.context)
        self.outbox = OutboxDelivery(self.engine, self.homeserver, self.context)
        self.case_worker = Worker("cases", self.workflow.work_once)
        self.outbox_worker = Worker("outbox", self.outbox.work_once)
        self.dispatcher = Dispatcher(
            self.engine,
            self.homeserver,
            self.context,
            on_case=self.workflow.start_case,
            on_outbox=self.outbox_worker.wake,
        )
        self.inbox_worker = Worker("inbox", self.dispatcher.work_once)
        self.timers = Timers()
        self.checkins = CheckinScheduler(
            self.engine,
            self.homeserver,
            self.context,
            is_staff=self.dispatcher.referral.is_staff,
            timers=self.timers,
        )
        self.staff_tools = StaffTools(
            self.engine,
            self.context,
            is_staff=self.dispatcher.referral.is_staff,
            checkins=self.checkins,
            timers=self.timers,
            webhook=HttpWebhook(),
            on_outbox=self.outbox_worker.wake,
        )
        self.workflow.on_scheduled = self.checkins.schedule_case
        self.workflow.on_alerted = self.staff_tools.watch_alert
        self._staff_room_news = asyncio.Event()
        self.dispatcher.membership.on_staff_room_joined = self._staff_room_news.set
        self.dispatcher.extra_handlers += [
            self.staff_tools.handle_event,
            self.checkins.handle_event,
        ]
        self.intake = Intake(self.engine, self.context, on_queued=self.inbox_worker.wake)
        self.port: int | None = None

    async def start(self) -> None:
        await self._lock.acquire()
        try:
            await upgrade(self.engine)
            await self._load_watched_rooms()
            stale = self.config.stale_resources()
            for resource in stale:
                log.warning(
                    "crisis resource %r was last verified on %s: check it is still right",
                    resource.name,
                    resource.verified_on,
                )
            server = AppServiceServer(
                self.intake,
                self.registration.hs_token,
                self.metrics,
                {
                    "database": self._check_database,
                    "homeserver": self._check_homeserver,
                    "checkins": self._check_checkins,
                    "staff_room": self._check_staff_room,
                },
                refresh_metrics=self._refresh_metrics,
            )
            self._runner = web.AppRunner(server.app(), access_log=None)
            await self._runner.setup()
            listen = self.config.appservice.listen
            site = web.TCPSite(self._runner, listen.host, listen.port)
            await site.start()
            sockets = getattr(site._server, "sockets", None) or []
            self.port = sockets[0].getsockname()[1] if sockets else listen.port
            log.info("listening on %s:%s", listen.host, self.port)
            self._background.append(asyncio.create_task(self._connect(), name="connect"))
            self._background.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
        except BaseException:
            await self.stop()
            raise

    async def _load_watched_rooms(self) -> None:
        staff_room = self.config.policy.staff_room
        if staff_room and staff_room.startswith("!"):
            self.context.staff_room_id = staff_room
            self.context.watch(staff_room)
        async with self.engine.connect() as conn:
            for room_id in await cases.dm_room_ids(conn):
                self.context.watch(room_id)

    async def _connect(self) -> None:
        """Register the bot and ping, retrying until the homeserver answers; then the staff room."""
        while True:
            try:
                await self.homeserver.ensure_registered(self.config.appservice.bot_displayname)
                pong = await self.homeserver.ping(self.config.appservice.id)
                if isinstance(pong, Refused):
                    log.warning("homeserver ping refused: %s", pong)
                break
            except HomeserverUnavailable as exc:
                log.warning("homeserver not reachable yet (%s); retrying", exc)
                await asyncio.sleep(self._connect_retry)
        await self._join_staff_room()
        for worker in (self.inbox_worker, self.case_worker, self.outbox_worker):
            worker.start()
        pending = await self.checkins.start()
        await self.staff_tools.start()
        log.info("%d check-in(s) scheduled", pending)
        self.connected.set()
        log.info("connected to the homeserver as %s", self.config.bot_user_id)

    async def _join_staff_room(self) -> None:
        """Try once now; if the room is not ready, keep trying in the background.

        Staff alerts wait for the room (see bot.staff_room) rather than being dropped,
        so an alias created or an invite sent after the service started is enough.
        """
        try:
            problem = await connect_staff_room(self.homeserver, self.context)
        except HomeserverUnavailable as exc:
            problem = f"the homeserver is not reachable ({exc})"
        if problem is not None:
            log.error("%s; staff alerts wait until it is fixed", problem)
            self._background.append(
                asyncio.create_task(self._keep_joining_staff_room(problem), name="staff-room")
            )

    async def _keep_joining_staff_room(self, problem: str) -> None:
        delay = self._connect_retry
        while problem is not None:
            # An invite to the staff room cuts the wait short.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._staff_room_news.wait(), delay)
            self._staff_room_news.clear()
            delay = min(delay * 2, STAFF_ROOM_RETRY_MAX)
            try:
                now = await connect_staff_room(self.homeserver, self.context)
            except HomeserverUnavailable as exc:
                log.warning("staff room: homeserver not reachable (%s); retrying", exc)
                continue
            if now is not None and now != problem:
                log.error("%s; staff alerts wait until it is fixed", now)
            problem = now
        log.info("joined the staff room %s", self.context.staff_room_id)
        await self.workflow.retry_deferred()
        self.outbox_worker.wake()

    async def _housekeeping(self) -> None:
        """Hourly: forget old delivery bookkeeping, apply audit retention, refresh gauges."""
        retention = dt.timedelta(days=self.config.file.database.dedupe_retention_days)
        while True:
            try:
                async with self.engine.begin() as conn:
                    await ingest.prune(conn, dt.datetime.now(dt.UTC) - retention)
                    self.metrics.inbox_backlog.set(await ingest.backlog(conn))
                purged = await purge(
                    self.engine, self.context.provenance, self.config.audit.retention_days
                )
                if purged.cases:
                    log.info("retention purged %d case(s)", purged.cases)
                await self._check_checkins()
            except Exception:
                log.exception("housekeeping failed")
            await asyncio.sleep(3600)

    async def _check_database(self) -> dict[str, Any]:
        await ping(self.engine)
        async with self.engine.connect() as conn:
            backlog = await ingest.backlog(conn)
        self.metrics.inbox_backlog.set(backlog)
        return {"ok": True, "inbox_backlog": backlog}

    async def _check_checkins(self) -> dict[str, Any]:
        """Overdue check-ins make the service unhealthy: a promise to a member is slipping."""
        async with self.engine.connect() as conn:
            counts = await cases.checkin_counts(conn, dt.datetime.now(dt.UTC), OVERDUE_GRACE)
        for state in ("pending", "overdue", "unclaimed"):
            self.metrics.checkins.labels(state).set(getattr(counts, state))
        return {"ok": counts.overdue == 0, **asdict(counts)}

    async def _refresh_metrics(self) -> None:
        """Gauges that live in the database are read when Prometheus scrapes."""
        await self._check_checkins()
        async with self.engine.connect() as conn:
            self.metrics.inbox_backlog.set(await ingest.backlog(conn))
            self.metrics.audit_entries.set((await audit.head(conn))[0])

    async def _check_homeserver(self) -> dict[str, Any]:
        reachable = await self.homeserver.versions()
        return {"ok": reachable, "connected": self.connected.is_set()}

    async def _check_staff_room(self) -> dict[str, Any]:
        problem = await staff_room_problem(self.homeserver, self.context)
        return {"ok": problem is None, "room": self.context.staff_room_id} | (
            {"problem": problem} if problem else {}
        )

    async def stop(self) -> None:
        await asyncio.gather(
            *(w.stop() for w in (self.inbox_worker, self.case_worker, self.outbox_worker))
        )
        await self.timers.stop()
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._background.clear()
        await self.workflow.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.homeserver.close()
        await self.engine.dispose()
        await self._lock.release()

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
