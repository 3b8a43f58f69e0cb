"""debrief: the moderator who flagged is looked after — a short DM once staff have the case.

Thanks, the case number, that staff have it and what happens next, that they did
the right thing, and where to get support themselves (`policy.moderator_support`).
"""

from __future__ import annotations

import datetime as dt

from bot.ports import Refused
from bot.steps.base import CaseStep, Outcome, StepRun
from bot.steps.direct import open_dm
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
        self.tools.rooms.add_dm(opened.room_id)  # their reply reaches staff
        if run.progress.get("debrief_room") != opened.room_id:
            await run.save(
                progress=run.progress | {"debrief_room": opened.room_id},
                case_fields={"debrief_room_id": opened.room_id},
            )
        content = self.tools.texts.moderator_debrief(
            case_number=case.id, due_at=case.due_at, now=dt.datetime.now(dt.UTC)
        )
        sent = await self.tools.send_once(run, opened.room_id, content)
        if opened.created:
            await self.hs.remember_direct_room(moderator, opened.room_id, known=opened.direct)
        if isinstance(sent, Refused):
            return Outcome.refused("the debrief could not be sent", sent, retry=True)
        return Outcome("done", {"event": sent}, {"moderator": moderator, "room": opened.room_id})
