"""notify: tell the member first, in a DM, with the crisis resources.

"Notified" means verified: when the step is done the member is invited to (or
joined in) the DM room and the notice is in it. On a first attempt the calls'
own answers are the proof (createRoom with the invite succeeds only once the
member is invited); a resumed attempt reads the member's membership in the
room it finds and invites them if the earlier attempt died before it could.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bot.ports import Refused
from bot.steps.base import CaseStep, Outcome, StepRun
from bot.templates import render_notice

PRESENT_IN_DM = frozenset({"join", "invite"})


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
        room_id, direct, created = await self._dm_room(run)
        if isinstance(room_id, Refused):
            return Outcome.refused("the DM room could not be opened", room_id)
        self.tools.rooms.add_dm(room_id)
        facts: dict[str, Any] = {}
        if not created:
            invited = await self._make_sure_member_is_in(room_id, case.member_id)
            if isinstance(invited, Refused):
                return Outcome(
                    "failed",
                    {"why": "the member could not be invited to the DM room"},
                    {"dm_room": room_id},
                    error=str(invited),
                    case_fields={"dm_room_id": room_id},
                )
            facts["invited_again"] = invited
        content = self.tools.texts(render_notice, self.deployment.resources)
        # The notice and the progress together (a resumed attempt finds the room and the
        # message by their markers either way); m.direct after, off the member's path.
        sent, _ = await asyncio.gather(
            self.tools.send_once(run, room_id, content),
            run.save(progress={"dm_room": room_id}, case_fields={"dm_room_id": room_id})
            if run.progress.get("dm_room") != room_id
            else asyncio.sleep(0),
        )
        if created:
            await self.hs.remember_direct_room(case.member_id, room_id, known=direct)
        if isinstance(sent, Refused):
            return Outcome(
                "failed",
                {"why": "the notice could not be sent"},
                {"dm_room": room_id},
                error=str(sent),
            )
        return Outcome("done", facts | {"event": sent}, {"dm_room": room_id})

    async def _dm_room(
        self, run: StepRun
    ) -> tuple[str | Refused, dict[str, list[str]] | None, bool]:
        """(room id, the bot's m.direct as read, whether this attempt created the room)."""
        member = run.case.member_id
        assert member is not None
        known = run.progress.get("dm_room")
        if known:
            return known, None, False
        tag = run.marker("dm")
        if run.resumed:
            # The earlier attempt may have created the room and died before recording it.
            found = await self.hs.find_marked_room(tag)
            if found is not None:
                return found, None, False
        direct = await self.hs.direct_rooms()
        reusable = await self._reusable_dm(member, direct)
        if reusable is not None:
            return reusable, direct, False
        created = await self.hs.create_room(marker=tag, invite=[member], is_direct=True)
        if isinstance(created, Refused):
            return created, direct, False
        return created.room_id, direct, True

    async def _reusable_dm(self, member: str, direct: dict[str, list[str]]) -> str | None:
        """A DM the bot already has with the member, that both are still in."""
        for room_id in reversed(direct.get(member, [])):
            bot, theirs = await asyncio.gather(
                self.hs.membership(room_id, self.hs.bot_user_id),
                self.hs.membership(room_id, member),
            )
            if bot == "join" and theirs in PRESENT_IN_DM:
                return room_id
        return None

    async def _make_sure_member_is_in(self, room_id: str, member: str) -> bool | Refused:
        """True if the member had to be invited (again), False if they were there."""
        if await self.hs.membership(room_id, member) in PRESENT_IN_DM:
            return False
        invited = await self.hs.invite(room_id, member)
        if isinstance(invited, Refused):
            # A retried invite can be refused because the first one went through.
            if await self.hs.membership(room_id, member) in PRESENT_IN_DM:
                return True
            return invited
        return True
