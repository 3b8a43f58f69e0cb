"""escalate: an alert nobody acknowledged within `policy.ack_within` is raised again, once.

In the staff room, mentioning staff, and — when `policy.alert_webhook` is set —
POSTed for an on-call pager. Nothing is raised for a case already dealt with.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from bot.ports import Refused
from bot.steps.base import CaseStep, Outcome, StepRun
from bot.store.cases import Case, Step
from bot.templates import render_alert_again


class Escalate(CaseStep):
    name = "escalate"
    requires = ("alert",)
    audit_kind = "alert_raised_again"

    def due(self, case: Case, steps: Mapping[str, Step]) -> dt.datetime | None:
        sent = steps["alert"].finished_at
        return sent + self.deployment.policy.ack_within if sent else None

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        alert = run.steps["alert"]
        if alert.status != "done":
            return Outcome.skipped("the alert was not sent")
        if case.state == "closed":
            return Outcome.skipped("the case is closed")
        if case.alert_acked_by:
            return Outcome.skipped("the alert was acknowledged")
        assert alert.finished_at is not None
        waited = dt.datetime.now(dt.UTC) - alert.finished_at
        staff = list(self.deployment.policy.staff)
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
        content = render_alert_again(case_number=case.id, waited=waited, staff=staff)
        sent = await self.tools.send_to_staff(run, content)
        facts = {"webhook": bool(url), "webhook_error": webhook_problem}
        if isinstance(sent, Refused):
            return Outcome("failed", facts, error=str(sent), retry=True)
        return Outcome(
            "done",
            facts | {"event": sent},
            case_fields={"alert_raised_again_at": dt.datetime.now(dt.UTC)},
        )
