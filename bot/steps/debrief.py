"""debrief: the moderator who flagged is looked after — a short DM once staff have the case
(or once the alert failed for good: then it asks them to tell staff directly).

Thanks, the case number, that staff have it and what happens next, that they did
the right thing, and where to get support themselves (`policy.moderator_support`).
"""

from __future__ import annotations

import datetime as dt

from bot.steps.base import CaseStep, Outcome, StepRun
from bot.steps.direct import NotToldByDm, tell_by_dm
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
        content = self.tools.texts.moderator_debrief(
            case_number=case.id,
            due_at=case.due_at,
            now=dt.datetime.now(dt.UTC),
            # It runs once the alert has finished, which may be as failed: then "staff have
            # it, you need do nothing more" would be untrue, and the moderator is asked to
            # tell staff themselves.
            staff_alerted=run.steps["alert"].status == "done",
        )
        # Their reply reaches staff (the DM is kept as the case's debrief room).
        result = await tell_by_dm(self.tools, run, moderator, "debrief", content, "debrief_room_id")
        if isinstance(result, NotToldByDm):
            return result.outcome("the moderator", "the debrief")
        return Outcome(
            "done",
            {"event": result.told.event_id, "unencrypted": bool(result.plain_because)},
            {"moderator": moderator, "room": result.opened.room_id},
        )
