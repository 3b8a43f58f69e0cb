"""A wrong flag undone (`!case N withdraw <why>`): an apology to the member, the way back
into the room, and staff told how it went.

The withdrawal itself (recorded, the case closed as withdrawn, the check-in
cancelled unless staff keep it) is the command's; these steps do what it needs
done on the homeserver, each once.
"""

from __future__ import annotations

from collections.abc import Callable

from bot.core.ports import Refused
from bot.steps.base import CaseStep, Outcome, StepRun
from bot.steps.direct import NotToldByDm, tell_by_dm
from bot.store.cases import Step

WITHDRAW_STEPS = ["withdraw_apology", "withdraw_reinvite", "withdraw_report"]


class WithdrawApology(CaseStep):
    name = "withdraw_apology"
    # What they are apologised for is what happened: the notice and the removal, each
    # over (done, or skipped as the case closed) before a word is chosen; and the way
    # back, which the apology says was given.
    requires = ("notify", "remove", "withdraw_reinvite")

    async def run(self, run: StepRun) -> Outcome:
        case = run.case
        if case.dry_run or case.member_id is None:
            return Outcome.skipped("nobody was told anything (dry run)")
        notify, remove = run.steps.get("notify"), run.steps.get("remove")
        told = notify is not None and notify.status == "done"
        removed = (
            remove is not None and remove.status == "done" and not remove.result.get("already_gone")
        )
        if not told and not removed:
            # Withdrawn before anything reached them: an apology would be the first they
            # hear of a flag that was a mistake.
            return Outcome.skipped("the member was neither told nor removed")
        room = await self.tools.room_as_members_know_it(case.room_id)
        # A DM of its own ("apology"), unless they are still in one with the bot: the
        # notice's room, marked "dm", may be one they have left (and its marker names it).
        # The apology invites a reply ("our staff team will see it"): it must reach them.
        content = self.tools.texts.withdrawn(room=room, removed=removed)
        result = await tell_by_dm(self.tools, run, case.member_id, "apology", content, "dm_room_id")
        if isinstance(result, NotToldByDm):
            return result.outcome("the member", "the apology")
        return Outcome(
            "done", {"event": result.told.event_id, "unencrypted": bool(result.plain_because)}
        )


class WithdrawReinvite(CaseStep):
    name = "withdraw_reinvite"
    requires = ("remove",)  # after the removal is over: never before a kick still to come

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
            _apology_line(apology, _),
            _way_back_line(back, _),
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


def _apology_line(apology: Step, _: Callable[[str], str]) -> str:
    if apology.status == "done":
        return _("✔ Apology sent to the member")
    why = apology.error or apology.result.get("why")
    if apology.status == "skipped":
        return _("No apology sent: {why}").format(why=why)
    return _("✘ No apology sent ({why})").format(why=why)


def _way_back_line(back: Step, _: Callable[[str], str]) -> str:
    if back.status == "done":
        if back.result.get("already_back"):
            return _("✔ Still in the room, or invited back already")
        return _("✔ Invited back into the room")
    return _("✘ Not invited back ({why}): please invite them yourself").format(
        why=back.error or back.result.get("why")
    )
