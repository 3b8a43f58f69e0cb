"""notify: tell the member first, in a DM, with the crisis resources.

"Notified" means verified: when the step is done the member is invited to (or
joined in) the DM room and the notice is in it (see bot/steps/direct.py).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from bot.rooms.ready_rooms import taken
from bot.steps.base import SENT_AHEAD, CaseStep, Outcome, StepRun
from bot.steps.direct import NotToldByDm, ToldByDm, tell_by_dm
from bot.steps.notify_ahead import told_in
from bot.store.cases import Case, Step


class Notify(CaseStep):
    name = "notify"
    # Removal waits for this step: the member's safety allows no second try here,
    # and an undeliverable notice is itself the news staff need.
    retries = 0

    async def begin(self, conn: AsyncConnection, case: Case, step: Step) -> dict[str, Any] | None:
        """A room made ahead taken in the transaction that opens the case (so the notice
        waits for no transaction of its own): only when it is the room `run` would take,
        so not when the bot's m.direct (as read) lists a DM with them (that one may still
        be shared: `run` looks), nor before m.direct was read at all."""
        ready = self.tools.ready_rooms
        if case.dry_run or case.member_id is None or ready is None:
            return None
        if step.progress.get("dm_room"):
            return None  # its notice sent ahead, into the room it took (notify_ahead.py)
        known_dms = self.hs.direct_rooms_known(case.member_id)
        if known_dms is None or known_dms or self.tools.plain_room_because() is not None:
            return None
        room_id = await ready.take_in(conn, case.id, step.step, "dm", step.progress, "dm_room_id")
        return None if room_id is None else step.progress | taken("dm", room_id)

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        if case.dry_run:
            return Outcome.skipped("dry run")
        assert case.member_id is not None
        result: ToldByDm | NotToldByDm | None = None
        if run.progress.get(SENT_AHEAD):
            result = await self._told_ahead(run)
        if case.state == "closed" and result is None:
            # Closed (or withdrawn as a wrong flag) while the notice waited (an outage, the
            # wait for encryption): a crisis notice then would be news of a case staff
            # ended, and a withdrawn one's apology may have gone already.
            return Outcome.skipped("the case was closed before the member was told")
        if result is None:
            content = self.tools.texts.notice(case.due_at, dt.datetime.now(dt.UTC))
            # Marked in the bot's m.direct by the case's `mark_dm` step, after the removal.
            result = await tell_by_dm(
                self.tools,
                run,
                case.member_id,
                "dm",
                content,
                "dm_room_id",
                made_ahead=True,
                mark_direct=False,
            )
        if isinstance(result, NotToldByDm):
            if result.room is None:
                return Outcome.refused("the DM room could not be opened", result.refused)
            return Outcome(
                "failed",
                {"why": "the notice could not be sent"},
                {"dm_room": result.room},
                error=str(result.refused),
            )
        opened = result.opened
        facts: dict[str, object] = {"event": result.told.event_id}
        if not opened.created:
            facts["invited_again"] = opened.invited_again
        if opened.made_ahead:
            facts["room_made_ahead"] = True
        personal: dict[str, object] = {"dm_room": opened.room_id}
        if result.plain_because:
            # The record, and the staff alert, say it went unencrypted, and why (the why
            # may name a room: personal, erasable).
            facts["unencrypted"] = True
            personal["plain_because"] = result.plain_because
        if run.progress.get(SENT_AHEAD):
            facts["told_ahead"] = True
        # The notice's event: the sync watches for the member's read receipt on it (or on
        # anything after it), and none recorded for an earlier notice stands for this one.
        fields = {"notice_event_id": result.told.event_id, "notice_read_at": None}
        return Outcome("done", facts, personal, case_fields=fields)

    async def _told_ahead(self, run: StepRun) -> ToldByDm | None:
        """The notice sent ahead of the case (bot/steps/notify_ahead.py): the answers of
        its calls, joined; else, in a case closed meanwhile (nothing is sent now), the
        message if it went before (so it is recorded, and its apology follows). None:
        the step's usual way, which looks first (`run.resumed`)."""
        ahead = self.tools.ahead
        joined = await ahead.joined(run) if ahead is not None else None
        if joined is not None or run.case.state != "closed":
            return joined
        room_id = run.progress.get("dm_room")
        if not isinstance(room_id, str):
            return None
        found = await self.hs.find_marked_message(room_id, run.marker())
        return None if found is None else told_in(room_id, found)
