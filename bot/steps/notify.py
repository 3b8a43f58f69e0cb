"""notify: tell the member first, in a DM, with the crisis resources.

"Notified" means verified: when the step is done the member is invited to (or
joined in) the DM room and the notice is in it (see bot/steps/direct.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from bot.ports import HomeserverUnavailable, Refused
from bot.steps.base import CaseStep, Outcome, StepRun
from bot.steps.direct import OpenedDm, open_dm

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
            self.hs, run, case.member_id, "dm", encrypted=self.deployment.encrypt_private_rooms
        )
        if isinstance(opened, Refused):
            return Outcome.refused("the DM room could not be opened", opened)
        room_id = opened.room_id
        self.tools.rooms.add_dm(room_id)
        content = self.tools.texts.notice(case.due_at, dt.datetime.now(dt.UTC))
        # The notice, the progress and m.direct together: none waits for another (a
        # resumed attempt finds the room and the message by their markers either way),
        # so the removal, which waits for this step, waits for the notice alone.
        sent, _, _ = await asyncio.gather(
            self.tools.send_once(run, room_id, content),
            run.save(
                progress=run.progress | {"dm_room": room_id}, case_fields={"dm_room_id": room_id}
            )
            if run.progress.get("dm_room") != room_id
            else asyncio.sleep(0),
            self._remember(case.member_id, opened) if opened.created else asyncio.sleep(0),
        )
        if isinstance(sent, Refused):
            return Outcome(
                "failed",
                {"why": "the notice could not be sent"},
                {"dm_room": room_id},
                error=str(sent),
            )
        facts = (
            {"event": sent, "invited_again": opened.invited_again}
            if not opened.created
            else {"event": sent}
        )
        return Outcome("done", facts, {"dm_room": room_id})

    async def _remember(self, member: str, opened: OpenedDm) -> None:
        """Mark the new room as a DM with them in the bot's m.direct (what clients show).

        Bookkeeping only: a homeserver away now must not hold up or repeat the notice.
        """
        try:
            await self.hs.remember_direct_room(member, opened.room_id, known=opened.direct)
        except HomeserverUnavailable as exc:
            log.warning("could not record the DM in m.direct: %s", exc)
