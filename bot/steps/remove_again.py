"""remove_again: the member rejoined while their case is open, and `policy.on_rejoin` is
`remove` — told why in their DM first (each return), then removed again, as discreetly as
the first time. Armed again on each return."""

from __future__ import annotations

import hashlib
import logging

from bot.core.ports import HomeserverUnavailable, Refused
from bot.steps.base import CaseStep, Outcome, StepRun

log = logging.getLogger(__name__)


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
        told = await self._tell(run, room)
        reason = self.tools.texts.kick_reason(notified=True)
        kicked = await self.hs.kick(room, case.member_id, reason)
        if isinstance(kicked, Refused):
            return Outcome.refused("the homeserver refused the removal", kicked)
        return Outcome("done", {"already_gone": False, "told": told})

    async def _tell(self, run: StepRun, room: str) -> bool:
        """Why, in the DM the notice went to; False if not told. They were told the first
        time: nothing here holds the removal back — a DM they left or that refuses it, nor
        encryption that cannot be done now (it would wait for its fall-back time, or for
        ever with `fallback: none`), nor a call that went unanswered (the kick's own call
        says whether the homeserver is away)."""
        case = run.case
        if case.dm_room_id is None:
            return False  # never told in a DM (the notice failed, and staff removed them)
        # One message a return (its join event), found again if this attempt is resumed.
        key = hashlib.sha256(str(run.progress.get("return", "")).encode()).hexdigest()[:12]
        try:
            name = await self.tools.room_as_members_know_it(room)
            told = await self.tools.tell(
                run, case.dm_room_id, self.tools.texts.removed_again(room=name), f"again-{key}"
            )
        except HomeserverUnavailable as exc:  # EncryptionUnavailable among them
            log.warning("case #%d: not told why before removal again: %s", case.id, exc)
            return False
        return not isinstance(told, Refused)
