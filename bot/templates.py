"""Every message the bot sends: configurable templates with defaults good enough to ship.

Member-facing texts are short lines in plain words, readable on a phone, in
the order the policy requires. Templates use `{placeholder}` names (listed in
PLACEHOLDERS); `validate_templates` reports unknown ones at config check, so a
typo never reaches a member.
"""

from __future__ import annotations

import datetime as dt
import html
import string
from collections.abc import Mapping, Sequence
from typing import Any

from bot.settings import MessageTemplates, Resource

DEFAULTS: dict[str, str] = {
    "notice": (
        "We're worried about you.\n"
        "Because of what you shared, we think you may be at immediate risk.\n"
        "\n"
        "For your safety, we're moving you out of the group chat for now.\n"
        "This is not a punishment, and you are not in trouble.\n"
        "\n"
        "If your life is in danger right now, call 999 or go to A&E.\n"
        "\n"
        "These services can talk with you now:\n"
        "{resources}\n"
        "\n"
        "We may contact emergency services to make sure you are safe.\n"
        "Someone from our staff team will message you tomorrow to check in.\n"
        "You can reply here at any time: our staff team will see it."
    ),
    "kick_reason": (
        "We're worried about you and have moved you out of the group for your safety. "
        "Please read the message we sent you."
    ),
    "kick_reason_unnotified": (
        "We're worried about you and have moved you out of the group for your safety. "
        "If your life is in danger call 999 or go to A&E. "
        "Please check your messages from the Safeguarding bot."
    ),
    "room_notice": (
        "A member has been moved out of this room for their safety. They are being looked after.\n"
        "If anything here has affected you, these services can talk now:\n"
        "{resources}"
    ),
    "checkin": (
        "Hi, it's {staff} here.\n"
        "We're checking in after yesterday, to see how you are and talk through what happened.\n"
        "There's no rush: reply whenever you're ready.\n"
        "\n"
        "If you need someone right now:\n"
        "{resources}"
    ),
}
PLACEHOLDERS: dict[str, frozenset[str]] = {
    "notice": frozenset({"resources"}),
    "kick_reason": frozenset(),
    "kick_reason_unnotified": frozenset(),
    "room_notice": frozenset({"resources"}),
    "checkin": frozenset({"resources", "staff"}),
    "alert": frozenset(
        {
            "case",
            "status_line",
            "member",
            "room",
            "flagger",
            "when",
            "method",
            "reason",
            "outcomes",
            "late",
            "checkin",
            "checklist",
        }
    ),
}
DEFAULTS["alert"] = (
    "Case #{case}{status_line}\n"
    "Member: {member}\n"
    "Room: {room}\n"
    "Flagged by {flagger} ({method}) at {when}{late}\n"
    "Reason given: {reason}\n"
    "{outcomes}\n"
    "{checkin}\n"
    "\n"
    "{checklist}"
)
KICK_REASON_LIMIT = 300


class TemplateError(Exception):
    """A configured template could not be rendered; the built-in text is used instead."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"messages.{name}: {detail}")
        self.name = name


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def validate_templates(messages: MessageTemplates) -> list[str]:
    """Every problem a configured template has, found before any member could meet it."""
    problems = []
    for name, allowed in PLACEHOLDERS.items():
        template = getattr(messages, name, None)
        if template is None:
            continue
        try:
            unknown = _fields(template) - allowed
        except ValueError as exc:
            problems.append(f"messages.{name}: not a valid template ({exc})")
            continue
        if unknown:
            problems.append(
                f"messages.{name}: unknown placeholder(s) {', '.join(sorted(unknown))}; "
                f"available: {', '.join(sorted(allowed)) or 'none'}"
            )
            continue
        # Names can be right and the template still fail (a format spec such as {case:d}):
        # render it once with sample values, as a member's message would be.
        try:
            _render(messages, name, dict.fromkeys(allowed, "sample"))
        except TemplateError as exc:
            problems.append(str(exc))
    return problems


def _render(messages: MessageTemplates, name: str, values: Mapping[str, str]) -> str:
    template = getattr(messages, name, None) or DEFAULTS[name]
    try:
        return template.format_map(dict(values))
    except (KeyError, ValueError, IndexError, AttributeError, TypeError) as exc:
        raise TemplateError(name, f"cannot be rendered ({type(exc).__name__}: {exc})") from None


def resource_lines(resources: Sequence[Resource]) -> str:
    lines = []
    for resource in resources:
        line = f"• {resource.name}: {resource.contact}"
        if resource.when:
            line += f" ({resource.when})"
        lines.append(line)
    return "\n".join(lines)


def _content(text: str, msgtype: str = "m.text") -> dict[str, Any]:
    return {
        "msgtype": msgtype,
        "body": text,
        "format": "org.matrix.custom.html",
        "formatted_body": html.escape(text).replace("\n", "<br>"),
    }


def notice(text: str, *, reply_to: str | None = None) -> dict[str, Any]:
    """An m.notice whose HTML keeps the line breaks; a Matrix reply when `reply_to` is given."""
    content = _content(text, "m.notice")
    if reply_to:
        content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
    return content


# ---- to the member and the room ---------------------------------------------------------


def render_notice(
    messages: MessageTemplates, resources: Sequence[Resource], *, dry_run: bool = False
) -> dict[str, Any]:
    return _content(_render(messages, "notice", {"resources": resource_lines(resources)}))


def render_kick_reason(messages: MessageTemplates, *, notified: bool) -> str:
    text = _render(messages, "kick_reason" if notified else "kick_reason_unnotified", {})
    return text[:KICK_REASON_LIMIT]


def render_room_notice(messages: MessageTemplates, resources: Sequence[Resource]) -> dict[str, Any]:
    return _content(
        _render(messages, "room_notice", {"resources": resource_lines(resources)}), "m.notice"
    )


def render_checkin(
    messages: MessageTemplates, resources: Sequence[Resource], *, staff_roles: Sequence[str]
) -> dict[str, Any]:
    staff = " and ".join(staff_roles) if staff_roles else "our staff team"
    return _content(
        _render(messages, "checkin", {"resources": resource_lines(resources), "staff": staff})
    )


# ---- to staff ---------------------------------------------------------------------------


def _when(at: dt.datetime, zone: dt.tzinfo | None = None) -> str:
    local = at.astimezone(zone) if zone else at.astimezone(dt.UTC)
    return local.strftime("%a %d %b %Y %H:%M %Z")


def duration_words(delta: dt.timedelta) -> str:
    """'24 hours', '5 minutes', '90 seconds', '1 day': a duration as people say it."""
    seconds = int(delta.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    if seconds >= 3600:
        return _duration(delta)
    if seconds >= 60:
        return f"{seconds // 60} minutes"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def _duration(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes = rest // 60
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m" if minutes else f"{seconds}s"


def render_alert(
    messages: MessageTemplates,
    *,
    case_number: int,
    member: str,
    room: str,
    flagger: str,
    flagged_at: dt.datetime,
    method: str,
    reason: str | None,
    notified: bool,
    not_notified_why: str | None,
    removed: bool,
    removal_note: str | None,
    late_by: dt.timedelta | None,
    due_at: dt.datetime | None,
    dry_run: bool,
    checkin_zone: dt.tzinfo,
) -> dict[str, Any]:
    if dry_run:
        status_line = " — DRY RUN: the member was not messaged or removed"
        outcomes = "Nothing was sent to the member and no one was removed (dry run)."
    else:
        status_line = "" if notified else f" — member was NOT notified: {not_notified_why}"
        outcomes = "\n".join(
            [
                "✔ Member notified by DM, before removal"
                if notified
                else f"✘ Member was NOT notified ({not_notified_why}); the removal reason tells "
                "them to call 999 if in danger and to check their messages",
                "✔ Removed from the room"
                if removed
                else f"✘ Not removed: {removal_note or 'unknown reason'}",
            ]
        )
    if due_at is None:
        checkin = "Check-in: could not be scheduled — arrange it by hand."
    elif dry_run:
        checkin = f"Check-in would open {_when(due_at, checkin_zone)} (dry run: it will not)."
    else:
        checkin = f"Check-in room opens {_when(due_at, checkin_zone)}."
    checklist = (
        "If a life may be at immediate risk:\n"
        "☐ Call 999 and give them what you know (the member's details from your records)\n"
        f"☐ Record it: !case {case_number} es <reference> [service]\n"
        f"☐ Acknowledge this alert: react ✅ or write !case {case_number} ack\n"
        f"☐ Notes: !case {case_number} note <text> — the whole case: !case {case_number}"
    )
    text = _render(
        messages,
        "alert",
        {
            "case": str(case_number),
            "status_line": status_line,
            "member": member,
            "room": room,
            "flagger": flagger,
            "when": _when(flagged_at),
            "method": method,
            "reason": reason or "(none given)",
            "outcomes": outcomes,
            "late": f" — arrived {_duration(late_by)} late" if late_by else "",
            "checkin": checkin,
            "checklist": checklist,
        },
    )
    return _content(text, "m.notice")


def render_refusal(
    messages: MessageTemplates,
    *,
    flagger: str,
    member: str | None,
    room: str,
    method: str,
    refusal: Any,
) -> dict[str, Any]:
    return _content(
        f"Flag refused ({refusal.code}): {refusal.detail}.\n"
        f"Room: {room} — flagged by {flagger} ({method})"
        + (f" — member: {member}" if member else "")
        + "\nNothing was done to anyone. If this was a real concern, a moderator should act now.",
        "m.notice",
    )


def render_relay(*, case_number: int, member: str, text: str, where: str = "DM") -> dict[str, Any]:
    said = "replied to the notice" if where == "DM" else "wrote in the check-in room"
    waiting = "" if where == "DM" else " No one from staff has joined it yet."
    return _content(f"Case #{case_number} — {member} {said}:{waiting}\n{text}", "m.notice")


def render_processing_failed(*, event_id: str, room: str) -> dict[str, Any]:
    return _content(
        f"An event could not be processed ({event_id} in {room}). It may have been a flag: "
        "please check that room now and act by hand if needed.",
        "m.notice",
    )


def render_room_joined(*, inviter: str, room: str, can_kick: bool) -> dict[str, Any]:
    power = (
        "I can remove members there."
        if can_kick
        else "I CANNOT remove members there: give me a power level at or above the kick level, "
        "or flags in that room will be recorded but nobody can be removed."
    )
    return _content(
        f"{inviter} added me to {room}. I'm now watching it for flags. {power}", "m.notice"
    )


def render_kick_power_lost(*, room: str) -> dict[str, Any]:
    return _content(
        f"I can no longer remove members in {room} (my power level was changed). "
        "Flags there will be recorded and alerted, but removals will fail until it is restored.",
        "m.notice",
    )


def render_checkin_opened(
    *,
    case_number: int,
    link: str | None,
    late_by: dt.timedelta | None,
    dry_run: bool,
    due_at: dt.datetime | None,
    member_not_invited: str | None = None,
    failed: str | None = None,
) -> dict[str, Any]:
    if dry_run:
        when = _when(due_at) if due_at else "now"
        return _content(
            f"Case #{case_number}: the check-in would have opened {when} (dry run: no room "
            "was created).",
            "m.notice",
        )
    if failed:
        return _content(
            f"Case #{case_number}: the check-in room could NOT be opened ({failed}). "
            "Please contact the member another way today.",
            "m.notice",
        )
    lines = [f"Case #{case_number}: the check-in room is open: {link}"]
    if late_by:
        lines.append(f"It opened {_duration(late_by)} late (the service was unavailable).")
    if member_not_invited:
        lines.append(
            f"The member could NOT be invited ({member_not_invited}): "
            "please reach them another way."
        )
    lines.append("React ✋ to this message to claim the check-in.")
    return _content("\n".join(lines), "m.notice")


def render_checkin_reminder(*, case_number: int, link: str, staff: Sequence[str]) -> dict[str, Any]:
    who = " ".join(staff) + ": " if staff else ""
    content = _content(
        f"{who}Case #{case_number}: no one from staff has claimed or joined the check-in yet. "
        f"{link} — react ✋ to the check-in notice to claim it.",
        "m.notice",
    )
    content["m.mentions"] = {"user_ids": list(staff)}
    return content


def render_alert_again(
    *, case_number: int, waited: dt.timedelta, staff: Sequence[str]
) -> dict[str, Any]:
    who = " ".join(staff)
    content = _content(
        f"Case #{case_number}: the alert has not been acknowledged for {_duration(waited)}. "
        + (f"{who} please look now, " if who else "Please look now, ")
        + f"then react ✅ to the alert or write `!case {case_number} ack`.",
        "m.notice",
    )
    content["m.mentions"] = {"user_ids": list(staff)}
    return content


def render_step_failed(*, case_number: int, step: str, error: str | None) -> dict[str, Any]:
    return _content(
        f"Case #{case_number}: the step '{step}' could not be done"
        + (f" ({error})" if error else "")
        + ". Please act on it by hand; `!case "
        + f"{case_number}` shows the whole case.",
        "m.notice",
    )


def render_template_fallback(*, name: str, problem: str) -> dict[str, Any]:
    return _content(
        f"The configured message template messages.{name} could not be used ({problem}). "
        "The built-in text was sent instead. Please ask an operator to fix the configuration.",
        "m.notice",
    )


def render_refusals_summary(
    *, kind: str, actor: str, room: str, count: int, since: dt.datetime
) -> dict[str, Any]:
    what = "flag(s)" if kind == "flag" else "invite(s) of the bot"
    return _content(
        f"{count} more {what} from {actor} in {room} were refused since "
        f"{_when(since)} (each is recorded). Nothing was done to anyone. If this was a real "
        "concern, a moderator should act now; if it is misuse, consider removing them.",
        "m.notice",
    )


def render_invite_refused(*, inviter: str, room: str) -> dict[str, Any]:
    return _content(
        f"{inviter} tried to add me to {room}. I declined: only staff (and the inviters "
        "configured in appservice.allowed_inviters) can put me in a room. If that room "
        "should be moderated, a staff member can invite me.",
        "m.notice",
    )
