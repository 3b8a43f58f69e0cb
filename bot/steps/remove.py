"""remove: take the member out of the group room, after they were told (or tried to be).

Someone already gone is recorded so — but only when the homeserver says so:
a membership the bot cannot read is not "gone", and the kick's own answer
decides. After a crash, "gone" may be our own kick that went through before
it could be recorded; the membership event's sender tells the two apart.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from bot.ports import Refused
from bot.steps.base import CaseStep, Outcome, StepRun

PRESENT = frozenset({"join", "invite", "knock"})


class Remove(CaseStep):
    name = "remove"
    requires = ("notify",)
    # A refused kick is definite (the bot lacks the power, or the member is staff
    # elsewhere): the alert must not wait for retries to say so.
    retries = 0

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        if case.dry_run:
            return Outcome.skipped("dry run")
        assert case.room_id is not None and case.member_id is not None
        event = await self.hs.member_event(case.room_id, case.member_id)
        if not isinstance(event, Refused):
            gone = self._gone(event, resumed=run.resumed)
            if gone is not None:
                return gone
        notified = run.steps["notify"].status == "done"
        reason = self.tools.texts.kick_reason(notified=notified)
        kicked = await self.hs.kick(case.room_id, case.member_id, reason)
        if isinstance(kicked, Refused):
            # Refused because they left meanwhile (or a resumed kick already worked)?
            event = await self.hs.member_event(case.room_id, case.member_id)
            gone = None if isinstance(event, Refused) else self._gone(event, resumed=True)
            if gone is not None:
                return gone
            return Outcome.refused("the homeserver refused the removal", kicked)
        self.tools.metrics.flag_to_action_seconds.observe(
            (dt.datetime.now(dt.UTC) - case.received_at).total_seconds()
        )
        return Outcome("done", {"already_gone": False, "notified_first": notified})

    def _gone(self, event: dict[str, Any] | None, *, resumed: bool) -> Outcome | None:
        """None while the member is still in the room; otherwise the removal's outcome."""
        content = (event or {}).get("content") or {}
        membership = content.get("membership")
        if membership in PRESENT:
            return None
        ours = resumed and event and event.get("sender") == self.hs.bot_user_id
        if ours and membership == "leave":
            return Outcome("done", {"already_gone": False, "resumed": True})
        return Outcome("done", {"already_gone": True, "membership": membership})
