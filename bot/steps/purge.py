"""purge: a case past its retention period leaves nothing personal behind, here or on the
homeserver — and the member hears, one last time, where to get help now.

In order, each part resumable (its progress saved as it goes; a resumed attempt looks
before acting again): the bot's staff-room messages of the case are redacted (the alert,
its replies, relays, notices); its rooms stop being DMs in the bot's `m.direct`; the
member gets a last message where they still are (the DM, else the check-in room); the
bot leaves those rooms; and only then, in one transaction, the case's rows are erased
(bot/store/retention.py). Rooms another case still uses are that case's, and left alone.

A homeserver outage defers it (nothing is erased before the homeserver's side is
done); a refusal (a message already gone, a room the bot was taken out of) is counted
in the record and does not hold the erasure up. A room the bot could not leave is
remembered without any case, so whoever writes there is still answered.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from bot.core.ports import Refused
from bot.rooms.staff_room import StaffRoomUnavailable
from bot.steps.base import CaseStep, Outcome, StepRun
from bot.store import cases
from bot.store import retention as store

IN_ROOM = frozenset({"join", "invite"})


class Purge(CaseStep):
    name = store.PURGE_STEP
    audit_kind = "purged"  # the tombstone: counts and times, nothing of anyone

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        if case.purged_at is not None:
            # Erased by an attempt that died before its outcome was recorded.
            return Outcome("done", dict(run.progress.get("facts") or {}))
        cutoff = run.progress.get("cutoff")
        if case.state != "closed" or case.closed_at is None:
            return Outcome.skipped("the case was reopened")
        if case.hold_reason is not None:
            return Outcome.skipped("the case is on hold")
        if isinstance(cutoff, str) and case.closed_at >= dt.datetime.fromisoformat(cutoff):
            return Outcome.skipped("the case was closed again since")
        async with self.tools.db.connect() as conn:
            if await store.undelivered(conn, case.id):
                # Sent any moment: redacted with the rest once it is.
                raise StaffRoomUnavailable("a staff message of the case is still on its way")
            staff_events = await store.staff_messages(conn, case.id)
            private = [
                room
                for room in dict.fromkeys(
                    (case.dm_room_id, case.checkin_room_id, case.debrief_room_id)
                )
                if room
            ]
            shared = await store.shared_rooms(conn, case.id, private)
        rooms = [room for room in private if room not in shared]
        await self._redact(run, staff_events)
        if rooms and "direct" not in run.progress:
            forgotten = await self.hs.forget_direct_rooms(rooms)
            await run.save(progress=run.progress | {"direct": _outcome(forgotten)})
        told = await self._farewell(run, [r for r in rooms if r != case.debrief_room_id])
        stayed = await self._leave(run, rooms)
        facts = store.tombstone(case.flagged_at, case.closed_at, 0) | {
            "staff_messages_redacted": len(run.progress.get("redacted", [])),
            "staff_messages_not_redacted": len(run.progress.get("not_redacted", [])),
            "direct_rooms_forgotten": run.progress.get("direct") == "done",
            "member_told": told,
            "rooms_left": len(rooms) - len(stayed),
            "rooms_not_left": len(stayed),
            "rooms_kept_for_other_cases": len(shared),
        }
        now = dt.datetime.now(dt.UTC)
        async with self.tools.db.begin() as conn:
            facts["entries_purged"] = await store.erase(
                conn, case.id, now, keep=shared, stayed=stayed
            )
            # What the attempt learnt (event and room ids) goes too: counts stay.
            await cases.save_progress(conn, case.id, self.name, {"facts": facts})
        for room in rooms:
            if room not in stayed:
                self.tools.rooms.forget(room)
        return Outcome("done", facts)

    async def _redact(self, run: StepRun, events: list[str]) -> None:
        done: list[str] = list(run.progress.get("redacted", []))
        refused: list[str] = list(run.progress.get("not_redacted", []))
        todo = [event for event in events if event not in done and event not in refused]
        if not todo:
            return
        room_id = self.tools.staff_room.require()
        reason = self.tools.texts.retention_redaction_reason()
        for event_id in todo:
            if run.resumed and await self.hs.is_redacted(room_id, event_id):
                done.append(event_id)
            else:
                redacted = await self.hs.redact(
                    room_id, event_id, reason=reason, txn_id=f"safeguard.{run.marker()}.{event_id}"
                )
                (refused if isinstance(redacted, Refused) else done).append(event_id)
            await run.save(progress=run.progress | {"redacted": done, "not_redacted": refused})

    async def _farewell(self, run: StepRun, rooms: list[str]) -> bool:
        """The last message, in the first of the rooms the member is still in."""
        member = run.case.member_id
        if "told" in run.progress:
            return bool(run.progress["told"])
        told = False
        if member and not run.case.dry_run:
            for room_id in rooms:
                if await self.hs.membership(room_id, member) not in IN_ROOM:
                    continue
                sent = await self.tools.tell(run, room_id, self.tools.texts.farewell(), "farewell")
                told = not isinstance(sent, Refused)
                break
        await run.save(progress=run.progress | {"told": told})
        return told

    async def _leave(self, run: StepRun, rooms: list[str]) -> list[str]:
        """Leave each room; returns those the bot is still in (the homeserver refused)."""
        left: list[str] = list(run.progress.get("left", []))
        stayed: list[str] = list(run.progress.get("stayed", []))
        for room_id in rooms:
            if room_id in left or room_id in stayed:
                continue
            if await self.hs.membership(room_id, self.hs.bot_user_id) in IN_ROOM:
                gone = await self.hs.leave_room(room_id)
                if isinstance(gone, Refused) and (
                    await self.hs.membership(room_id, self.hs.bot_user_id) in IN_ROOM
                ):
                    stayed.append(room_id)
                    await run.save(progress=run.progress | {"stayed": stayed})
                    continue
            left.append(room_id)
            await run.save(progress=run.progress | {"left": left})
        return stayed


def _outcome(result: Any) -> str:
    return "refused" if isinstance(result, Refused) else "done"
