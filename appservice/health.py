"""GET /health: the truth about whether the service can keep its promises, within seconds.

503 is for faults an operator must act on — the database cannot record, the
homeserver is unreachable or rejects our token, the staff room cannot take
messages, a check-in is overdue, an alert or a staff message could not be
delivered — never for work in progress (starting up, catching up).

Each check runs as a task of its own and is waited for at most CHECK_SECONDS:
a check stuck behind a locked database answers "timed out" instead of holding
the whole answer (the stuck task is left to finish, and reused meanwhile, so
checks never pile up). Every check costs the same however many cases there are.

A report is reused for REPORT_FRESH_SECONDS (callers meanwhile share it), and the
heartbeat write is made at most every HEARTBEAT_SECONDS while it succeeds: polling
/health however often costs the database and homeserver no more than that.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from appservice.database import write_heartbeat
from appservice.homeserver import NioHomeserver
from bot.core.metrics import Metrics
from bot.intake.accept import FLAG_LANE, LANES, Intake
from bot.rooms.staff_room import StaffRoom, StaffRooms
from bot.store import cases, ingest, outbox

CHECK_SECONDS = 5.0
REPORT_FRESH_SECONDS = 2.0
# A heartbeat written this recently still proves the database records; one that failed
# is tried again at the next report, to see the database mended at once.
HEARTBEAT_SECONDS = 10.0
# A check-in this far past its due time and still not open is reported as overdue.
OVERDUE_GRACE = dt.timedelta(minutes=5)
# Staff messages given up on within this window keep /health at 503.
FAILED_MESSAGE_WINDOW = dt.timedelta(hours=24)
# A transaction that could not be recorded keeps /health at 503 this long (or until the
# next one is recorded): a small heartbeat can succeed where a real write fails.
FAILED_WRITE_WINDOW = dt.timedelta(minutes=5)
# A flag still waiting this long after it arrived means the flag lane is stalled.
FLAG_LANE_STALLED_AFTER = dt.timedelta(seconds=30)
Check = Callable[[], Awaitable[dict[str, Any]]]


class HealthChecks:
    def __init__(
        self,
        db: AsyncEngine,
        health_db: AsyncEngine,
        homeserver: NioHomeserver,
        staff_room: StaffRoom | StaffRooms,
        intake: Intake,
        metrics: Metrics,
        *,
        connected: Callable[[], bool],
        crypto: Any = None,
        encryption_problem: str | None = None,
        alert_deadline: dt.timedelta = dt.timedelta(seconds=30),
        staff_room_warning: Callable[[], str | None] = lambda: None,
        extra: Mapping[str, Check] | None = None,
    ) -> None:
        self._alert_deadline = alert_deadline
        # Something about the staff room an operator should know that stops nothing.
        self._staff_room_warning = staff_room_warning
        self._crypto = crypto
        # Asked for but impossible (an older registration): encrypted commands would go
        # unread, so /health says so until an operator fixes it or turns encryption off.
        self._encryption_problem = encryption_problem
        self._db = db
        self._health_db = health_db
        self._hs = homeserver
        self._staff_room = staff_room
        self._intake = intake
        self._metrics = metrics
        self._connected = connected
        self._checks: dict[str, Check] = {
            "database": self.database,
            "inbox": self.inbox,
            "homeserver": self.homeserver,
            "checkins": self.checkins,
            "staff_room": self.staff_room,
            "alerts": self.alerts,
            "cases": self.cases,
            "encryption": self.encryption,
            **(extra or {}),
        }
        self._in_flight: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self._report: asyncio.Task[tuple[bool, dict[str, dict[str, Any]]]] | None = None
        self._report_at = -math.inf
        self._heartbeat_at = -math.inf  # the last heartbeat written (monotonic)

    async def report(self, *, fresh: bool = False) -> tuple[bool, dict[str, dict[str, Any]]]:
        """The checks' answers: one made moments ago (shared by every caller meanwhile, so
        a burst of anonymous requests runs the checks once), or a `fresh` one (an
        operator's, authenticated, asking why)."""
        if (
            self._report is None
            or (fresh and self._report.done())
            or (self._report.done() and time.monotonic() - self._report_at > REPORT_FRESH_SECONDS)
        ):
            self._report = asyncio.create_task(self._run_checks(), name="health:report")
            self._report.add_done_callback(self._finished)
        return await asyncio.shield(self._report)

    def _finished(self, report: asyncio.Task[Any]) -> None:
        self._report_at = time.monotonic()

    async def _run_checks(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        names = list(self._checks)
        results = await asyncio.gather(*(self._bounded(name) for name in names))
        checks = dict(zip(names, results, strict=True))
        return all(check.get("ok") for check in checks.values()), checks

    async def _bounded(self, name: str) -> dict[str, Any]:
        task = self._in_flight.get(name)
        if task is None or task.done():
            task = asyncio.create_task(self._checks[name](), name=f"health:{name}")
            self._in_flight[name] = task
        done, _ = await asyncio.wait({task}, timeout=CHECK_SECONDS)
        if not done:
            return {"ok": False, "error": f"no answer within {CHECK_SECONDS:.0f}s"}
        try:
            return task.result()
        except Exception as exc:  # a health check reports failure, it never raises
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    # ---- the checks ----------------------------------------------------------------------

    async def database(self) -> dict[str, Any]:
        """A committed write (on its own short-timeout connection) and the last real one."""
        if time.monotonic() - self._heartbeat_at > HEARTBEAT_SECONDS:
            try:
                await write_heartbeat(self._health_db)
            except Exception as exc:
                self._heartbeat_at = -math.inf
                return {"ok": False, "error": f"cannot write: {type(exc).__name__}: {exc}"[:300]}
            self._heartbeat_at = time.monotonic()
        result: dict[str, Any] = {"ok": True}
        if self._intake.paused is not None:
            result |= {"ok": False, "error": self._intake.paused}
        failed_at = self._intake.last_write_failed_at
        if (
            self._intake.last_write_error
            and failed_at is not None
            and dt.datetime.now(dt.UTC) - failed_at < FAILED_WRITE_WINDOW
        ):
            error = f"a transaction could not be recorded: {self._intake.last_write_error}"
            result |= {"ok": False, "error": error}
        async with self._health_db.connect() as conn:
            backlog = await ingest.backlog(conn)
        self._metrics.inbox_backlog.set(backlog)
        return result | {"inbox_backlog": backlog}

    async def inbox(self) -> dict[str, Any]:
        """Each lane's backlog; not ok when a flag has waited too long to be worked."""
        now = dt.datetime.now(dt.UTC)
        async with self._health_db.connect() as conn:
            lanes = await ingest.backlog_by_lane(conn)
        result: dict[str, Any] = {"ok": True, "lanes": {}}
        for lane, name in LANES.items():
            count, oldest = lanes.get(lane, (0, None))
            waited = (now - oldest).total_seconds() if oldest is not None else 0.0
            result["lanes"][name] = {"backlog": count, "oldest_seconds": round(waited, 1)}
        count, oldest = lanes.get(FLAG_LANE, (0, None))
        if oldest is not None and now - oldest > FLAG_LANE_STALLED_AFTER:
            waited = int((now - oldest).total_seconds())
            result |= {"ok": False, "problem": f"a flag has waited {waited}s to be acted on"}
        return result

    async def homeserver(self) -> dict[str, Any]:
        problem = await self._hs.check()
        result: dict[str, Any] = {"ok": problem is None, "connected": self._connected()}
        if problem:
            result["problem"] = problem
        return result

    async def checkins(self) -> dict[str, Any]:
        """Overdue check-ins make the service unhealthy: a promise to a member is slipping."""
        async with self._health_db.connect() as conn:
            counts = await cases.checkin_counts(conn, dt.datetime.now(dt.UTC), OVERDUE_GRACE)
        for state in ("pending", "overdue", "unclaimed"):
            self._metrics.checkins.labels(state).set(getattr(counts, state))
        return {"ok": counts.overdue == 0, **asdict(counts)}

    async def staff_room(self) -> dict[str, Any]:
        """Can every community's staff be told: each staff room resolved and joined.
        `room` and `problem`: the first's, or the first not ok; with several, each under
        `communities`."""
        rooms = (
            self._staff_room.by_community
            if isinstance(self._staff_room, StaffRooms)
            else {"default": self._staff_room}
        )
        each: dict[str, dict[str, Any]] = {}
        for community, room in rooms.items():
            problem = await room.problem(self._hs)
            each[community] = {"ok": problem is None, "room": room.room_id}
            if problem:
                each[community]["problem"] = problem
        failing = [one for one in each.values() if not one["ok"]]
        result: dict[str, Any] = dict(failing[0] if failing else next(iter(each.values())))
        if len(each) > 1:
            result["communities"] = each
        warning = self._staff_room_warning()
        if warning:
            result["warning"] = warning
        return result

    async def encryption(self) -> dict[str, Any]:
        """The bot's device: ready, and its one-time keys published (turned off: says so,
        ok; asked for but impossible: not ok, and why)."""
        if self._crypto is None:
            if self._encryption_problem is not None:
                return {"ok": False, "enabled": False, "problem": self._encryption_problem}
            return {"ok": True, "enabled": False}
        return {"enabled": True, **self._crypto.status()}

    async def alerts(self) -> dict[str, Any]:
        """Cases whose alert, or staff messages that, could not be delivered."""
        now = dt.datetime.now(dt.UTC)
        async with self._health_db.connect() as conn:
            undelivered = await cases.failed_alerts(conn)
            late = await cases.late_alerts(conn, now - self._alert_deadline)
            failed_messages = await outbox.failed_since(conn, now - FAILED_MESSAGE_WINDOW)
        result: dict[str, Any] = {
            "ok": not undelivered and not late and not failed_messages,
            "undelivered_alerts": undelivered,
            "late_alerts": late,
            "failed_staff_messages_24h": failed_messages,
        }
        problems = []
        if undelivered:
            numbers = ", ".join(f"#{n}" for n in undelivered)
            problems.append(f"the staff alert of case {numbers} could not be delivered")
        if late:
            numbers = ", ".join(f"#{n}" for n in late)
            problems.append(
                f"the staff alert of case {numbers} is past its deadline and not posted yet"
            )
        if problems:
            result["problem"] = "; ".join(problems)
        return result

    async def cases(self) -> dict[str, Any]:
        """Cases with a step that keeps raising (a bug of ours): what needs it waits."""
        async with self._health_db.connect() as conn:
            stuck = await cases.crashing(conn)
        result: dict[str, Any] = {"ok": not stuck, "stuck": stuck}
        if stuck:
            numbers = ", ".join(f"#{n}" for n in stuck)
            result["problem"] = (
                f"case {numbers}: a step keeps failing with an internal error (see the log)"
            )
        return result
