"""escalate: an alert nobody acknowledged within `policy.ack_within` is raised again, once.

In the staff room, mentioning staff, and — when `policy.alert_webhook` is set —
POSTed for an on-call pager. Nothing is raised for a case already dealt with:
closed, or acknowledged (✅, `ack`), or acted on (`es`, a note, a claim, staff
joining the check-in) — see `cases.dealt_with_at`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from bot.core.ports import Refused
from bot.steps.base import CaseStep, Outcome, StepRun
from bot.store.cases import Case, Step


class Escalate(CaseStep):
    name = "escalate"
    requires = ("alert",)
    audit_kind = "alert_raised_again"

    def due(self, case: Case, steps: Mapping[str, Step]) -> dt.datetime | None:
        alert = steps["alert"]
        if alert.status != "done" or alert.finished_at is None:
            return None  # no alert to raise again: it runs at once, and skips
        return alert.finished_at + self.deployment.policy.ack_within

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        alert = run.steps["alert"]
        if alert.status != "done":
            return Outcome.skipped("the alert was not sent")
        if case.state == "closed":
            return Outcome.skipped("the case is closed")
        if case.alert_acked_by or case.dealt_with_at:
            return Outcome.skipped("staff have dealt with it")
        assert alert.finished_at is not None
        waited = dt.datetime.now(dt.UTC) - alert.finished_at
        webhook_problem: str | None = None
        url = self.deployment.policy.alert_webhook
        if url and not run.progress.get("paged"):
            webhook_problem = await self.tools.webhook.post_json(
                url,
                {
                    "event": "safeguard.alert_unacknowledged",
                    "case": case.id,
                    "unacknowledged_for_seconds": int(waited.total_seconds()),
                    "text": f"Safeguarding case #{case.id} has not been acknowledged.",
                },
            )
            await run.save(progress=run.progress | {"paged": True})
        content = self.tools.texts.alert_again(case_number=case.id, waited=waited)
        sent = await self.tools.send_to_staff(run, content)
        facts = {"webhook": bool(url), "webhook_error": webhook_problem}
        if isinstance(sent, Refused):
            return Outcome("failed", facts, error=str(sent), retry=True)
        return Outcome(
            "done",
            facts | {"event": sent},
            case_fields={"alert_raised_again_at": dt.datetime.now(dt.UTC)},
        )
