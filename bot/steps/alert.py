"""alert: tell staff everything they need to act, including informing emergency services.

The alert states only what was verified: "notified" and "removed" come from the
steps' recorded outcomes. Staff must hear of every case, so a staff room that
cannot take the alert (not resolved, the bot not allowed to post) defers it —
/health says why — and if it has waited longer than `policy.ack_within` the
alert webhook is paged once. A refusal that is not about the room is retried,
then recorded as failed: the webhook is paged and /health names the case.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from bot.ports import Refused
from bot.steps.base import CaseStep, Outcome, StepRun
from bot.store import audit
from bot.store.cases import Step

log = logging.getLogger(__name__)
# A flag that reaches us later than this is reported as late in the staff alert.
LATE_AFTER = dt.timedelta(seconds=60)


def not_notified_why(notify: Step) -> str | None:
    if notify.status == "done":
        return None
    return notify.error or notify.result.get("why") or "not attempted"


def removal_note(remove: Step) -> str | None:
    if remove.error:
        return remove.error
    if remove.result.get("already_gone"):
        return "they had already left the room"
    return None


class Alert(CaseStep):
    name = "alert"
    requires = ("notify", "remove")

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        self.tools.staff_room.require()  # before reading anything: the alert waits for it
        notify, remove = run.steps["notify"], run.steps["remove"]
        async with self.tools.db.connect() as conn:
            first = await audit.first_of_case(conn, case.id)
        personal = (first.personal if first else None) or {}
        late = case.received_at - case.flagged_at
        member, room, flagger = await asyncio.gather(
            self.tools.person(case.member_id),
            self.tools.place(case.room_id),
            self.tools.person(personal.get("flagger")),
        )
        content = self.tools.texts.alert(
            case_number=case.id,
            member=member,
            room=room,
            flagger=flagger,
            flagged_at=case.flagged_at,
            method=first.facts.get("method", "") if first else "",
            reason=personal.get("reason"),
            notified=notify.status == "done",
            not_notified_why=not_notified_why(notify),
            removed=remove.status == "done" and not remove.result.get("already_gone"),
            removal_note=removal_note(remove),
            late_by=late if late > LATE_AFTER else None,
            due_at=case.due_at,
            dry_run=case.dry_run,
        )
        sent = await self.tools.send_to_staff(run, content)
        if isinstance(sent, Refused):
            return Outcome.refused("the staff room refused the alert", sent, retry=True)
        return Outcome("done", {"event": sent}, case_fields={"alert_event_id": sent})

    async def deferred(self, run: StepRun, why: str) -> None:
        """Waiting too long for the staff room: page someone, once."""
        waited = dt.datetime.now(dt.UTC) - run.case.received_at
        url = self.deployment.policy.alert_webhook
        if not url or waited < self.deployment.policy.ack_within or run.progress.get("paged"):
            return
        problem = await self.tools.webhook.post_json(
            url,
            {
                "event": "safeguard.alert_undelivered",
                "case": run.case.id,
                "waiting_seconds": int(waited.total_seconds()),
                "text": f"Safeguarding case #{run.case.id}: the staff room cannot take its "
                "alert. Check the service's /health now.",
            },
        )
        if problem:
            log.error("case #%d: paging about the waiting alert failed: %s", run.case.id, problem)
        await run.save(progress=run.progress | {"paged": True, "page_error": problem})
