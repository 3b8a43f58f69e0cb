"""The next-day check-in: a private room with the member and staff, opened exactly once.

Scheduling: the case row is the truth (its due time is fixed when the flag
arrives), and APScheduler (bot/timers.py) holds in-memory jobs re-created from
the rows at every start. Why not APScheduler's SQLAlchemy job store: it is
synchronous (it would block the event loop on every poll or need a second, sync
driver), it pickles the callable, and it would be a second copy of the truth
that can disagree with the case row. Jobs never misfire-skip (see timers.py) and
are idempotent, so a late, repeated or concurrent run still opens one room.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.context import PolicyContext
from bot.ports import Homeserver, HomeserverUnavailable, Refused
from bot.store import audit, cases
from bot.store.cases import Case, Step
from bot.store.ingest import InboxItem, finish
from bot.templates import render_checkin, render_checkin_opened, render_checkin_reminder
from bot.timers import Timers
from bot.triggers import normalise_key
from bot.workflow import Outcome, marker, send_once

log = logging.getLogger(__name__)

CLAIM_KEY = normalise_key("✋")
RETRY_AFTER = dt.timedelta(seconds=10)
# Later than this past its due time, a check-in was held up (the service was
# down), not by scheduling jitter: staff are told it is late.
LATE_AFTER = dt.timedelta(seconds=10)


def matrix_to(room_id: str) -> str:
    return f"https://matrix.to/#/{room_id}"


class CheckinScheduler:
    def __init__(
        self,
        engine: AsyncEngine,
        homeserver: Homeserver,
        context: PolicyContext,
        *,
        is_staff: Callable[[str], Any],
        timers: Timers,
    ) -> None:
        self._engine = engine
        self._hs = homeserver
        self._ctx = context
        self._is_staff = is_staff
        self._timers = timers
        self._opening: set[int] = set()

    # ---- scheduling ------------------------------------------------------------------

    async def start(self) -> int:
        """Re-create every job from the database; returns how many check-ins are pending."""
        self._timers.start()
        async with self._engine.connect() as conn:
            pending = await cases.with_pending_checkin(conn)
            waiting = await cases.awaiting_staff(conn)
        for case in pending:
            if case.due_at is not None:
                self._add("open", case.id, case.due_at)
        for case in waiting:
            assert case.checkin_opened_at is not None
            self._add("remind", case.id, case.checkin_opened_at + self._ctx.checkin.remind_after)
        return len(pending)

    def _add(self, kind: str, case_id: int, when: dt.datetime) -> None:
        self._timers.at(
            f"{kind}:{case_id}", when, self.open if kind == "open" else self.remind, case_id
        )

    def schedule_case(self, case_id: int) -> None:
        """Called when a case's schedule step is done: queue its check-in."""
        asyncio.get_running_loop().create_task(self._schedule_from_db(case_id))

    async def _schedule_from_db(self, case_id: int) -> None:
        async with self._engine.connect() as conn:
            case = await cases.get(conn, case_id)
        if case is not None and case.due_at is not None and self._timers.running:
            self._add("open", case.id, case.due_at)

    @property
    def job_count(self) -> int:
        return self._timers.count("open:")

    # ---- opening the check-in ----------------------------------------------------------

    async def open(self, case_id: int) -> None:
        if case_id in self._opening:
            return
        self._opening.add(case_id)
        try:
            await self._open(case_id)
        except HomeserverUnavailable as exc:
            log.warning("case #%d: check-in deferred: %s", case_id, exc, extra={"case": case_id})
            self._add("open", case_id, dt.datetime.now(dt.UTC) + RETRY_AFTER)
        finally:
            self._opening.discard(case_id)

    async def _open(self, case_id: int) -> None:
        async with self._engine.connect() as conn:
            steps = {step.step: step for step in await cases.steps_of(conn, case_id)}
        step = steps.get("checkin")
        if step is None or step.finished:
            return
        if steps["schedule"].status != "done":
            # The referral steps come first (e.g. after a long outage they resume together).
            self._add("open", case_id, dt.datetime.now(dt.UTC) + RETRY_AFTER)
            return
        async with self._engine.begin() as conn:
            await cases.start_step(conn, case_id, "checkin", dt.datetime.now(dt.UTC))
            step = next(s for s in await cases.steps_of(conn, case_id) if s.step == "checkin")
            case = await cases.get(conn, case_id)
        assert case is not None
        outcome = await self._open_room(case, step)
        now = dt.datetime.now(dt.UTC)
        async with self._engine.begin() as conn:
            await cases.finish_step(
                conn,
                case.id,
                "checkin",
                status=outcome.status,
                result=outcome.facts | outcome.personal,
                error=outcome.error,
                now=now,
            )
            if outcome.status == "done":
                await cases.set_fields(conn, case.id, checkin_opened_at=now)
            await audit.append(
                conn,
                self._ctx.provenance,
                "step.checkin",
                case_id=case.id,
                facts=outcome.facts | {"status": outcome.status, "attempts": step.attempts},
                personal=outcome.personal,
                at=now,
            )
        self._ctx.metrics.steps.labels("checkin", outcome.status).inc()
        if outcome.status == "done":
            self._add("remind", case.id, now + self._ctx.checkin.remind_after)

    async def _send_once(
        self, case: Case, step: str, room_id: str, content: dict[str, Any], resumed: bool
    ) -> str | Refused:
        return await send_once(self._hs, case, step, room_id, content, resumed=resumed)

    async def _open_room(self, case: Case, step: Step) -> Outcome:
        staff_room = self._ctx.staff_room_id
        late = dt.datetime.now(dt.UTC) - (case.due_at or dt.datetime.now(dt.UTC))
        late_by = late if late > LATE_AFTER else None
        resumed = step.attempts > 1
        if case.dry_run:
            if staff_room:
                await self._send_once(
                    case,
                    "checkin-staff",
                    staff_room,
                    render_checkin_opened(
                        case_number=case.id,
                        link=None,
                        late_by=late_by,
                        dry_run=True,
                        due_at=case.due_at,
                    ),
                    resumed,
                )
            return Outcome("skipped", {"why": "dry run", "would_open_at": str(case.due_at)})
        assert case.member_id is not None
        room_id = step.progress.get("room") or (
            await self._hs.find_marked_room(marker(case, "checkin")) if resumed else None
        )
        if room_id is None:
            created = await self._hs.create_room(
                marker=marker(case, "checkin"), invite=[], name=self._ctx.checkin.room_name
            )
            if isinstance(created, Refused):
                return Outcome(
                    "failed", {"why": "the room could not be created"}, error=str(created)
                )
            room_id = created.room_id
        async with self._engine.begin() as conn:
            await cases.save_progress(conn, case.id, "checkin", step.progress | {"room": room_id})
            await cases.set_fields(conn, case.id, checkin_room_id=room_id)
        invited, not_invited = await self._invite_all(
            room_id, [case.member_id, *self._ctx.policy.staff]
        )
        staff_roles = ["a member of our staff team"] if self._ctx.policy.staff else []
        message = await self._send_once(
            case,
            "checkin",
            room_id,
            render_checkin(self._ctx.messages, self._ctx.resources, staff_roles=staff_roles),
            resumed,
        )
        notice_id = None
        if staff_room:
            notice = await self._send_once(
                case,
                "checkin-staff",
                staff_room,
                render_checkin_opened(
                    case_number=case.id,
                    link=matrix_to(room_id),
                    late_by=late_by,
                    dry_run=False,
                    due_at=case.due_at,
                    member_not_invited=not_invited.get(case.member_id),
                ),
                resumed,
            )
            notice_id = notice if isinstance(notice, str) else None
            if notice_id:
                async with self._engine.begin() as conn:
                    await cases.set_fields(conn, case.id, checkin_notice_event_id=notice_id)
        facts: dict[str, Any] = {
            "late_seconds": round(late_by.total_seconds()) if late_by else 0,
            "message": message if isinstance(message, str) else None,
            "staff_notice": notice_id,
            "member_invited": case.member_id in invited,
        }
        personal = {"room": room_id, "invited": invited, "not_invited": not_invited}
        return Outcome("done", facts, personal)

    async def _invite_all(self, room_id: str, users: list[str]) -> tuple[list[str], dict[str, str]]:
        invited: list[str] = []
        failed: dict[str, str] = {}
        for user in dict.fromkeys(users):
            if await self._hs.membership(room_id, user) in ("join", "invite"):
                invited.append(user)
                continue
            result = await self._hs.invite(room_id, user)
            if isinstance(result, Refused):
                failed[user] = str(result)
            else:
                invited.append(user)
        return invited, failed

    # ---- after it opened: joins, claims, the reminder ----------------------------------

    async def remind(self, case_id: int) -> None:
        staff_room = self._ctx.staff_room_id
        async with self._engine.connect() as conn:
            case = await cases.get(conn, case_id)
        if (
            case is None
            or staff_room is None
            or case.checkin_claimed_by
            or case.checkin_staff_joined_at
            or case.checkin_reminded_at
        ):
            return
        content = render_checkin_reminder(
            case_number=case.id,
            link=matrix_to(case.checkin_room_id or ""),
            staff=list(self._ctx.policy.staff),
        )
        try:
            # Always look first: a crash between sending and recording must not remind twice.
            sent = await self._send_once(case, "checkin-reminder", staff_room, content, True)
        except HomeserverUnavailable:
            self._add("remind", case_id, dt.datetime.now(dt.UTC) + RETRY_AFTER)
            return
        now = dt.datetime.now(dt.UTC)
        async with self._engine.begin() as conn:
            await cases.set_fields(conn, case.id, checkin_reminded_at=now)
            await audit.append(
                conn,
                self._ctx.provenance,
                "checkin_reminded",
                case_id=case.id,
                facts={"sent": not isinstance(sent, Refused)},
                at=now,
            )

    async def handle_event(self, item: InboxItem) -> bool:
        """Dispatcher hook: check-in room memberships and ✋ claims in the staff room."""
        event = item.payload
        if item.event_type == "m.room.member":
            async with self._engine.connect() as conn:
                case = await cases.by_column(conn, "checkin_room_id", item.room_id)
            if case is None:
                return False
            await self._membership_in_checkin(item, case)
            return True
        if item.room_id == self._ctx.staff_room_id and item.event_type == "m.reaction":
            relation = (event.get("content") or {}).get("m.relates_to") or {}
            key = relation.get("key")
            target = relation.get("event_id")
            if (
                not isinstance(key, str)
                or normalise_key(key) != CLAIM_KEY
                or not isinstance(target, str)
            ):
                return False
            async with self._engine.connect() as conn:
                case = await cases.by_column(conn, "checkin_notice_event_id", target)
            if case is None:
                return False
            await self.claim(case, event.get("sender", ""), via="reaction", item=item)
            return True
        return False

    async def claim(
        self, case: Case, user: str, *, via: str, item: InboxItem | None = None
    ) -> bool:
        """Record a staff member's claim and make sure they are in the room. False: not staff."""
        now = dt.datetime.now(dt.UTC)
        if not await self._is_staff(user):
            async with self._engine.begin() as conn:
                await audit.append(
                    conn,
                    self._ctx.provenance,
                    "claim_refused",
                    case_id=case.id,
                    facts={"via": via, "why": "not staff"},
                    personal={"by": user},
                    at=now,
                )
                if item is not None:
                    await finish(conn, item.seq, now)
            return False
        if case.checkin_room_id and await self._hs.membership(case.checkin_room_id, user) not in (
            "join",
            "invite",
        ):
            await self._hs.invite(case.checkin_room_id, user)
        async with self._engine.begin() as conn:
            if case.checkin_claimed_by is None:
                await cases.set_fields(conn, case.id, checkin_claimed_by=user)
            await audit.append(
                conn,
                self._ctx.provenance,
                "checkin_claimed",
                case_id=case.id,
                facts={"via": via, "first": case.checkin_claimed_by is None},
                personal={"by": user},
                at=now,
            )
            if item is not None:
                await finish(conn, item.seq, now)
        return True

    async def _membership_in_checkin(self, item: InboxItem, case: Case) -> None:
        event = item.payload
        user = event.get("state_key")
        content = event.get("content") or {}
        membership = content.get("membership")
        prev = ((event.get("unsigned") or {}).get("prev_content") or {}).get("membership")
        now = dt.datetime.now(dt.UTC)
        kind: str | None = None
        fields: dict[str, Any] = {}
        if user == self._ctx.bot_user_id:
            kind = None
        elif user == case.member_id:
            if membership == "join" and prev != "join":
                kind, fields = "checkin_member_joined", {"checkin_member_joined_at": now}
            elif membership == "leave" and prev == "invite":
                kind = "checkin_invite_rejected"
        elif (
            membership == "join"
            and prev != "join"
            and isinstance(user, str)
            and case.checkin_staff_joined_at is None
            and await self._is_staff(user)
        ):
            kind, fields = "checkin_staff_joined", {"checkin_staff_joined_at": now}
        async with self._engine.begin() as conn:
            if kind:
                if fields:
                    await cases.set_fields(conn, case.id, **fields)
                await audit.append(
                    conn,
                    self._ctx.provenance,
                    kind,
                    case_id=case.id,
                    personal={"user": user},
                    at=now,
                )
            await finish(conn, item.seq, now)
