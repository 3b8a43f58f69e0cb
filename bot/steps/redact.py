"""Leaving the room no trace of the flag: redact the 🚨 or the `!safeguard` message, and
(optionally) the flagged message itself, with a neutral reason — once the case is recorded.

Each redaction is checked before it is made again (an earlier attempt may have
done it). Refused flags are not redacted: they are not the bot's to act on.
A corroborating flag re-arms `redact_flag`, so it is removed too.
"""

from __future__ import annotations

from bot.core.ports import Refused
from bot.steps.base import CaseStep, Outcome, StepRun
from bot.store import audit

FLAG_KINDS = ("flagged", "corroborated")


class _Redact(CaseStep):
    requires = ("remove",)
    # Which personal field of a flag's entries names the event this step redacts.
    field: str
    setting: str

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        if not getattr(self.deployment.policy, self.setting):
            return Outcome.skipped(f"policy.{self.setting} is off")
        if case.dry_run:
            return Outcome.skipped("dry run")
        assert case.room_id is not None
        async with self.tools.db.connect() as conn:
            flags = [e for e in await audit.entries(conn, case_id=case.id) if e.kind in FLAG_KINDS]
        wanted = list(
            dict.fromkeys(
                e.personal[self.field]
                for e in flags
                if e.personal and isinstance(e.personal.get(self.field), str)
            )
        )
        done: list[str] = list(run.progress.get("redacted", []))
        reason = self.tools.texts.redaction_reason()
        for event_id in wanted:
            if event_id in done:
                continue
            if run.resumed and await self.hs.is_redacted(case.room_id, event_id):
                done.append(event_id)
                continue
            redacted = await self.hs.redact(
                case.room_id,
                event_id,
                reason=reason,
                txn_id=f"safeguard.{run.marker()}.{len(done)}",
            )
            if isinstance(redacted, Refused):
                return Outcome.refused(
                    "the bot could not redact it (does it have the redact power level?)",
                    redacted,
                    retry=True,
                )
            done.append(event_id)
            await run.save(progress=run.progress | {"redacted": done})
        return Outcome("done", {"redacted": len(done)}, {"events": done})


class RedactFlag(_Redact):
    name = "redact_flag"
    # Once the notice has had its go, not after the removal: a removal held for staff's
    # decision (the notice undeliverable) must not leave the room seeing who was flagged.
    requires = ("notify",)
    field = "flag_event"
    setting = "redact_flag"


class RedactMessage(_Redact):
    name = "redact_message"
    field = "flagged_event"
    setting = "redact_flagged_message"
