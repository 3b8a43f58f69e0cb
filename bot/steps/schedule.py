"""schedule: record when the check-in opens (fixed when the flag arrived)."""

from __future__ import annotations

from bot.steps.base import CaseStep, Outcome, StepRun


class Schedule(CaseStep):
    name = "schedule"
    # After the member is safe; not after the alert: a broken staff room must not
    # hold back the member's check-in.
    requires = ("remove",)

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        if case.due_at is None:
            return Outcome("failed", error="no check-in time could be computed")
        facts: dict[str, object] = {"due_at": case.due_at.isoformat()}
        if case.dry_run:
            facts["dry_run"] = True
        return Outcome("done", facts)
