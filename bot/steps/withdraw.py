"""A wrong flag undone (`!case N withdraw <why>`): an apology to the member, the way back
into the room, and staff told how it went.

The withdrawal itself (recorded, the case closed as withdrawn, the check-in
cancelled unless staff keep it) is the command's; these steps do what it needs
done on the homeserver, each once.
"""

from __future__ import annotations

from bot.core.ports import Refused
from bot.steps.base import CaseStep, Outcome, StepRun
from bot.steps.direct import NotToldByDm, tell_by_dm

WITHDRAW_STEPS = ["withdraw_apology", "withdraw_reinvite", "withdraw_report"]


class WithdrawApology(CaseStep):
    name = "withdraw_apology"

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        if case.dry_run or case.member_id is None:
            return Outcome.skipped("nobody was told anything (dry run)")
        # A DM of its own ("apology"), unless they are still in one with the bot: the
        # notice's room, marked "dm", may be one they have left (and its marker names it).
        # The apology invites a reply ("our staff team will see it"): it must reach them.
        content = self.tools.texts.withdrawn(room=await self.tools.place(case.room_id))
        result = await tell_by_dm(self.tools, run, case.member_id, "apology", content, "dm_room_id")
        if isinstance(result, NotToldByDm):
            return result.outcome("the member", "the apology")
        return Outcome(
            "done", {"event": result.told.event_id, "unencrypted": bool(result.plain_because)}
        )


class WithdrawReinvite(CaseStep):
    name = "withdraw_reinvite"

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        if case.dry_run or case.member_id is None or case.room_id is None:
            return Outcome.skipped("nobody was removed (dry run)")
        membership = await self.hs.membership(case.room_id, case.member_id)
        if membership in ("join", "invite"):
            return Outcome("done", {"already_back": True})
        invited = await self.hs.invite(case.room_id, case.member_id)
        if isinstance(invited, Refused):
            # Recorded, and staff told (withdraw_report says so): they can invite them.
            return Outcome.refused("the bot could not invite them back", invited)
        return Outcome("done", {"invited": True})


class WithdrawReport(CaseStep):
    name = "withdraw_report"
    requires = ("withdraw_apology", "withdraw_reinvite")

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        apology, back = run.steps["withdraw_apology"], run.steps["withdraw_reinvite"]
        _ = self.tools.texts.language._
        lines = [
            _("✔ Apology sent to the member")
            if apology.status == "done"
            else _("✘ No apology sent ({why})").format(
                why=apology.error or apology.result.get("why")
            ),
            _("✔ Invited back into the room")
            if back.status == "done"
            else _("✘ Not invited back ({why}): please invite them yourself").format(
                why=back.error or back.result.get("why")
            ),
        ]
        checkin = run.steps.get("checkin")
        if checkin is not None:
            lines.append(
                _("The check-in was cancelled.")
                if checkin.status == "skipped" and checkin.result.get("why") == "withdrawn"
                else _(" The check-in stays as planned.").strip()
            )
        content = self.tools.texts.withdrawal_done(
            case_number=case.id,
            by=run.progress.get("by") or _("staff"),
            why=run.progress.get("why") or _("(no reason given)"),
            outcomes="\n".join(lines),
            reply_to=case.alert_event_id,
        )
        sent = await self.tools.send_to_staff(run, content)
        if isinstance(sent, Refused):
            return Outcome.refused("the staff room refused the report", sent, retry=True)
        return Outcome("done", {"event": sent})
