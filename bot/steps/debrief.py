"""debrief: the moderator who flagged is looked after — a short DM once staff have the case.

Thanks, the case number, that staff have it and what happens next, that they did
the right thing, and where to get support themselves (`policy.moderator_support`).
"""

from __future__ import annotations

import datetime as dt

from bot.ports import Refused
from bot.steps.base import CaseStep, Outcome, StepRun
from bot.steps.direct import keep_dm, open_dm
from bot.store import audit


class Debrief(CaseStep):
    name = "debrief"
    requires = ("alert",)

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        if not self.deployment.policy.moderator_debrief:
            return Outcome.skipped("policy.moderator_debrief is off")
        if case.dry_run:
            return Outcome.skipped("dry run")
        async with self.tools.db.connect() as conn:
            first = await audit.first_of_case(conn, case.id)
        moderator = ((first.personal if first else None) or {}).get("flagger")
        if not isinstance(moderator, str):
            return Outcome.skipped("the flagging moderator is not known (purged)")
        opened = await open_dm(
            self.hs, run, moderator, "debrief", encrypted=self.deployment.encrypt_private_rooms
        )
        if isinstance(opened, Refused):
            return Outcome.refused("no DM could be opened with the moderator", opened, retry=True)
        # Their reply reaches staff.
        await keep_dm(self.hs, self.tools, run, moderator, opened, "debrief", "debrief_room_id")
        content = self.tools.texts.moderator_debrief(
            case_number=case.id, due_at=case.due_at, now=dt.datetime.now(dt.UTC)
        )
        sent = await self.tools.send_once(run, opened.room_id, content)
        if isinstance(sent, Refused):
            return Outcome.refused("the debrief could not be sent", sent, retry=True)
        return Outcome("done", {"event": sent}, {"moderator": moderator, "room": opened.room_id})
