"""mark_dm: the member's DM marked as a direct chat with them in the bot's m.direct.

What a later DM with them looks for first (bot/steps/direct.py), and what the purge
unmarks. Bookkeeping, not the member's safety: a step of its own after the notice,
the removal and the alert, so its write never competes on the homeserver with the
notice, the invite or the kick (one homeserver process answers all of them). A step,
so a restart keeps it; writing it twice costs nothing (a room already marked is no
write).
"""

from __future__ import annotations

from bot.core.ports import Refused
from bot.steps.base import CaseStep, Outcome, StepRun


class MarkDm(CaseStep):
    name = "mark_dm"
    # After the removal; and after the alert too, as it comes later in the policy's order
    # (an alert held back by a broken staff room does not hold this back).
    requires = ("notify", "remove")

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        if case.purged_at is not None or case.member_id is None:
            return Outcome.skipped("the case was purged")
        purge = run.steps.get("purge")
        if purge is not None and purge.status != "pending":
            # Purged rooms stay unmarked: nothing marks them again.
            return Outcome.skipped("the case is being purged")
        if case.dm_room_id is None:
            return Outcome.skipped("no DM was opened")
        marked = await self.hs.remember_direct_room(case.member_id, case.dm_room_id)
        if isinstance(marked, Refused):
            return Outcome.refused("the DM could not be marked in m.direct", marked, retry=True)
        return Outcome("done", {}, {"dm_room": case.dm_room_id})
