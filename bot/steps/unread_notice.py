"""unread_notice: staff told, once, in a reply to the alert, that the member has not
opened the notice `policy.unread_notice_after` after it was sent.

Whether they read it is known by their read receipt (bot/intake/notice_reads.py). A step,
so the engine's timer brings it due, a restart keeps it, and a resumed attempt finds
its reply by its marker instead of sending a second one. Nothing is said if they read
it, if the case was closed or withdrawn meanwhile, or with the setting off.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from bot.core.ports import Refused
from bot.steps.base import CaseStep, Outcome, StepRun
from bot.store.cases import Case, Step


def unread_deadline(notify: Step | None, after: dt.timedelta | None) -> dt.datetime | None:
    """When staff are told the notice is unread (None: never: off, or no notice sent)."""
    if after is None or notify is None or notify.status != "done" or notify.finished_at is None:
        return None
    return notify.finished_at + after


def why_not_tell(case: Case, steps: Mapping[str, Step], after: dt.timedelta | None) -> str | None:
    """Why staff are not told (None: they are)."""
    if after is None:
        return "policy.unread_notice_after is off"
    if case.dry_run:
        return "dry run"
    if unread_deadline(steps.get("notify"), after) is None:
        return "no notice was sent"
    alert = steps.get("alert")
    if alert is None or alert.status != "done" or not case.alert_event_id:
        return "no staff alert to reply to"
    if case.notice_read_at is not None:
        return "the member read the notice"
    if case.state != "open":
        return "the case is closed"
    return None


class UnreadNotice(CaseStep):
    name = "unread_notice"
    # A reply to the alert, about the notice.
    requires = ("notify", "alert")
    # Not a step staff must see fail twice: one more try if the staff room refused it.
    retries = 1

    def due(self, case: Case, steps: Mapping[str, Step]) -> dt.datetime | None:
        # No deadline (off, or no notice): it runs at once, and skips.
        return unread_deadline(steps.get("notify"), self.deployment.policy.unread_notice_after)

    async def run(self, run: StepRun) -> Outcome:
        case, after = run.case, self.deployment.policy.unread_notice_after
        why = why_not_tell(case, run.steps, after)
        if why is not None:
            facts = {}
            if case.notice_read_at is not None:
                facts["read_at"] = case.notice_read_at.isoformat()
            return Outcome.skipped(why, **facts)
        assert after is not None
        notify = run.steps["notify"]
        assert notify.finished_at is not None
        content = self.tools.texts.unread_notice(
            case_number=case.id,
            member=await self.tools.person(case.member_id),
            sent_at=notify.finished_at,
            waited=dt.datetime.now(dt.UTC) - notify.finished_at,
            reply_to=case.alert_event_id,
        )
        sent = await self.tools.send_to_staff(run, content)
        if isinstance(sent, Refused):
            return Outcome.refused("the staff room refused the reply", sent, retry=True)
        return Outcome("done", {"event": sent})
