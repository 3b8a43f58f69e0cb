"""After the check-in: staff are told where it is, and reminded if nobody picks it up.

Both are steps of their own so that neither the check-in waits for the staff
room nor a staff message is skipped: a staff room that cannot take them defers
them until it can.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from bot.core.ports import Refused
from bot.steps.base import CaseStep, Outcome, StepRun
from bot.steps.checkin import matrix_to
from bot.store.cases import Case, Step


class CheckinNotice(CaseStep):
    """Tell the staff room where the check-in is (or that it could not be opened)."""

    name = "checkin_notice"
    requires = ("checkin",)

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        checkin = run.steps["checkin"]
        if checkin.status == "skipped" and not case.dry_run:
            return Outcome.skipped(checkin.result.get("why", "no check-in"))
        room_id = checkin.result.get("room")
        late = checkin.result.get("late_seconds") or 0
        not_invited = (checkin.result.get("not_invited") or {}).get(case.member_id or "")
        texts = self.tools.texts
        if case.dry_run:
            content = texts.checkin_dry_run(case_number=case.id, due_at=case.due_at)
        elif checkin.status == "failed":
            content = texts.checkin_failed(case_number=case.id, error=checkin.error)
        else:
            content = texts.checkin_opened(
                case_number=case.id,
                link=matrix_to(room_id or ""),
                late_by=dt.timedelta(seconds=late) if late else None,
                member_not_invited=not_invited,
                waited_for_removal=bool(checkin.result.get("waited_for_removal")),
            )
        sent = await self.tools.send_to_staff(run, content)
        if isinstance(sent, Refused):
            return Outcome.refused("the staff room refused the notice", sent, retry=True)
        fields = {"checkin_notice_event_id": sent} if checkin.status == "done" else {}
        return Outcome("done", {"event": sent}, case_fields=fields)


class CheckinReminder(CaseStep):
    """Raise an unclaimed, unjoined check-in again in the staff room, once."""

    name = "checkin_reminder"
    requires = ("checkin", "checkin_notice")
    audit_kind = "checkin_reminded"

    def due(self, case: Case, steps: Mapping[str, Step]) -> dt.datetime | None:
        checkin = steps["checkin"]
        if checkin.status != "done" or checkin.finished_at is None:
            return None  # nothing to remind of: it runs at once, and skips
        return checkin.finished_at + self.deployment.checkin.remind_after

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        if run.steps["checkin"].status != "done":
            return Outcome.skipped("no check-in room was opened")
        # A closed case's check-in was cancelled with it (this step skipped), unless staff
        # kept it (`withdraw --keep-checkin`): a kept check-in is reminded of like any.
        if case.checkin_claimed_by or case.checkin_staff_joined_at:
            return Outcome.skipped("staff have it")
        content = self.tools.texts.checkin_reminder(
            case_number=case.id,
            link=matrix_to(case.checkin_room_id or ""),
            member_waiting=case.checkin_member_joined_at is not None,
        )
        sent = await self.tools.send_to_staff(run, content)
        if isinstance(sent, Refused):
            return Outcome.refused("the staff room refused the reminder", sent, retry=True)
        return Outcome(
            "done",
            {"event": sent, "sent": True},
            case_fields={"checkin_reminded_at": dt.datetime.now(dt.UTC)},
        )
