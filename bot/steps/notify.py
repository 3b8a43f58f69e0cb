"""notify: tell the member first, in a DM, with the crisis resources.

"Notified" means verified: when the step is done the member is invited to (or
joined in) the DM room and the notice is in it (see bot/steps/direct.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from bot.ports import Refused
from bot.steps.base import CaseStep, Outcome, StepRun
from bot.steps.direct import keep_dm, open_dm

log = logging.getLogger(__name__)


class Notify(CaseStep):
    name = "notify"
    # Removal waits for this step: the member's safety allows no second try here,
    # and an undeliverable notice is itself the news staff need.
    retries = 0

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        if case.dry_run:
            return Outcome.skipped("dry run")
        assert case.member_id is not None
        opened = await open_dm(
            self.hs,
            run,
            case.member_id,
            "dm",
            encrypted=self.deployment.encrypt_private_rooms,
            ready=self.tools.ready_rooms,
        )
        if isinstance(opened, Refused):
            return Outcome.refused("the DM room could not be opened", opened)
        room_id = opened.room_id
        content = self.tools.texts.notice(case.due_at, dt.datetime.now(dt.UTC))
        # The notice and the DM's bookkeeping together: neither waits for the other (a
        # resumed attempt finds the room and the message by their markers either way),
        # so the removal, which waits for this step, waits for the notice alone.
        sent, _ = await asyncio.gather(
            self.tools.send_once(run, room_id, content),
            keep_dm(self.hs, self.tools, run, case.member_id, opened, "dm", "dm_room_id"),
        )
        if isinstance(sent, Refused):
            return Outcome(
                "failed",
                {"why": "the notice could not be sent"},
                {"dm_room": room_id},
                error=str(sent),
            )
        facts: dict[str, object] = {"event": sent}
        if not opened.created:
            facts["invited_again"] = opened.invited_again
        if opened.made_ahead:
            facts["room_made_ahead"] = True
        return Outcome("done", facts, {"dm_room": room_id})
