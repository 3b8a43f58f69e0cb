"""rejoin: the member came back into the group room while their case is open — staff are
told at once, as a reply to the case alert (and, with `policy.on_rejoin: remove`, that the
bot is removing them again: the `remove_again` step). Armed again on each return."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from bot.core.ports import Refused
from bot.steps.base import CaseStep, Outcome, StepRun
from bot.store import cases


async def rejoin_due(conn: AsyncConnection, case_id: int, *, removing: bool, position: int) -> None:
    await cases.rearm_step(
        conn,
        case_id,
        "rejoin",
        position,
        lambda was: {"returns": int(was.get("returns", 0)) + 1, "removing": removing},
    )


class Rejoin(CaseStep):
    name = "rejoin"

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        returns = int(run.progress.get("returns", 1))
        member, room = await self.tools.person(case.member_id), await self.tools.place(case.room_id)
        content = self.tools.texts.rejoined(
            case_number=case.id,
            member=member,
            room=room,
            removing=bool(run.progress.get("removing")),
            reply_to=case.alert_event_id,
        )
        sent = await self.tools.send_to_staff(run, content, f"rejoin-{returns}")
        if isinstance(sent, Refused):
            return Outcome.refused("the staff room refused the message", sent, retry=True)
        return Outcome("done", {"event": sent, "returns": returns})
