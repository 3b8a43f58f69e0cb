"""Every text the bot sends, filled in from its template — and never a stalled case over one.

`run` refuses a template that fails to render (bot.texts.templates.validate_templates),
so a failure here means something validation could not foresee. The text is
then sent with the built-in template at once, and the fall-back reported
(recorded, staff told) through `on_fallback`, once per template.

Staff texts name people as `Display Name (@user:server)` and rooms as
`Room name (!id:server)`, and give every time in `checkin.timezone`, named once.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from bot.config.deployment import Deployment
from bot.config.settings import MessageTemplates
from bot.texts.case_words import step_action_words, word
from bot.texts.catalogues import language
from bot.texts.templates import KICK_REASON_LIMIT, TemplateError, content, notice, render_text
from bot.texts.wording import (
    checkin_when,
    confidentiality_line,
    duration_words,
    emergency_line,
    emergency_resources,
    resource_lines,
    since_words,
    when,
)

log = logging.getLogger(__name__)
BUILT_IN = MessageTemplates()


@dataclass(frozen=True)
class StepState:
    """A step as staff are told of it: done, not yet (and why), failed (and why), held for
    their decision, or skipped."""

    state: Literal["done", "waiting", "failed", "held", "skipped"]
    why: str | None = None
    note: str | None = None  # about a done step: how it went ("sent unencrypted: ...")


def _reply(message: dict[str, Any], reply_to: str | None) -> dict[str, Any]:
    if reply_to:
        message["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
    return message


def _mentioning(message: dict[str, Any], users: Sequence[str]) -> dict[str, Any]:
    message["m.mentions"] = {"user_ids": list(users)}
    return message


class Texts:
    def __init__(
        self,
        deployment: Deployment,
        on_fallback: Callable[[str, str], None] = lambda name, problem: None,
    ) -> None:
        self._deployment = deployment
        self.messages = deployment.messages
        self._resources = deployment.resources
        self._zone = deployment.checkin.zone
        self._zone_name = deployment.checkin.timezone or "Europe/London"
        self._policy = deployment.policy
        self.language = language(deployment.language)
        self._ = self.language._
        self.on_fallback = on_fallback
        self._reported: set[str] = set()

    # ---- the rendering core ----------------------------------------------------------------

    def text(self, name: str, **values: Any) -> str:
        """Template `name` filled in; the built-in one if the configured one fails."""
        strings: Mapping[str, str] = {key: str(value) for key, value in values.items()}
        try:
            return render_text(self.messages, name, strings, self.language)
        except TemplateError as exc:
            log.error("%s; the built-in text was used instead", exc)
            if exc.name not in self._reported:
                self._reported.add(exc.name)
                self.on_fallback(exc.name, str(exc))
            return render_text(BUILT_IN, name, strings, self.language)

    def when(self, at: dt.datetime) -> str:
        return when(at, self._zone, self.language)

    def duration(self, delta: dt.timedelta) -> str:
        return duration_words(delta, self.language)

    def _emergency_contact(self) -> str:
        """How staff reach emergency services where this community is (its resources'
        emergency line: `call 911` in the US), never a number from elsewhere."""
        emergencies = emergency_resources(self._resources)
        if not emergencies:
            return self._("your local emergency number")
        return "; ".join(self.language.resource(r.contact) for r in emergencies)

    def _said(self, state: StepState) -> StepState:
        """A step state's own phrases (`not tried yet`) in this language; a reason
        recorded from elsewhere (the homeserver's, a step's) stays as recorded."""
        return replace(
            state,
            why=self._(state.why) if state.why else state.why,
            note=self._(state.note) if state.note else state.note,
        )

    # ---- to the member and the room ----------------------------------------------------

    def notice(self, due_at: dt.datetime | None, now: dt.datetime) -> dict[str, Any]:
        return content(
            self.text(
                "notice",
                resources=resource_lines(self._resources, self.language),
                emergency=emergency_line(self._resources, self.language),
                checkin_when=checkin_when(now, due_at, self._zone, self.language),
                confidentiality=confidentiality_line(
                    self._policy.confidentiality_url, self.language
                ),
            )
        )

    def checkin(
        self, *, flagged_at: dt.datetime, now: dt.datetime, staff_roles: Sequence[str]
    ) -> dict[str, Any]:
        return content(
            self.text(
                "checkin",
                resources=resource_lines(self._resources, self.language),
                emergency=emergency_line(self._resources, self.language),
                staff=self._(" and ").join(staff_roles)
                if staff_roles
                else self._("our staff team"),
                since=since_words(flagged_at, now, self._zone, self.language),
                confidentiality=confidentiality_line(
                    self._policy.confidentiality_url, self.language
                ),
            )
        )

    def removed_again(self, *, room: str) -> dict[str, Any]:
        return content(
            self.text(
                "removed_again",
                room=room,
                resources=resource_lines(self._resources, self.language),
                emergency=emergency_line(self._resources, self.language),
            )
        )

    def withdrawn(self, *, room: str, removed: bool = True) -> dict[str, Any]:
        """The apology for a wrong flag: for the removal, or (told, never removed) for the
        notice alone."""
        return content(self.text("withdrawn" if removed else "withdrawn_unremoved", room=room))

    def farewell(self) -> dict[str, Any]:
        """Where to get help now, as the bot leaves a conversation whose case is purged."""
        return content(
            self.text(
                "farewell",
                resources=resource_lines(self._resources, self.language),
                emergency=emergency_line(self._resources, self.language),
            )
        )

    def policy_explained(self) -> dict[str, Any]:
        """How safeguarding works here, to a member who sent `!policy`: nothing of any case."""
        return content(
            self.text(
                "policy_explained",
                resources=resource_lines(self._resources, self.language),
                emergency=emergency_line(self._resources, self.language),
                confidentiality=confidentiality_line(
                    self._policy.confidentiality_url, self.language
                ),
            )
        )

    def policy_room_reply(self) -> dict[str, Any]:
        """To someone who wrote in their `!policy` DM, which nobody reads."""
        return content(
            self.text(
                "policy_room_reply",
                resources=resource_lines(self._resources, self.language),
                emergency=emergency_line(self._resources, self.language),
            )
        )

    def kick_reason(self, *, notified: bool) -> str:
        name = "kick_reason" if notified else "kick_reason_unnotified"
        return self.text(name)[:KICK_REASON_LIMIT]

    def redaction_reason(self) -> str:
        return self.text("redaction_reason")[:KICK_REASON_LIMIT]

    def retention_redaction_reason(self) -> str:
        return self.text("retention_redaction_reason")[:KICK_REASON_LIMIT]

    def room_notice(self) -> dict[str, Any]:
        text = self.text(
            "room_notice",
            resources=resource_lines(self._resources, self.language),
            emergency=emergency_line(self._resources, self.language),
        )
        return content(text, "m.notice")

    def moderator_debrief(
        self,
        *,
        case_number: int,
        due_at: dt.datetime | None,
        now: dt.datetime,
        staff_alerted: bool = True,
    ) -> dict[str, Any]:
        return content(
            self.text(
                "moderator_debrief" if staff_alerted else "moderator_debrief_unalerted",
                case=case_number,
                checkin_when=checkin_when(now, due_at, self._zone, self.language),
                support=self._(self._policy.moderator_support),
            )
        )

    # ---- to staff ------------------------------------------------------------------------

    def alert(
        self,
        *,
        case_number: int,
        member: str,
        room: str,
        flagger: str,
        flagged_at: dt.datetime,
        method: str,
        reason: str | None,
        notice: StepState,
        removal: StepState,
        late_by: dt.timedelta | None,
        due_at: dt.datetime | None,
        dry_run: bool,
    ) -> dict[str, Any]:
        _ = self._
        notice, removal = self._said(notice), self._said(removal)
        if dry_run:
            status_line = _(" — DRY RUN: the member was not messaged or removed")
            outcomes = _("Nothing was sent to the member and no one was removed (dry run).")
        else:
            status_line = {
                "failed": _(" — member was NOT notified: {why}"),
                "waiting": _(" — member NOT notified yet: {why}"),
            }.get(notice.state, "").format(why=notice.why)
            outcomes = "\n".join(
                [self._notice_line(notice, removal), self._removal_line(case_number, removal)]
            )
        if due_at is None:
            checkin = _("Check-in: could not be scheduled — arrange it by hand.")
        elif dry_run:
            checkin = _("Check-in would open {when} (dry run: it will not).")
        elif removal.state == "held":
            # The check-in follows the removal: it waits for staff's decision too.
            checkin = _(
                "Check-in room opens {when} at the earliest: it waits for your decision "
                "on the removal."
            )
        else:
            checkin = _("Check-in room opens {when}.")
        checkin = checkin.format(when=self.when(due_at) if due_at else "")
        checklist = _(
            "If a life may be at immediate risk:\n"
            "☐ Contact emergency services ({emergency}) and give them what you know (the "
            "member's details from your records)\n"
            "☐ Record it: !case {case} es <reference> [service]\n"
            "☐ Acknowledge this alert: react ✅ or write !case {case} ack\n"
            "☐ Notes: !case {case} note <text> — the whole case: !case {case}"
        ).format(case=case_number, emergency=self._emergency_contact())
        return content(
            self.text(
                "alert",
                case=case_number,
                status_line=status_line,
                member=member,
                room=room,
                flagger=flagger,
                when=self.when(flagged_at),
                method=word(method, self.language),
                reason=reason or _("(none given)"),
                outcomes=outcomes,
                late=_(" — arrived {delay} late").format(delay=self.duration(late_by))
                if late_by
                else "",
                checkin=checkin,
                checklist=checklist,
                zone=self._zone_name,
            ),
            "m.notice",
        )

    def _notice_line(self, notice: StepState, removal: StepState) -> str:
        _ = self._
        if notice.state == "done":
            before = removal.state == "done" and not removal.note
            if notice.note:
                line = (
                    _("✔ Member notified by DM, before removal — sent UNENCRYPTED ({why})")
                    if before
                    else _("✔ Member notified by DM — sent UNENCRYPTED ({why})")
                )
                return line.format(why=notice.note)
            return (
                _("✔ Member notified by DM, before removal")
                if before
                else _("✔ Member notified by DM")
            )
        if notice.state == "waiting":
            return _(
                "… Member NOT notified yet ({why}): still trying; I'll reply here when they are"
            ).format(why=notice.why)
        if notice.state == "skipped":
            return _("– Member not notified: {why}").format(why=notice.why)
        return _("✘ Member was NOT notified ({why}): please reach them another way").format(
            why=notice.why
        )

    def _removal_line(self, case_number: int, removal: StepState) -> str:
        _ = self._
        if removal.state == "done":
            if removal.note:
                return _("✘ Not removed: {why}").format(why=removal.note)
            return _("✔ Removed from the room")
        if removal.state == "held":
            return _(
                "⏸ Not removed: they have not been told, so the removal waits for your "
                "decision: !case {case} remove removes them without the notice; "
                "!case {case} notify tries telling them again"
            ).format(case=case_number)
        if removal.state == "waiting":
            return _("… Not removed yet ({why}): I'll reply here when they are").format(
                why=removal.why
            )
        if removal.state == "skipped":
            return _("– Not removed: {why}").format(why=removal.why)
        return _("✘ Not removed: {why}").format(why=removal.why or _("unknown reason"))

    def step_update(
        self,
        *,
        case_number: int,
        step: str,
        status: str,
        facts: Mapping[str, Any],
        error: str | None,
        removed: bool,
        reply_to: str | None,
    ) -> dict[str, Any]:
        """What became of the notice or the removal after the alert went (a reply to it)."""
        _ = self._
        why = error or facts.get("why")
        if step == "notify":
            if status == "done":
                update = (
                    _(
                        "the member has now been notified by DM (sent unencrypted: encryption "
                        "was failing)."
                    )
                    if facts.get("unencrypted")
                    else _("the member has now been notified by DM.")
                )
            elif removed:
                update = _(
                    "the member could NOT be notified ({why}). Please reach them another way; "
                    "!case {case} notify tries again."
                )
            else:
                update = _(
                    "the member could NOT be notified ({why}). They have not been removed: "
                    "!case {case} remove removes them without the notice; !case {case} notify "
                    "tries telling them again. Please reach them another way."
                )
        elif status == "done":
            if facts.get("already_gone"):
                update = _("they had already left the room.")
            elif facts.get("staff_decision"):
                update = _(
                    "they have now been removed from the room, without the notice, as staff "
                    "decided."
                )
            else:
                update = _("they have now been removed from the room.")
        else:
            update = _("they could NOT be removed ({why}): please do it by hand.")
        update = update.format(why=why, case=case_number)
        return notice(self.text("step_update", case=case_number, update=update), reply_to=reply_to)

    def encryption_failing(self, *, case_number: int | None) -> dict[str, Any]:
        """Sent in the clear into an encrypted staff room: no detail, only where to look."""
        what = (
            self._("Case #{case} needs you").format(case=case_number)
            if case_number
            else self._("Messages for staff are waiting")
        )
        return notice(self.text("encryption_failing", what=what))

    def encryption_broken(self, *, why: str | None) -> dict[str, Any]:
        """Staff told once that the bot's encryption stopped (why), or works again (None)."""
        if why is None:
            return notice(self.text("encryption_repaired"))
        return notice(self.text("encryption_broken", why=why))

    def alert_again(self, *, case_number: int, waited: dt.timedelta) -> dict[str, Any]:
        staff = list(self._policy.staff)
        who = f"{' '.join(staff)}: " if staff else ""
        return _mentioning(
            notice(
                self.text("alert_again", case=case_number, waited=self.duration(waited), staff=who)
            ),
            staff,
        )

    def corroborated(
        self,
        *,
        case_number: int,
        flagger: str,
        member: str,
        method: str,
        at: dt.datetime,
        reason: str | None,
        reply_to: str | None,
    ) -> dict[str, Any]:
        text = self.text(
            "corroborated",
            case=case_number,
            flagger=flagger,
            member=member,
            method=word(method, self.language),
            when=self.when(at),
            reason=reason or self._("(none given)"),
        )
        return notice(text, reply_to=reply_to)

    def rejoined(
        self, *, case_number: int, member: str, room: str, removing: bool, reply_to: str | None
    ) -> dict[str, Any]:
        action = (
            self._(
                "As policy.on_rejoin is `remove`, I am removing them again, as discreetly as "
                "before."
            )
            if removing
            else self._(
                "They were not removed again: please decide what to do, and reach out to them."
            )
        )
        text = self.text("rejoined", case=case_number, member=member, room=room, action=action)
        return notice(text, reply_to=reply_to)

    def relay(self, *, case_number: int, member: str, text: str, where: str) -> dict[str, Any]:
        said = {
            "DM": self._("replied to the notice"),
            "debrief": self._("(the moderator who flagged) replied to their debrief"),
        }.get(where) or self._("wrote in the check-in room")
        waiting = (
            self._(" (no one from staff has joined it yet)") if where == "check-in room" else ""
        )
        return notice(
            self.text(
                "relay", case=case_number, member=member, said=said, waiting=waiting, text=text
            )
        )

    def checkin_opened(
        self,
        *,
        case_number: int,
        link: str,
        late_by: dt.timedelta | None,
        member_not_invited: str | None,
        waited_for_removal: bool = False,
    ) -> dict[str, Any]:
        why_late = (
            self._("It opened {delay} late: it waited for the removal to be decided.")
            if waited_for_removal
            else self._("It opened {delay} late (the service was unavailable).")
        )
        late = "\n" + why_late.format(delay=self.duration(late_by)) if late_by else ""
        not_invited = (
            "\n"
            + self._(
                "The member could NOT be invited ({why}): please reach them another way."
            ).format(why=member_not_invited)
            if member_not_invited
            else ""
        )
        return notice(
            self.text(
                "checkin_opened",
                case=case_number,
                link=link,
                late=late,
                not_invited=not_invited,
            )
        )

    def checkin_failed(self, *, case_number: int, error: str | None) -> dict[str, Any]:
        return notice(
            self.text("checkin_failed", case=case_number, error=error or self._("unknown"))
        )

    def checkin_dry_run(self, *, case_number: int, due_at: dt.datetime | None) -> dict[str, Any]:
        at = self.when(due_at) if due_at else self._("now")
        return notice(self.text("checkin_dry_run", case=case_number, when=at))

    def checkin_reminder(
        self, *, case_number: int, link: str, member_waiting: bool
    ) -> dict[str, Any]:
        staff = list(self._policy.staff)
        waiting = self._(" The member has joined and is waiting.") if member_waiting else ""
        text = self.text(
            "checkin_reminder",
            case=case_number,
            staff=f"{' '.join(staff)}: " if staff else "",
            link=link,
            waiting=waiting,
        )
        return _mentioning(notice(text), staff)

    def withdrawal_done(
        self, *, case_number: int, by: str, why: str, outcomes: str, reply_to: str | None
    ) -> dict[str, Any]:
        text = self.text("withdrawal_done", case=case_number, by=by, why=why, outcomes=outcomes)
        return notice(text, reply_to=reply_to)

    def flag_found_late(
        self, *, flagged_at: dt.datetime, room: str, flagger: str, member: str | None
    ) -> dict[str, Any]:
        return notice(
            self.text(
                "flag_found_late",
                when=f"{self.when(flagged_at)} ({self._zone_name})",
                room=room,
                flagger=flagger,
                member=member or self._("someone whose message could not be read"),
            )
        )

    def unread_notice(
        self,
        *,
        case_number: int,
        member: str,
        sent_at: dt.datetime,
        waited: dt.timedelta,
        reply_to: str | None,
    ) -> dict[str, Any]:
        """The member has not read their notice (no read receipt on or after it) by now."""
        text = self.text(
            "unread_notice",
            case=case_number,
            member=member,
            waited=self.duration(waited),
            sent=f"{self.when(sent_at)} ({self._zone_name})",
        )
        return notice(text, reply_to=reply_to)

    def step_failed(
        self, *, case_number: int, step: str, error: str | None, reply_to: str | None
    ) -> dict[str, Any]:
        text = self.text(
            "step_failed",
            case=case_number,
            step=step_action_words(step, self.language),
            error=f" ({error})" if error else "",
        )
        return notice(text, reply_to=reply_to)

    def refusal(
        self, *, code: str, detail: str, room: str, flagger: str, method: str, member: str | None
    ) -> dict[str, Any]:
        return notice(
            self.text(
                "refusal",
                code=code,
                detail=detail,
                room=room,
                flagger=flagger,
                method=word(method, self.language),
                member=self._(" — member: {member}").format(member=member) if member else "",
            )
        )

    def refusals_summary(
        self, *, kind: str, actor: str, room: str, count: int, since: dt.datetime
    ) -> dict[str, Any]:
        if kind == "undecryptable":
            return notice(
                self.text(
                    "undecryptable_summary",
                    count=count,
                    sender=actor,
                    room=room,
                    since=f"{self.when(since)} ({self._zone_name})",
                )
            )
        what = {
            "flag": self._("flag(s)"),
            "tombstone": self._("upgrade notice(s) (tombstones) I ignored"),
        }.get(kind) or self._("invite(s) of the bot")
        return notice(
            self.text(
                "refusals_summary",
                count=count,
                what=what,
                actor=actor,
                room=room,
                since=f"{self.when(since)} ({self._zone_name})",
            )
        )

    def invite_refused(self, *, inviter: str, room: str) -> dict[str, Any]:
        return notice(self.text("invite_refused", inviter=inviter, room=room))

    def _powers(self, can_kick: bool | None, can_redact: bool | None) -> str:
        _ = self._
        kick = (
            _("I can remove members there.")
            if can_kick
            else _(
                "I CANNOT remove members there: give me a power level at or above the kick "
                "level, or flags there will be recorded but nobody can be removed."
            )
        )
        redact = (
            _("I can remove the flags themselves once recorded.")
            if can_redact
            else _(
                "I CANNOT redact there: flags (the 🚨, the command) will stay visible to the "
                "room; give me the redact power level."
            )
        )
        return f"{kick} {redact}"

    def room_joined(
        self, *, inviter: str, room: str, can_kick: bool | None, can_redact: bool | None
    ) -> dict[str, Any]:
        powers = self._powers(can_kick, can_redact)
        return notice(self.text("room_joined", inviter=inviter, room=room, powers=powers))

    def room_whose(self, *, inviter: str, room: str, room_id: str) -> dict[str, Any]:
        return notice(self.text("room_whose", inviter=inviter, room=room, room_id=room_id))

    def room_claimed_twice(self, *, room: str, owner: str, claimant: str) -> dict[str, Any]:
        return notice(self.text("room_claimed_twice", room=room, owner=owner, claimant=claimant))

    def join_failed(self, *, inviter: str, room: str, error: str) -> dict[str, Any]:
        return notice(self.text("join_failed", inviter=inviter, room=room, error=error))

    def room_upgraded(
        self,
        *,
        by: str,
        old: str,
        new: str,
        cases: int,
        can_kick: bool | None,
        can_redact: bool | None,
    ) -> dict[str, Any]:
        moved = (
            self._(
                "The {count} open case(s) of that room carry on there: a member with one who "
                "joins the new room is treated as coming back (policy.on_rejoin). "
            ).format(count=cases)
            if cases
            else ""
        )
        powers = self._powers(can_kick, can_redact)
        return notice(
            self.text("room_upgraded", by=by, old=old, new=new, cases=moved, powers=powers)
        )

    def upgrade_join_failed(self, *, by: str, old: str, new: str, error: str) -> dict[str, Any]:
        return notice(self.text("upgrade_join_failed", by=by, old=old, new=new, error=error))

    def tombstone_ignored(self, *, sender: str, room: str, why: str) -> dict[str, Any]:
        return notice(self.text("tombstone_ignored", sender=sender, room=room, why=why))

    def room_removed(self, *, by: str, room: str) -> dict[str, Any]:
        return notice(self.text("room_removed", by=by, room=room))

    def space_removed(self, *, by: str, space: str) -> dict[str, Any]:
        return notice(self.text("space_removed", by=by, space=space))

    def powers_lost(
        self, *, room: str, can_kick: bool | None, can_redact: bool | None
    ) -> dict[str, Any]:
        powers = self._powers(can_kick, can_redact)
        return notice(self.text("powers_lost", room=room, powers=powers))

    def moderation_unseated(self, *, moderator: str, room: str, why: str) -> dict[str, Any]:
        return notice(self.text("moderation_unseated", moderator=moderator, room=room, why=why))

    def moderation_seated(self, *, moderator: str, room: str) -> dict[str, Any]:
        return notice(self.text("moderation_seated", moderator=moderator, room=room))

    def processing_failed(self, *, event_id: str, room: str) -> dict[str, Any]:
        return notice(self.text("processing_failed", event=event_id, room=room))

    def undecryptable(self, *, sender: str, room: str) -> dict[str, Any]:
        return notice(self.text("undecryptable", sender=sender, room=room))

    def former_member_wrote(self) -> dict[str, Any]:
        """Staff told that someone wrote in a purged case's conversation: no one named."""
        return notice(self.text("former_member_wrote"))

    def template_fallback(self, *, name: str, problem: str) -> dict[str, Any]:
        return notice(self.text("template_fallback", name=name, problem=problem))
