"""checkin: the next-day check-in, a private room with the member and staff, opened once.

Its due time was fixed when the flag arrived; the case row is the truth, so a
restart before the due time still opens it on time and a service that was down
at the due time opens it on return (and staff are told it is late). It needs
`schedule`, not the alert: a broken staff room must not hold back the member's
check-in. A crash while opening leaves one room (its marker is in its create
event), and a resumed attempt invites whoever the earlier one did not.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from bot.core.ports import Refused
from bot.steps.base import CaseStep, Outcome, StepRun
from bot.store.cases import Case, Step

# Later than this past its due time, a check-in was held up (the service was
# down), not by scheduling jitter: staff are told it is late.
LATE_AFTER = dt.timedelta(seconds=10)
PRESENT = frozenset({"join", "invite"})


def matrix_to(room_id: str) -> str:
    return f"https://matrix.to/#/{room_id}"


class Checkin(CaseStep):
    name = "checkin"
    requires = ("schedule",)

    def due(self, case: Case, steps: Mapping[str, Step]) -> dt.datetime | None:
        return case.due_at

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        # (Closing or withdrawing a case cancels its check-in, unless staff keep it.)
        if case.dry_run:
            return Outcome.skipped("dry run", would_open_at=str(case.due_at))
        if run.steps["schedule"].status != "done":
            return Outcome.skipped("the check-in was not scheduled")
        assert case.member_id is not None
        now = dt.datetime.now(dt.UTC)
        late = now - (case.due_at or now)
        room_id = run.progress.get("room")
        if room_id is None and run.resumed:
            room_id = await self.hs.find_marked_room(run.marker())
        made_plain = run.progress.get("plain_because")
        if room_id is None:
            made_plain = self.tools.plain_room_because()
            created = await self.hs.create_room(
                marker=run.marker(),
                invite=[],
                name=self.tools.texts.language._(self.deployment.checkin.room_name),
                encrypted=self.deployment.encrypt_private_rooms and made_plain is None,
            )
            if isinstance(created, Refused):
                return Outcome.refused("the room could not be created", created, retry=True)
            room_id = created.room_id
        self.tools.rooms.add_checkin(room_id)
        if run.progress.get("room") != room_id:
            progress = run.progress | {"room": room_id}
            if made_plain:
                progress["plain_because"] = made_plain
            await run.save(progress=progress, case_fields={"checkin_room_id": room_id})
        invited, not_invited = await self._invite_all(
            room_id, [case.member_id, *self.deployment.policy.staff]
        )
        staff_roles = (
            [self.tools.texts.language._("a member of our staff team")]
            if self.deployment.policy.staff
            else []
        )
        content = self.tools.texts.checkin(
            flagged_at=case.flagged_at, now=now, staff_roles=staff_roles
        )
        told = await self.tools.tell(run, room_id, content)
        if isinstance(told, Refused):
            # Done means the member finds the message there: retried, then failed (and the
            # staff notice says the check-in could not be opened, and why).
            return Outcome.refused("the check-in message could not be sent", told, retry=True)
        plain_because = told.plain_because or made_plain
        remove = run.steps.get("remove")
        facts: dict[str, Any] = {
            "late_seconds": round(late.total_seconds()) if late > LATE_AFTER else 0,
            # Late because the removal it follows waited for staff's decision past its
            # time (and opened as that was done), not because the service was away:
            # staff are told which.
            "waited_for_removal": bool(
                case.due_at
                and remove is not None
                and remove.progress.get("decided_by")
                and remove.finished_at is not None
                and remove.finished_at > case.due_at
                and now - remove.finished_at <= LATE_AFTER
            ),
            "message": told.event_id,
            "member_invited": case.member_id in invited,
        }
        personal: dict[str, Any] = {"room": room_id, "invited": invited, "not_invited": not_invited}
        if plain_because:
            facts["unencrypted"] = True
            personal["plain_because"] = plain_because
        return Outcome(
            "done",
            facts,
            personal,
            case_fields={"checkin_room_id": room_id, "checkin_opened_at": now},
        )

    async def _invite_all(self, room_id: str, users: list[str]) -> tuple[list[str], dict[str, str]]:
        invited: list[str] = []
        failed: dict[str, str] = {}
        for user in dict.fromkeys(users):
            if await self.hs.membership(room_id, user) in PRESENT:
                invited.append(user)
                continue
            result = await self.hs.invite(room_id, user)
            if isinstance(result, Refused):
                failed[user] = str(result)
            else:
                invited.append(user)
        return invited, failed
