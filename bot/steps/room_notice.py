"""room_notice: optionally remind the room where support is, naming no one."""

from __future__ import annotations

from bot.core.ports import Refused
from bot.steps.base import CaseStep, Outcome, StepRun


class RoomNotice(CaseStep):
    name = "room_notice"
    requires = ("remove",)

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        if not self.deployment.policy.room_notice:
            return Outcome.skipped("room notices are off")
        if case.dry_run:
            return Outcome.skipped("dry run")
        removal = run.steps["remove"]
        if removal.status != "done" or removal.result.get("already_gone"):
            return Outcome.skipped("no one was removed")
        assert case.room_id is not None
        content = self.tools.texts.room_notice()
        # Everyone in the room may read its source: no case number, no marker.
        sent = await self.tools.send_once(run, case.room_id, content, unmarked=True)
        if isinstance(sent, Refused):
            return Outcome.refused("the notice could not be posted", sent, retry=True)
        return Outcome("done", {"event": sent})
