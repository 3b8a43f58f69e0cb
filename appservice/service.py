"""The running service: the one place that builds every part and hands each its collaborators.

Start order matters: the instance lock and migrations first (nothing may run on
an old schema or beside a twin), then the HTTP server (Synapse may already be
waiting to deliver), then — once the homeserver answers — the workers, which
resume whatever a previous run left unfinished, and a catch-up of every watched
room. The homeserver may be down: the service still serves and keeps trying in
the background, and /health says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from typing import Any

from aiohttp import web

from appservice.config import Config, check_runnable
from appservice.crypto import BotCrypto
from appservice.database import (
    HEALTH_BUSY_TIMEOUT_MS,
    InstanceLock,
    create_engine,
    upgrade,
)
from appservice.digest_key import load_digest_key
from appservice.health import HealthChecks
from appservice.homeserver import NioHomeserver
from appservice.registration import load_registration
from appservice.server import AppServiceServer
from appservice.webhook import HttpWebhook
from bot.checkin_events import CheckinEvents
from bot.delivery import OutboxDelivery
from bot.deployment import Deployment
from bot.dispatch import Classifier, Dispatcher, EventKind
from bot.engine import StepEngine
from bot.intake import FLAG_LANE, OTHER_LANE, ActionFilter, Intake
from bot.membership import Membership
from bot.metrics import Metrics
from bot.ports import HomeserverUnavailable, Refused
from bot.ready_rooms import REFILL_AFTER_SECONDS, ReadyRooms
from bot.recent_senders import RecentSenders
from bot.reconcile import Reconciler
from bot.referral import Referral
from bot.relay import Relay
from bot.reports import RefusalReports
from bot.retention import purge
from bot.room_admin import RoomAdmin
from bot.room_state import RoomStateCache
from bot.rooms import RoomDirectory
from bot.staff import StaffDirectory
from bot.staff_room import StaffRoom
from bot.staff_tools import StaffTools
from bot.steps import Toolbox, build_steps
from bot.store import audit, cases, ingest, outbox, rooms
from bot.store.audit import Provenance
from bot.texts import Texts
from bot.timers import Timers
from bot.worker import Worker

log = logging.getLogger(__name__)
# Retrying the staff room backs off to this (seconds); /health shows the problem meanwhile.
STAFF_ROOM_RETRY_MAX = 60.0
HOUSEKEEPING_EVERY = dt.timedelta(hours=1)
CHAIN_HEAD_EVERY = dt.timedelta(days=1)
# How often the homeserver is probed, so catch-up starts as soon as it answers again.
PROBE_SECONDS = 5.0
# How often refusal windows that have ended are reported (each window is
# policy.refusal_report_every long).
REFUSAL_FLUSH_EVERY = dt.timedelta(seconds=30)
# How often rooms made ahead are tried again after the homeserver would not make one.
READY_ROOMS_POLL_SECONDS = 60.0


class Service:
    def __init__(self, config: Config, *, connect_retry_seconds: float = 5.0) -> None:
        check_runnable(config)
        self.config = config
        self.registration = load_registration(config.registration_path)
        self.metrics = Metrics()
        self.deployment = Deployment(
            policy=config.policy,
            checkin=config.checkin,
            messages=config.messages,
            resources=tuple(config.resources),
            bot_user_id=config.bot_user_id,
            provenance=Provenance(
                config.policy.policy_version,
                config.config_hash,
                digest_key=load_digest_key(config, create=True) or b"",
            ),
            extra_inviters=config.allowed_inviters,
            reconcile=config.file.reconcile,
            encrypt_private_rooms=config.file.encryption.enabled
            and config.file.encryption.private_rooms
            and self.registration.lets_the_bot_sync(config),
        )
        assert config.policy.staff_room is not None  # check_runnable
        self._connect_retry = connect_retry_seconds
        self._lock = InstanceLock(config.database_url)
        self.engine = create_engine(config.database_url)
        # /health writes through its own connection, which gives up in seconds when locked.
        self._health_engine = create_engine(
            config.database_url, busy_timeout_ms=HEALTH_BUSY_TIMEOUT_MS
        )
        for warning in self.registration.warnings(config):
            log.warning("%s: %s", config.registration_path, warning)
        self.homeserver = NioHomeserver(
            config.homeserver.url,
            self.registration.as_token,
            config.bot_user_id,
            on_rate_limited=self.metrics.rate_limited.inc,
            domain=config.homeserver.domain,
            room_aliases=self.registration.reserves_aliases(config),
        )
        # End-to-end encryption needs the bot to be a namespace user, not the sender.
        self.crypto: BotCrypto | None = None
        if config.file.encryption.enabled and self.registration.lets_the_bot_sync(config):
            self.crypto = BotCrypto(
                config.homeserver.url,
                self.registration.as_token,
                config.bot_user_id,
                config.crypto_store,
                display_name=config.appservice.bot_displayname,
                on_room_key=self._room_key_arrived,
            )
            self.homeserver.crypto = self.crypto
        self.connected = asyncio.Event()
        self.stopped = asyncio.Event()  # set when the service stops itself (a fatal fault)
        self.fatal: str | None = None
        self._runner: web.AppRunner | None = None
        self._background: list[asyncio.Task[Any]] = []
        self._staff_room_news = asyncio.Event()
        self._fallbacks: set[asyncio.Task[None]] = set()

        # ---- who and where ----
        self.staff_room = StaffRoom(config.policy.staff_room, self.engine)
        self.rooms = RoomDirectory(self.staff_room)
        self.staff = StaffDirectory(self.homeserver, config.policy, self.staff_room)
        # Filled by the intake, read by the referral: who sent each recent event.
        self.recent_senders = RecentSenders()
        self.room_state = RoomStateCache(self.homeserver)
        self.texts = Texts(self.deployment, on_fallback=self._template_fell_back)
        webhook = HttpWebhook()

        # ---- the workers ----
        self.outbox = OutboxDelivery(self.engine, self.homeserver)
        self.outbox_worker = Worker("outbox", self.outbox.work_once)
        self.ready_rooms = ReadyRooms(
            self.engine,
            self.homeserver,
            self.rooms,
            wanted=config.policy.ready_dm_rooms,
            encrypted=self.deployment.encrypt_private_rooms,
        )
        self.ready_rooms_worker = Worker(
            "ready-rooms",
            self.ready_rooms.work_once,
            poll_interval=READY_ROOMS_POLL_SECONDS,
            gather_for=REFILL_AFTER_SECONDS,
        )
        self.ready_rooms.on_taken = self.ready_rooms_worker.wake
        tools = Toolbox(
            db=self.engine,
            homeserver=self.homeserver,
            deployment=self.deployment,
            texts=self.texts,
            staff_room=self.staff_room,
            rooms=self.rooms,
            metrics=self.metrics,
            webhook=webhook,
            ready_rooms=self.ready_rooms,
        )
        self.steps = StepEngine(self.engine, build_steps(tools), tools)
        self.steps.on_outbox = self.outbox_worker.wake

        # ---- the inbox ----
        on_outbox = self.outbox_worker.wake
        self.refusal_reports = RefusalReports(
            self.engine,
            self.staff_room,
            config.policy.refusal_report_every,
            texts=self.texts,
            on_outbox=on_outbox,
        )
        referral = Referral(
            self.homeserver,
            self.deployment,
            self.staff,
            self.staff_room,
            self.metrics,
            room_state=self.room_state,
            reports=self.refusal_reports,
            texts=self.texts,
            on_case=self.steps.start_case,
            on_outbox=on_outbox,
            senders=self.recent_senders,
            watch_member=self.rooms.watch_member,
        )

        async def may_invite(user_id: str) -> bool:
            return await self.staff.may_invite_bot(user_id, self.deployment.extra_inviters)

        self.membership = Membership(
            self.engine,
            self.homeserver,
            self.deployment,
            self.staff_room,
            self.rooms,
            may_invite=may_invite,
            room_state=self.room_state,
            reports=self.refusal_reports,
            texts=self.texts,
            on_outbox=on_outbox,
            on_staff_room_joined=self._staff_room_news.set,
            on_case=self.steps.start_case,
        )
        checkins = CheckinEvents(
            self.engine,
            self.homeserver,
            self.deployment,
            self.staff_room,
            is_staff=self.staff.is_staff,
            on_outbox=on_outbox,
        )
        self.staff_tools = StaffTools(
            self.engine,
            self.deployment,
            self.staff_room,
            is_staff=self.staff.is_staff,
            checkins=checkins,
            room_admin=RoomAdmin(self.engine, self.homeserver, self.deployment, self.room_state),
            on_outbox=on_outbox,
            on_case_changed=self.steps.start_case,
        )
        relay = Relay(
            self.engine,
            self.deployment,
            self.staff_room,
            self.rooms,
            texts=self.texts,
            on_outbox=on_outbox,
        )
        self.dispatcher = Dispatcher(
            self.engine,
            self.homeserver,
            Classifier(self.rooms, config.bot_user_id),
            {
                EventKind.FLAG: referral,
                EventKind.BOT_MEMBERSHIP: self.membership.bot_membership,
                EventKind.MEMBERSHIP: self.membership.member_event,
                EventKind.CHECKIN_MEMBERSHIP: checkins.membership,
                EventKind.POWER_LEVELS: self.membership.power_levels_changed,
                EventKind.STAFF_MESSAGE: self.staff_tools.message,
                EventKind.STAFF_REACTION: self.staff_tools.reaction,
                EventKind.MEMBER_MESSAGE: relay,
            },
            deployment=self.deployment,
            staff_room=self.staff_room,
            metrics=self.metrics,
            texts=self.texts,
            on_outbox=on_outbox,
            reports=self.refusal_reports,
            decrypter=self.crypto,
        )
        self.flag_worker = Worker("flags", lambda: self.dispatcher.work_lane(FLAG_LANE))
        # Flags are worked the moment they arrive; everything else in small batches.
        self.inbox_worker = Worker(
            "inbox", lambda: self.dispatcher.work_lane(OTHER_LANE), gather_for=0.1
        )
        self._workers = (
            self.flag_worker,
            self.inbox_worker,
            self.outbox_worker,
            self.ready_rooms_worker,
        )
        self.intake = Intake(
            self.engine,
            ActionFilter(
                config.policy,
                self.rooms,
                bot_user_id=config.bot_user_id,
                can_decrypt=self.crypto is not None,
            ),
            self.metrics,
            on_queued=self._wake_lane,
            on_state=self.room_state.state_changed,
            senders=self.recent_senders,
        )
        self.reconciler = Reconciler(
            self.engine,
            self.homeserver,
            self.intake,
            self._watched_rooms,
            self.deployment.reconcile,
        )
        self.timers = Timers()
        self.health = HealthChecks(
            self.engine,
            self._health_engine,
            self.homeserver,
            self.staff_room,
            self.intake,
            self.metrics,
            connected=self.connected.is_set,
            crypto=self.crypto,
            encryption_problem=self.registration.encryption_problem(config),
            extra={"ready_dm_rooms": self._ready_rooms_status},
        )
        self.port: int | None = None

    # ---- start ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self._lock.acquire()
        try:
            await upgrade(self.engine)
            self._lock.watch(self._lock_lost)
            await self.staff_room.load_pin()
            await self._load_rooms()
            for resource in self.config.stale_resources():
                log.warning(
                    "crisis resource %r was last verified on %s: check it is still right",
                    resource.name,
                    resource.verified_on,
                )
            server = AppServiceServer(
                self.intake,
                self.registration.hs_token,
                self.metrics,
                self.health.report,
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
        except BaseException:
            await self.stop()
            raise

    async def _load_rooms(self) -> None:
        """What the hot path must know of rooms before the first transaction."""
        async with self.engine.connect() as conn:
            known = await cases.rooms_of_cases(conn)
        self.rooms.know(watched=known.watched, dms=known.dms, checkins=known.checkins)
        await self.ready_rooms.load()

    async def _connect(self) -> None:
        """Register the bot and ping, retrying until the homeserver answers; then the rest."""
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
        # A twin whose lock connection just dropped must have stopped before we act.
        await asyncio.sleep(self._lock.settle_seconds)
        if self.crypto is not None:
            self._background.append(asyncio.create_task(self._start_crypto(), name="crypto"))
        await self._join_staff_room()
        for worker in self._workers:
            worker.start()
        self.steps.start()
        self.timers.start()
        now = dt.datetime.now(dt.UTC)
        self.timers.every("housekeeping", HOUSEKEEPING_EVERY, self.housekeeping, first=now)
        self.timers.every("post-chain-head", CHAIN_HEAD_EVERY, self.staff_tools.post_chain_head)
        self.timers.every("refusal-reports", REFUSAL_FLUSH_EVERY, self.refusal_reports.flush)
        await self._warm_room_state()
        self.reconciler.start()
        self._background.append(asyncio.create_task(self._probe(), name="probe"))
        self.connected.set()
        log.info("connected to the homeserver as %s", self.config.bot_user_id)

    async def _start_crypto(self) -> None:
        """The bot's device and keys; retried until the homeserver lets it (messages for
        encrypted rooms wait meanwhile: never sent in the clear)."""
        assert self.crypto is not None
        delay = self._connect_retry
        while True:
            try:
                await self.crypto.start()
                return
            except Exception as exc:
                self.crypto.problem = f"encryption is not ready: {type(exc).__name__}: {exc}"
                log.warning("%s; retrying in %.0fs", self.crypto.problem, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    def _room_key_arrived(self) -> None:
        """A room key came: encrypted events waiting for one are worth trying again now."""
        task = asyncio.get_running_loop().create_task(self._retry_encrypted())
        self._fallbacks.add(task)
        task.add_done_callback(self._fallbacks.discard)

    async def _retry_encrypted(self) -> None:
        try:
            async with self.engine.begin() as conn:
                await ingest.retry_encrypted_now(conn)
        except Exception:
            log.warning("could not bring encrypted events forward", exc_info=True)
        self.flag_worker.wake()
        self.inbox_worker.wake()

    async def _probe(self) -> None:
        """Watch the homeserver: when it answers again after an outage, catch up at once."""
        was_down = False
        while True:
            await asyncio.sleep(PROBE_SECONDS)
            down = await self.homeserver.check() is not None
            if down and not was_down:
                # What we knew of rooms may have changed meanwhile, unseen.
                self.room_state.forget_everything()
            if was_down and not down:
                log.info("the homeserver answers again: catching up")
                self.reconciler.trigger()
                await self._warm_room_state()
                await self.steps.retry_waiting()
                self.outbox_worker.wake()
            was_down = down

    async def _warm_room_state(self) -> None:
        """Know what a flag's decision needs ahead of the first flag (read off any flag's
        path): each moderated room's state, the staff room's, the bot's m.direct."""
        async with self.engine.connect() as conn:
            for room in await rooms.moderated(conn):
                self.room_state.warm(room.room_id)
        if self.staff_room.room_id is not None:
            self.room_state.warm(self.staff_room.room_id)
        with contextlib.suppress(HomeserverUnavailable):
            await self.homeserver.direct_rooms()

    async def _ready_rooms_status(self) -> dict[str, Any]:
        return self.ready_rooms.status()

    def _wake_lane(self, lane: int) -> None:
        (self.flag_worker if lane == FLAG_LANE else self.inbox_worker).wake()

    async def _watched_rooms(self) -> list[tuple[str, dt.datetime | None]]:
        """Rooms whose events we must not miss: moderated, staff, open cases' private rooms."""
        async with self.engine.connect() as conn:
            moderated = await rooms.moderated(conn)
            private = await cases.open_private_rooms(conn)
        watched: list[tuple[str, dt.datetime | None]] = [
            (room.room_id, room.joined_at) for room in moderated
        ]
        if self.staff_room.room_id:
            watched.append((self.staff_room.room_id, None))
        watched.extend((room_id, None) for room_id in sorted(private))
        return watched

    async def _join_staff_room(self) -> None:
        """Try once now; if the room is not ready, keep trying in the background.

        Whatever is for staff waits for the room (see bot.staff_room) rather than being
        dropped, so an alias created or an invite sent after the service started is enough.
        """
        try:
            problem = await self.staff_room.connect(self.homeserver)
        except HomeserverUnavailable as exc:
            problem = f"the homeserver is not reachable ({exc})"
        if problem is not None:
            log.error("%s; staff messages wait until it is fixed", problem)
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
                now = await self.staff_room.connect(self.homeserver)
            except HomeserverUnavailable as exc:
                log.warning("staff room: homeserver not reachable (%s); retrying", exc)
                continue
            if now is not None and now != problem:
                log.error("%s; staff messages wait until it is fixed", now)
            problem = now
        log.info("joined the staff room %s", self.staff_room.room_id)
        if self.staff_room.room_id is not None:
            self.room_state.warm(self.staff_room.room_id)
        await self.steps.retry_waiting()
        self.outbox_worker.wake()

    # ---- timed jobs --------------------------------------------------------------------

    async def housekeeping(self) -> None:
        """Hourly: forget old delivery bookkeeping, apply audit retention, refresh gauges."""
        retention = dt.timedelta(days=self.config.file.database.dedupe_retention_days)
        async with self.engine.begin() as conn:
            await ingest.prune(conn, dt.datetime.now(dt.UTC) - retention)
        purged = await purge(
            self.engine, self.deployment.provenance, self.config.audit.retention_days
        )
        if purged.cases:
            log.info("retention purged %d case(s)", purged.cases)
        await self._refresh_metrics()

    async def _refresh_metrics(self) -> None:
        """Gauges that live in the database are read when Prometheus scrapes."""
        await self.health.checkins()
        async with self.engine.connect() as conn:
            self.metrics.inbox_backlog.set(await ingest.backlog(conn))
            self.metrics.audit_entries.set((await audit.head(conn))[0])

    # ---- faults ----------------------------------------------------------------------------

    def _template_fell_back(self, name: str, problem: str) -> None:
        """A template failed at run time: record it and tell staff (once per template)."""
        task = asyncio.get_running_loop().create_task(self._report_fallback(name, problem))
        self._fallbacks.add(task)
        task.add_done_callback(self._fallbacks.discard)

    async def _report_fallback(self, name: str, problem: str) -> None:
        now = dt.datetime.now(dt.UTC)
        try:
            async with self.engine.begin() as conn:
                await audit.append(
                    conn,
                    self.deployment.provenance,
                    "template_fallback",
                    facts={"template": name, "problem": problem},
                    at=now,
                )
                await outbox.queue(
                    conn,
                    self.staff_room.address,
                    self.texts.template_fallback(name=name, problem=problem),
                    now,
                )
        except Exception:
            log.exception("could not record the fall-back of messages.%s", name)
        self.outbox_worker.wake()

    def _lock_lost(self, why: str) -> None:
        """Another instance could start now: stop before it can act (exit non-zero)."""
        log.critical("%s: stopping so that no second instance acts beside this one", why)
        self.fatal = why
        self.stopped.set()

    # ---- stop --------------------------------------------------------------------------------

    async def stop(self) -> None:
        await self.reconciler.stop()
        await asyncio.gather(*(worker.stop() for worker in self._workers))
        await self.steps.stop()
        await self.timers.stop()
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._background.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.room_state.close()
        if self.crypto is not None:
            await self.crypto.close()
        await self.homeserver.close()
        await self.intake.close()
        await self.engine.dispose()
        await self._health_engine.dispose()
        await self._lock.release()

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
