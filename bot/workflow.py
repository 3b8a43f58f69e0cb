"""The case workflow: notify, remove, room notice, alert, schedule — in that order, exactly once.

Each step writes its intent before it touches the homeserver and its outcome
after, in the same DB transaction as the step's audit entry. A step found
"started" after a restart first looks for what it may already have done (the
DM room by its marker, the message by its marker, the member's membership)
before doing it, so a crash at any point ends with every step done once.
A homeserver outage defers the case (nothing recorded as failed); a refusal
the homeserver means is recorded as the step's outcome and the case goes on.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.context import PolicyContext
from bot.ports import MESSAGE_MARKER_KEY, Homeserver, HomeserverUnavailable, Refused
from bot.staff_room import StaffRoomUnavailable
from bot.store import audit, cases
from bot.store.cases import Case, Step
from bot.templates import render_alert, render_kick_reason, render_notice, render_room_notice
from bot.worker import STOP_GRACE_SECONDS

log = logging.getLogger(__name__)

PRESENT = frozenset({"join", "invite", "knock"})
# A flag that reaches us later than this is reported as late in the staff alert.
LATE_AFTER = dt.timedelta(seconds=60)


@dataclass(frozen=True)
class Outcome:
    status: str  # done | failed | skipped
    facts: dict[str, Any] = field(default_factory=dict)
    personal: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def marker(case: Case, step: str) -> str:
    return f"case:{case.id}:{step}"


def marked(content: dict[str, Any], case: Case, step: str) -> dict[str, Any]:
    """Tag a message so a resumed step can recognise it among the room's messages."""
    return content | {
        MESSAGE_MARKER_KEY: {"case": case.id, "step": step, "marker": marker(case, step)}
    }


async def send_once(
    homeserver: Homeserver,
    case: Case,
    step: str,
    room_id: str,
    content: dict[str, Any],
    *,
    resumed: bool,
) -> str | Refused:
    """Send a marked message, unless an interrupted earlier attempt already did.

    Synapse forgets transaction ids after a while and on restart, so a resumed
    step looks for its own marked message before sending again.
    """
    tag = marker(case, step)
    if resumed:
        found = await homeserver.find_marked_message(room_id, tag)
        if found is not None:
            return found
    sent = await homeserver.send(room_id, marked(content, case, step), txn_id=f"safeguard.{tag}")
    return sent if isinstance(sent, Refused) else sent.event_id


@dataclass(frozen=True)
class DmRoom:
    room_id: str
    created: bool
    direct: dict[str, list[str]]  # the bot's m.direct as read, to update without re-reading


async def _nothing() -> None:
    return None


class CaseWorkflow:
    def __init__(
        self,
        engine: AsyncEngine,
        homeserver: Homeserver,
        context: PolicyContext,
        *,
        max_parallel_cases: int = 8,
        retry_delays: tuple[float, ...] = (1, 2, 5, 10, 30, 60),
    ) -> None:
        self._engine = engine
        self._hs = homeserver
        self._ctx = context
        self._running: set[int] = set()
        self._slots = asyncio.Semaphore(max_parallel_cases)
        self._retry_delays = retry_delays
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_scheduled: Callable[[int], None] = lambda case_id: None
        self.on_alerted: Callable[[int], None] = lambda case_id: None
        self._steps: dict[str, Callable[[Case, Step, dict[str, Step]], Awaitable[Outcome]]] = {
            "notify": self.notify,
            "remove": self.remove,
            "room_notice": self.room_notice,
            "alert": self.alert,
            "schedule": self.schedule,
        }

    # ---- the runner --------------------------------------------------------------------

    def start_case(self, case_id: int) -> None:
        """Run a newly opened case now, without waiting for the next poll."""
        if case_id in self._running:
            return
        self._running.add(case_id)
        task = asyncio.create_task(self._run_guarded(case_id), name=f"case:{case_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def work_once(self) -> bool:
        """Start every case that has work due and is not already running."""
        async with self._engine.connect() as conn:
            due = await cases.due_for_work(conn, dt.datetime.now(dt.UTC))
        started = False
        for case_id in due:
            if case_id not in self._running:
                self.start_case(case_id)
                started = True
        # Cases in flight run on their own; a slow one never holds up a deferred one.
        return started

    async def retry_deferred(self) -> None:
        """Something that held cases back is fixed (e.g. the staff room): retry them now."""
        async with self._engine.begin() as conn:
            await cases.end_deferrals(conn, dt.datetime.now(dt.UTC))
        await self.work_once()

    async def cancel(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop in-flight cases; every step is resumable, so the next start finishes them.

        The steps in progress get a moment to finish first (see Worker.stop for why).
        """
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run_guarded(self, case_id: int) -> None:
        try:
            async with self._slots:
                await self.run_case(case_id)
        except HomeserverUnavailable as exc:
            await self._defer(case_id, str(exc))
        except Exception:
            log.exception(
                "case #%d: step crashed; retrying later", case_id, extra={"case": case_id}
            )
            self._ctx.metrics.errors.labels("workflow").inc()
            await self._defer(case_id, "internal error")
        finally:
            self._running.discard(case_id)

    async def _defer(self, case_id: int, why: str) -> None:
        async with self._engine.begin() as conn:
            steps = await cases.steps_of(conn, case_id)
            attempts = max((s.attempts for s in steps if not s.finished), default=1)
            delay = self._retry_delays[min(attempts, len(self._retry_delays)) - 1]
            until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
            await cases.defer(conn, case_id, until)
        log.warning("case #%d deferred %.0fs: %s", case_id, delay, why, extra={"case": case_id})

    async def run_case(self, case_id: int) -> None:
        """Run the case's unfinished steps in order (the check-in waits for its due time)."""
        async with self._engine.connect() as conn:
            case = await cases.get(conn, case_id)
            steps = await cases.steps_of(conn, case_id)
        if case is None:
            return
        by_name = {step.step: step for step in steps}
        todo = [step for step in steps if not step.finished and step.step in self._steps]
        if not todo:
            return
        # The intent is written before each call and the outcome after; one step's
        # outcome and the next one's intent share a DB transaction. The local view is
        # updated to match what was written rather than read back.
        async with self._engine.begin() as conn:
            await cases.start_step(conn, case_id, todo[0].step, dt.datetime.now(dt.UTC))
        for index, step in enumerate(todo):
            step = replace(step, status="started", attempts=step.attempts + 1)
            following = todo[index + 1].step if index + 1 < len(todo) else None
            began = time.perf_counter()
            outcome = await self._steps[step.step](case, step, by_name)
            await self._record(case, step, outcome, start_next=following)
            self._ctx.metrics.step_seconds.labels(step.step).observe(time.perf_counter() - began)
            by_name[step.step] = replace(
                step,
                status=outcome.status,
                result=outcome.facts | outcome.personal,
                error=outcome.error,
            )

    async def _record(
        self, case: Case, step: Step, outcome: Outcome, *, start_next: str | None = None
    ) -> None:
        now = dt.datetime.now(dt.UTC)
        facts = outcome.facts | {"status": outcome.status, "attempts": step.attempts}
        if outcome.error:
            facts["error"] = outcome.error
        async with self._engine.begin() as conn:
            await cases.finish_step(
                conn,
                case.id,
                step.step,
                status=outcome.status,
                result=outcome.facts | outcome.personal,
                error=outcome.error,
                now=now,
            )
            await audit.append(
                conn,
                self._ctx.provenance,
                f"step.{step.step}",
                case_id=case.id,
                facts=facts,
                personal=outcome.personal,
                at=now,
            )
            if start_next is not None:
                await cases.start_step(conn, case.id, start_next, now)
        self._ctx.metrics.steps.labels(step.step, outcome.status).inc()
        log.info("case #%d: %s %s", case.id, step.step, outcome.status, extra={"case": case.id})

    async def _save_progress(self, case: Case, step: Step, **progress: Any) -> None:
        async with self._engine.begin() as conn:
            await cases.save_progress(conn, case.id, step.step, step.progress | progress)
            if "dm_room" in progress:
                await cases.set_fields(conn, case.id, dm_room_id=progress["dm_room"])

    async def _send_once(
        self, case: Case, step: Step, room_id: str, content: dict[str, Any]
    ) -> str | Refused:
        return await send_once(
            self._hs, case, step.step, room_id, content, resumed=step.attempts > 1
        )

    # ---- the steps, in the policy's order ---------------------------------------------

    async def notify(self, case: Case, step: Step, steps: dict[str, Step]) -> Outcome:
        """Tell the member first, in a DM, with the crisis resources."""
        if case.dry_run:
            return Outcome("skipped", {"why": "dry run"})
        assert case.member_id is not None
        known = step.progress.get("dm_room")
        found = (
            DmRoom(known, created=False, direct={}) if known else await self._dm_room(case, step)
        )
        if isinstance(found, Refused):
            return Outcome("failed", {"why": "the DM room could not be opened"}, error=str(found))
        dm_room = found.room_id
        self._ctx.watch(dm_room)
        content = render_notice(self._ctx.messages, self._ctx.resources, dry_run=False)
        # The notice and the progress together (a resumed step finds the room and the
        # message by their markers either way); m.direct after, off the homeserver's
        # critical path to the member.
        sent, _ = await asyncio.gather(
            self._send_once(case, step, dm_room, content),
            self._save_progress(case, step, dm_room=dm_room) if not known else _nothing(),
        )
        if found.created:
            await self._hs.remember_direct_room(case.member_id, dm_room, known=found.direct)
        if isinstance(sent, Refused):
            return Outcome(
                "failed",
                {"why": "the notice could not be sent"},
                {"dm_room": dm_room},
                error=str(sent),
            )
        return Outcome("done", {"event": sent}, {"dm_room": dm_room})

    async def _dm_room(self, case: Case, step: Step) -> DmRoom | Refused:
        member = case.member_id
        assert member is not None
        tag = marker(case, "dm")
        direct = await self._hs.direct_rooms()
        room_id = await self._hs.find_marked_room(tag) if step.attempts > 1 else None
        room_id = room_id or await self._reusable_dm(member, direct)
        if room_id is not None:
            return DmRoom(room_id, created=False, direct=direct)
        created = await self._hs.create_room(marker=tag, invite=[member], is_direct=True)
        if isinstance(created, Refused):
            return created
        return DmRoom(created.room_id, created=True, direct=direct)

    async def _reusable_dm(self, member: str, direct: dict[str, list[str]]) -> str | None:
        """A DM the bot already has with the member, that both are still in."""
        for room_id in reversed(direct.get(member, [])):
            if await self._hs.membership(
                room_id, self._hs.bot_user_id
            ) == "join" and await self._hs.membership(room_id, member) in ("join", "invite"):
                return room_id
        return None

    async def remove(self, case: Case, step: Step, steps: dict[str, Step]) -> Outcome:
        """Remove the member from the group room, kindly; someone already gone is recorded so."""
        if case.dry_run:
            return Outcome("skipped", {"why": "dry run"})
        assert case.room_id is not None and case.member_id is not None
        gone = await self._already_gone(case, resumed=step.attempts > 1)
        if gone is not None:
            return gone
        notified = steps["notify"].status == "done"
        reason = render_kick_reason(self._ctx.messages, notified=notified)
        kicked = await self._hs.kick(case.room_id, case.member_id, reason)
        if isinstance(kicked, Refused):
            gone = await self._already_gone(case, resumed=True)
            if gone is not None:
                return gone
            return Outcome(
                "failed", {"why": "the homeserver refused the removal"}, error=str(kicked)
            )
        self._ctx.metrics.flag_to_action_seconds.observe(
            (dt.datetime.now(dt.UTC) - case.received_at).total_seconds()
        )
        return Outcome("done", {"already_gone": False, "notified_first": notified})

    async def _already_gone(self, case: Case, *, resumed: bool) -> Outcome | None:
        """None while the member is still in the room; otherwise the removal's outcome.

        After a crash, "gone" may mean our own kick went through before we could
        record it: the membership event's sender tells the two apart.
        """
        assert case.room_id is not None and case.member_id is not None
        event = await self._hs.member_event(case.room_id, case.member_id)
        content = (event or {}).get("content") or {}
        membership = content.get("membership")
        if membership in PRESENT:
            return None
        if (
            resumed
            and event
            and event.get("sender") == self._hs.bot_user_id
            and membership == "leave"
        ):
            return Outcome("done", {"already_gone": False, "resumed": True})
        return Outcome("done", {"already_gone": True, "membership": membership})

    async def room_notice(self, case: Case, step: Step, steps: dict[str, Step]) -> Outcome:
        """Optionally remind the room where support is, naming no one."""
        if not self._ctx.policy.room_notice:
            return Outcome("skipped", {"why": "room notices are off"})
        if case.dry_run:
            return Outcome("skipped", {"why": "dry run"})
        removal = steps["remove"]
        if removal.status != "done" or removal.result.get("already_gone"):
            return Outcome("skipped", {"why": "no one was removed"})
        assert case.room_id is not None
        sent = await self._send_once(
            case, step, case.room_id, render_room_notice(self._ctx.messages, self._ctx.resources)
        )
        if isinstance(sent, Refused):
            return Outcome("failed", error=str(sent))
        return Outcome("done", {"event": sent})

    async def alert(self, case: Case, step: Step, steps: dict[str, Step]) -> Outcome:
        """Tell staff everything they need to act, including informing emergency services."""
        staff_room = self._ctx.staff_room_id
        if staff_room is None:
            # Staff must hear of every case: wait for the room, never drop the alert.
            raise StaffRoomUnavailable(
                f"the staff room {self._ctx.policy.staff_room} is not resolved"
            )
        notify, remove = steps["notify"], steps["remove"]
        late = case.received_at - case.flagged_at
        async with self._engine.connect() as conn:
            first = (await audit.entries(conn, case_id=case.id))[0]
        personal = first.personal or {}
        content = render_alert(
            self._ctx.messages,
            case_number=case.id,
            member=case.member_id or "",
            room=case.room_id or "",
            flagger=personal.get("flagger") or "",
            flagged_at=case.flagged_at,
            method=first.facts.get("method", ""),
            reason=personal.get("reason"),
            notified=notify.status == "done",
            not_notified_why=None
            if notify.status == "done"
            else (notify.error or notify.result.get("why") or "not attempted"),
            removed=remove.status == "done" and not remove.result.get("already_gone"),
            removal_note=remove.error
            or ("they had already left the room" if remove.result.get("already_gone") else None),
            late_by=late if late > LATE_AFTER else None,
            due_at=case.due_at,
            dry_run=case.dry_run,
            checkin_zone=self._ctx.checkin.zone,
        )
        sent = await self._send_once(case, step, staff_room, content)
        if isinstance(sent, Refused) and sent.errcode == "M_FORBIDDEN":
            # The bot is not (or no longer) allowed to post there: an operator can fix
            # that, and /health says so; until then the alert waits.
            raise StaffRoomUnavailable(f"cannot post in the staff room {staff_room}: {sent}")
        if isinstance(sent, Refused):
            return Outcome("failed", error=str(sent))
        async with self._engine.begin() as conn:
            await cases.set_fields(conn, case.id, alert_event_id=sent)
        self.on_alerted(case.id)
        return Outcome("done", {"event": sent})

    async def schedule(self, case: Case, step: Step, steps: dict[str, Step]) -> Outcome:
        """Hand the next-day check-in to the scheduler; the due time was fixed at the flag."""
        if case.due_at is None:
            return Outcome("failed", error="no check-in time could be computed")
        facts = {"due_at": case.due_at.isoformat()}
        if case.dry_run:
            facts["dry_run"] = True
        self.on_scheduled(case.id)
        return Outcome("done", facts)
