"""remove: take the member out of the group room, after they were told.

Never removed untold by our own fault: if the notice failed for good, the removal
waits for staff (the alert says so): `!case N remove` removes them without the
notice, recorded as that person's decision; `!case N notify` tries the notice
again. A staff decision also lets the removal go ahead while the notice is still
being tried.

Someone already gone is recorded so — but only when the homeserver says so:
a membership the bot cannot read is not "gone", and the kick's own answer
decides. A first attempt kicks at once: Synapse refuses to kick anyone who is
not in the room (left, banned — a kick never lifts a ban — or never there), and
only then is their membership read to say which. After a crash, the membership
is read first: "gone" may be our own kick that went through before it could be
recorded, and the membership event's sender tells the two apart.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from bot.core.ports import Refused
from bot.steps.base import CaseStep, Outcome, StepRun
from bot.store.cases import Case, Step

PRESENT = frozenset({"join", "invite", "knock"})


class Remove(CaseStep):
    name = "remove"
    requires = ("notify",)
    # A refused kick is definite (the bot lacks the power, or the member is staff
    # elsewhere): the alert must not wait for retries to say so.
    retries = 0
    # The member is told, and waits in the room: the kick waits for no record of that.
    follows_at_once = True

    def ready(self, case: Case, steps: Mapping[str, Step]) -> bool:
        if case.state == "closed":
            return True  # a removal held for staff's decision ends with the case: skipped
        if steps["remove"].progress.get("decided_by"):
            return True  # staff decided: now, whatever the notice is doing
        notify = steps.get("notify")
        return notify is None or notify.status in ("done", "skipped")

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        if case.dry_run:
            return Outcome.skipped("dry run")
        assert case.room_id is not None and case.member_id is not None
        if case.state == "closed":
            # Closed, or withdrawn as a wrong flag, before the removal: never after (staff's
            # decision to remove included: closing it came later).
            return Outcome.skipped("the case was closed before the member was removed")
        notified = run.steps["notify"].status == "done"
        if run.resumed:
            gone = await self._already_gone(run, notified)
            if gone is not None:
                return gone
        reason = self.tools.texts.kick_reason(notified=notified)
        kicked = await self.hs.kick(case.room_id, case.member_id, reason)
        if isinstance(kicked, Refused):
            # Refused because they are not in the room (or a kick whose answer was lost
            # already worked: then the leave is ours)?
            gone = await self._already_gone(run, notified)
            if gone is not None:
                return gone
            return Outcome.refused("the homeserver refused the removal", kicked)
        self.tools.metrics.flag_to_action_seconds.observe(
            (dt.datetime.now(dt.UTC) - case.received_at).total_seconds()
        )
        return _kicked(run, notified, {})

    async def _already_gone(self, run: StepRun, notified: bool) -> Outcome | None:
        """The removal's outcome if the member is not in the room, as the homeserver says
        now; None if they are in it, or if it will not say (a kick's answer decides then).

        Asked only after a crash or a refused kick, so a leave by the bot is a kick of
        ours whose answer was lost.
        """
        case = run.case
        assert case.room_id is not None and case.member_id is not None
        event = await self.hs.member_event(case.room_id, case.member_id)
        if isinstance(event, Refused):
            return None
        content = (event or {}).get("content") or {}
        membership = content.get("membership")
        if membership in PRESENT:
            return None
        if membership == "leave" and event and self.hs.is_ours(event.get("sender")):
            # Our own kick, found: recorded as any kick is (told first? staff's decision?).
            return _kicked(run, notified, {"resumed": True})
        return Outcome("done", {"already_gone": True, "membership": membership})


def _kicked(run: StepRun, notified: bool, more: dict[str, object]) -> Outcome:
    """A kick of ours, done: whether they were told first, and whose decision it was when
    they were not (the record must say)."""
    facts: dict[str, object] = {"already_gone": False, "notified_first": notified} | more
    decided_by = run.progress.get("decided_by")
    if decided_by and not notified:
        return Outcome("done", facts | {"staff_decision": True}, {"decided_by": decided_by})
    return Outcome("done", facts)
