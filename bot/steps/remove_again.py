"""remove_again: the member rejoined while their case is open, and `policy.on_rejoin` is
`remove` — removed again, as discreetly as the first time. Armed again on each return."""

from __future__ import annotations

from bot.core.ports import Refused
from bot.steps.base import CaseStep, Outcome, StepRun


class RemoveAgain(CaseStep):
    name = "remove_again"
    retries = 0

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        if case.state == "closed" or case.room_id is None or case.member_id is None:
            return Outcome.skipped("the case is closed")
        # Where they came back: the case's room, or the replacement it was upgraded to.
        room = str(run.progress.get("room") or case.room_id)
        membership = await self.hs.membership(room, case.member_id)
        if membership not in ("join", "invite", "knock"):
            return Outcome("done", {"already_gone": True})
        reason = self.tools.texts.kick_reason(notified=True)
        kicked = await self.hs.kick(room, case.member_id, reason)
        if isinstance(kicked, Refused):
            return Outcome.refused("the homeserver refused the removal", kicked)
        return Outcome("done", {"already_gone": False})
