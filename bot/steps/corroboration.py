"""corroboration: a second moderator's flag of a member with an open case is told to staff,
as a reply to the case's alert that itself says `Case #N`, who, and the reason given.

Armed again by each corroborating flag (bot/referral/decision.py); each is told once.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from bot.core.ports import Refused
from bot.steps.base import CaseStep, Outcome, StepRun
from bot.store import audit, cases


async def corroboration_due(conn: AsyncConnection, case_id: int, *, position: int) -> None:
    """A corroborating flag was recorded: the step runs again, and tells staff of every one
    on the record it has not told of (those it told of stay `told`)."""
    await cases.rearm_step(conn, case_id, "corroboration", position, lambda was: was)


class Corroboration(CaseStep):
    name = "corroboration"
    requires = ("alert",)

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        told: list[int] = list(run.progress.get("told", []))
        async with self.tools.db.connect() as conn:
            entries = {e.seq: e for e in await audit.entries(conn, case_id=case.id)}
        # Every corroborating flag on the record, in order: one recorded while an attempt
        # ran is not lost when that attempt saves its progress.
        pending = [seq for seq, e in entries.items() if e.kind == "corroborated"]
        member = await self.tools.person(case.member_id)
        for seq in pending:
            if seq in told:
                continue
            entry = entries[seq]
            personal = entry.personal or {}
            content = self.tools.texts.corroborated(
                case_number=case.id,
                flagger=await self.tools.person(personal.get("flagger")),
                member=member,
                method=entry.facts.get("method", "flag"),
                at=entry.at,
                reason=personal.get("reason"),
                reply_to=case.alert_event_id,
            )
            sent = await self.tools.send_to_staff(run, content, f"corroboration-{seq}")
            if isinstance(sent, Refused):
                return Outcome.refused("the staff room refused the message", sent, retry=True)
            told.append(seq)
            await run.save(progress=run.progress | {"told": told})
        return Outcome("done", {"told": len(told)})
