"""Every text the bot sends, as a template with a default good enough to ship.

Each template has a name (its key under `messages:` in the config) and the
`{placeholders}` it may use. `validate_templates` reports an unknown
placeholder, or a template that fails to render, at `check-config` and before
`run` starts, so a typo never reaches anyone. `bot/texts/messages.py` fills them in.

Member-facing texts are short lines in plain words, readable on a phone, in the
order the policy requires, and say only what is true. What the room sees (the
removal reason, the room notice) names no one and says nothing of why.
"""

from __future__ import annotations

import html
import string
from collections.abc import Mapping
from typing import Any

from bot.config.settings import MessageTemplates
from bot.texts.catalogues import Language

# (default text, placeholders it may use), by the name operators override it with.
CATALOGUE: dict[str, tuple[str, frozenset[str]]] = {
    # ---- to the member ----------------------------------------------------------------
    "notice": (
        "We're worried about you.\n"
        "Because of what you shared, we think you may be at immediate risk.\n"
        "\n"
        "For your safety, we're moving you out of the group chat for now.\n"
        "This is not a punishment, and you are not in trouble.\n"
        "\n"
        "{emergency}\n"
        "\n"
        "These services can talk with you now:\n"
        "{resources}\n"
        "\n"
        "We may contact emergency services to make sure you are safe.\n"
        "Someone from our staff team will message you {checkin_when} to check in.\n"
        "You can reply here at any time: our staff team will see it."
        "{confidentiality}",
        frozenset({"resources", "emergency", "checkin_when", "confidentiality"}),
    ),
    "checkin": (
        # Posted by the bot as it opens the room: staff are invited, not there yet.
        "Hi, this is a private room for you and {staff}.\n"
        "We're checking in after what happened {since}, to see how you are "
        "and talk it through.\n"
        "There's no rush: reply whenever you're ready.\n"
        "\n"
        "{emergency}\n"
        "If you need someone to talk to right now:\n"
        "{resources}"
        "{confidentiality}",
        frozenset({"resources", "emergency", "staff", "since", "confidentiality"}),
    ),
    "withdrawn": (
        "We're sorry: we moved you out of {room} by mistake, and we've invited you back.\n"
        "You did nothing wrong. You're welcome to rejoin whenever you like.\n"
        "If you'd like to talk about it, reply here: our staff team will see it.",
        frozenset({"room"}),
    ),
    # Before a member who came back is removed again (`policy.on_rejoin: remove`), in
    # their DM: told each time, not only the first.
    "removed_again": (
        "You came back to {room}, so we've moved you out of it again for now, for your "
        "safety.\n"
        "This is not a punishment, and you are not in trouble. Our staff team will be in "
        "touch.\n"
        "\n"
        "{emergency}\n"
        "\n"
        "These services can talk with you now:\n"
        "{resources}\n"
        "\n"
        "You can reply here at any time: our staff team will see it.",
        frozenset({"room", "resources", "emergency"}),
    ),
    # The same, when the flag was withdrawn after the notice but before any removal.
    "withdrawn_unremoved": (
        "We're sorry: the message we sent you about {room} was a mistake.\n"
        "You did nothing wrong, and you're not being moved out of it.\n"
        "If you'd like to talk about it, reply here: our staff team will see it.",
        frozenset({"room"}),
    ),
    # The last word in a conversation the bot is closing (its case's time to be kept is
    # over), and the answer to anyone who writes in one afterwards.
    "farewell": (
        "Hi, this chat is closing now, and messages sent here won't be read any more.\n"
        "\n"
        "If you ever need someone to talk to, these services are there for you:\n"
        "{resources}\n"
        "\n"
        "{emergency}\n"
        "\n"
        "Take care of yourself.",
        frozenset({"resources", "emergency"}),
    ),
    "policy_explained": (
        "Hi, you asked how safeguarding works in our group chats. Here it is in plain words.\n"
        "\n"
        "If a moderator is worried that someone may be at immediate risk, they can flag "
        "what that person wrote. Then:\n"
        "• I message that person privately first, with people they can talk to straight "
        "away.\n"
        "• They are moved out of the group chat for now. It is not a punishment, and they "
        "are not in trouble.\n"
        # What the alert carries: not what they wrote (never stored, never passed on).
        "• Our staff team is told who it is, where and when, and who was worried and why. Staff "
        "decide whether to contact emergency services. If they do, they share only what "
        "is needed to keep the person safe.\n"
        "• The next day, someone from our staff team opens a private chat with them to "
        "check in.\n"
        "Nobody else in the group is told why.\n"
        "\n"
        "You don't need to wait for any of that to get support. {emergency}\n"
        "These services can talk with you now:\n"
        "{resources}\n"
        "\n"
        "This chat is automatic: nobody on our team reads it. To talk to our staff, ask a "
        "moderator in your group.{confidentiality}",
        frozenset({"resources", "emergency", "confidentiality"}),
    ),
    "policy_room_reply": (
        "This chat is automatic, and nobody on our team reads what is written here.\n"
        "\n"
        "If you need to talk to someone now:\n"
        "{resources}\n"
        "\n"
        "{emergency}\n"
        "\n"
        "To talk to our staff, ask a moderator in your group.",
        frozenset({"resources", "emergency"}),
    ),
    # ---- what the group room sees -------------------------------------------------------
    "kick_reason": ("Removed by a moderator", frozenset()),
    "kick_reason_unnotified": ("Removed by a moderator", frozenset()),
    "redaction_reason": ("Removed by a moderator", frozenset()),
    "room_notice": (
        "A moderator has stepped in here.\n"
        "{emergency}\n"
        "If anything in this conversation has affected you, these services can talk now:\n"
        "{resources}",
        frozenset({"resources", "emergency"}),
    ),
    # ---- to the moderator who flagged ---------------------------------------------------
    "moderator_debrief": (
        "Thank you for flagging that. You did the right thing.\n"
        # Only what is true the moment staff have the alert, and nothing a group member
        # needs no part in (whether the member was reached, when staff follow up).
        "It's Case #{case}: our staff team has it now, and will follow up with the "
        "person privately.\n"
        "You don't need to do anything more. Please don't discuss it in the group.\n"
        "\n"
        "Moments like this can stay with you. If you'd like to talk it over: {support}.",
        frozenset({"case", "checkin_when", "support"}),
    ),
    # The same, when the alert could not reach the staff room: the moderator is one more
    # person who can make sure staff know, and must not be told to stand down.
    "moderator_debrief_unalerted": (
        "Thank you for flagging that. You did the right thing.\n"
        "It's Case #{case}, but I could not pass it to our staff team: please tell a "
        "member of staff about it directly, now.\n"
        "Please don't discuss it in the group.\n"
        "\n"
        "Moments like this can stay with you. If you'd like to talk it over: {support}.",
        frozenset({"case", "checkin_when", "support"}),
    ),
    # ---- to staff ------------------------------------------------------------------------
    "alert": (
        "Case #{case}{status_line}\n"
        "Member: {member}\n"
        "Room: {room}\n"
        "Flagged by {flagger} ({method}) at {when}{late}\n"
        "Reason given: {reason}\n"
        "{outcomes}\n"
        "{checkin}\n"
        "\n"
        "{checklist}\n"
        "(Times are {zone}.)",
        frozenset(
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
                "zone",
            }
        ),
    ),
    "alert_again": (
        "Case #{case}: the alert has not been acknowledged for {waited}. {staff}Please look "
        "now, then react ✅ to the alert or write `!case {case} ack`.",
        frozenset({"case", "waited", "staff"}),
    ),
    "corroborated": (
        "Case #{case}: {flagger} also flagged {member} ({method}) at {when}. "
        "Reason given: {reason}. Nothing more was sent to the member.",
        frozenset({"case", "flagger", "member", "method", "when", "reason"}),
    ),
    "rejoined": (
        "Case #{case}: {member} has rejoined {room}. {action}",
        frozenset({"case", "member", "room", "action"}),
    ),
    "relay": (
        "Case #{case} — {member} {said}{waiting}:\n{text}",
        frozenset({"case", "member", "said", "waiting", "text"}),
    ),
    "checkin_opened": (
        "Case #{case}: the check-in room is open: {link}{late}{not_invited}\n"
        "React ✋ to this message to claim the check-in.",
        frozenset({"case", "link", "late", "not_invited"}),
    ),
    "checkin_failed": (
        "Case #{case}: the check-in room could NOT be opened ({error}). "
        "Please contact the member another way today.",
        frozenset({"case", "error"}),
    ),
    "checkin_dry_run": (
        "Case #{case}: the check-in would have opened {when} (dry run: no room was created).",
        frozenset({"case", "when"}),
    ),
    "checkin_reminder": (
        "{staff}Case #{case}: no one from staff has claimed or joined the check-in yet.{waiting} "
        "{link} — react ✋ to the check-in notice to claim it.",
        frozenset({"case", "staff", "link", "waiting"}),
    ),
    "withdrawal_done": (
        "Case #{case} withdrawn by {by}: {why}.\n{outcomes}",
        frozenset({"case", "by", "why", "outcomes"}),
    ),
    "flag_found_late": (
        "A flag from {when} in {room} (by {flagger}, about {member}) was found late: the "
        "homeserver never delivered it. It is older than I act on by myself, so nothing was "
        "done. Please check on the member now, and act by hand if they may still be at risk.",
        frozenset({"when", "room", "flagger", "member"}),
    ),
    "step_update": (
        "Case #{case}: {update}",
        frozenset({"case", "update"}),
    ),
    "encryption_failing": (
        # Sent unencrypted into an encrypted staff room: it must say nothing of the case.
        "{what}: my encryption is failing, so the details wait until it works. "
        "Check the service's /health now.",
        frozenset({"what"}),
    ),
    "encryption_broken": (
        # Sent unencrypted: about the bot, never about a case.
        "My end-to-end encryption has stopped working: {why}.\n"
        "Every case goes on: members are told in unencrypted messages meanwhile, and what "
        "I write here waits until encryption works (a short unencrypted note says when "
        "something does). An operator should look at /health and `safeguard e2ee status`.",
        frozenset({"why"}),
    ),
    "encryption_repaired": (
        "My end-to-end encryption works again: what waited for it follows now.",
        frozenset(),
    ),
    "unread_notice": (
        "Case #{case}: {member} has not opened the message yet: there is no read receipt "
        "for the notice sent {sent}, {waited} ago. Some apps send no read receipts, so this "
        "may only mean that theirs does not; `!case {case}` will say if they read it.",
        frozenset({"case", "member", "waited", "sent"}),
    ),
    "step_failed": (
        "Case #{case}: a step could not be done — {step}{error}. Please act on it by hand; "
        "`!case {case}` shows the whole case.",
        frozenset({"case", "step", "error"}),
    ),
    "refusal": (
        "Flag refused ({code}): {detail}.\n"
        "Room: {room} — flagged by {flagger} ({method}){member}\n"
        "Nothing was done to anyone. If this was a real concern, a moderator should act now.",
        frozenset({"code", "detail", "room", "flagger", "method", "member"}),
    ),
    "refusals_summary": (
        "{count} more {what} from {actor} in {room} were refused since {since} (each is "
        "recorded). Nothing was done to anyone. If this was a real concern, a moderator "
        "should act now; if it is misuse, consider removing them.",
        frozenset({"count", "what", "actor", "room", "since"}),
    ),
    "invite_refused": (
        "{inviter} tried to add me to {room}. I declined: only staff (and the inviters "
        "configured in appservice.allowed_inviters) can put me in a room. If that room "
        "should be moderated, a staff member can invite me.",
        frozenset({"inviter", "room"}),
    ),
    "room_joined": (
        "{inviter} added me to {room}. I'm now watching it for flags. {powers}",
        frozenset({"inviter", "room", "powers"}),
    ),
    "room_whose": (
        "{inviter} invited me to {room}, and they are staff of more than one community, so "
        "I cannot tell whose the room is. If it is this community's, send `!rooms claim "
        "{room_id}` here, and I will join it and watch it for flags.",
        frozenset({"inviter", "room", "room_id"}),
    ),
    "room_claimed_twice": (
        "{room} is in {claimant}'s Space, but it belongs to {owner}: it stays {owner}'s, "
        "and flags there go to {owner}'s staff. Take it out of one of them.",
        frozenset({"room", "owner", "claimant"}),
    ),
    "join_failed": (
        "{inviter} added me to {room}, but I could not join it ({error}). I am not "
        "watching that room: flags there will not reach me. Invite me again, or check "
        "that the room lets me in.",
        frozenset({"inviter", "room", "error"}),
    ),
    "room_upgraded": (
        "{by} upgraded {old} to a new room, {new}. I have joined it and watch it for flags "
        "as I did the old one. {cases}{powers}",
        frozenset({"by", "old", "new", "cases", "powers"}),
    ),
    "upgrade_join_failed": (
        "{by} upgraded {old} to a new room ({new}), but I could not join it ({error}). "
        "Flags there will not reach me until I am in it: invite me to the new room (any "
        "member who can invite there may), and I will take it on as I did the old one.",
        frozenset({"by", "old", "new", "error"}),
    ),
    "tombstone_ignored": (
        "{sender} sent an upgrade notice (a tombstone) in {room} pointing to another room, "
        "which I ignored: {why}. I am still watching {room}. If the room really was "
        "upgraded, an admin of it can invite me to the new one.",
        frozenset({"sender", "room", "why"}),
    ),
    "room_removed": (
        "{by} removed me from {room}. I am no longer watching it: flags there will not "
        "reach me. If it should still be moderated, a staff member can invite me back.",
        frozenset({"by", "room"}),
    ),
    "space_removed": (
        "{by} removed me from this community's Space, {space}. Rooms added to it from now "
        "on are not seen: flags there will not reach me. The rooms I already watch are "
        "still watched. To keep the Space moderated, invite me back into it: I will take "
        "on whatever was added meanwhile.",
        frozenset({"by", "space"}),
    ),
    "powers_lost": (
        "My power level in {room} was changed: {powers}",
        frozenset({"room", "powers"}),
    ),
    "moderation_unseated": (
        "{moderator} cannot act in {room}: {why}. Until it can, I remove members, redact "
        "flags and post the room notice there myself, under my own name.",
        frozenset({"moderator", "room", "why"}),
    ),
    "moderation_seated": (
        "{moderator} can act in {room} again: removals and the room notice there come from it.",
        frozenset({"moderator", "room"}),
    ),
    "processing_failed": (
        "An event could not be processed ({event} in {room}). It may have been a flag: "
        "please check that room now and act by hand if needed.",
        frozenset({"event", "room"}),
    ),
    "undecryptable": (
        "A message from {sender} in {room} could not be read: its encryption key never "
        "reached me. If it was a flag or a command, please send it again.",
        frozenset({"sender", "room"}),
    ),
    "undecryptable_summary": (
        "{count} more message(s) from {sender} in {room} could not be read since {since} "
        "(each is recorded): their keys never reached me. If one was a flag, a command or "
        "a member's reply, it was not acted on: please check that room.",
        frozenset({"count", "sender", "room", "since"}),
    ),
    "former_member_wrote": (
        "Someone wrote to me in a private chat I have closed: its case has been erased "
        "under the retention policy, so I cannot say who it was, and what they wrote was "
        "not kept. They have been told the chat is closed and where to get help now.",
        frozenset(),
    ),
    "retention_redaction_reason": (
        "Removed: the retention period for this case is over",
        frozenset(),
    ),
    "template_fallback": (
        "The configured message template messages.{name} could not be used ({problem}). "
        "The built-in text was sent instead. Please ask an operator to fix the configuration.",
        frozenset({"name", "problem"}),
    ),
}
DEFAULTS: dict[str, str] = {name: text for name, (text, _) in CATALOGUE.items()}
PLACEHOLDERS: dict[str, frozenset[str]] = {name: names for name, (_, names) in CATALOGUE.items()}
KICK_REASON_LIMIT = 300


class TemplateError(Exception):
    """A configured template could not be rendered; the built-in text is used instead."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"messages.{name}: {detail}")
        self.name = name


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def validate_templates(messages: MessageTemplates) -> list[str]:
    """Every problem a configured template has, found before anyone could meet it."""
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
            render_text(messages, name, dict.fromkeys(allowed, "sample"))
        except TemplateError as exc:
            problems.append(str(exc))
    return problems


def render_text(
    messages: MessageTemplates,
    name: str,
    values: Mapping[str, str],
    language: Language | None = None,
) -> str:
    """The template `name` (configured, else built in, in `language`) filled in;
    TemplateError if it fails."""
    template = getattr(messages, name, None) or (
        language.template(name, DEFAULTS[name]) if language else DEFAULTS[name]
    )
    try:
        return template.format_map(dict(values))
    except (KeyError, ValueError, IndexError, AttributeError, TypeError) as exc:
        raise TemplateError(name, f"cannot be rendered ({type(exc).__name__}: {exc})") from None


def content(text: str, msgtype: str = "m.text") -> dict[str, Any]:
    """A message whose HTML keeps the line breaks (and escapes whatever the text holds)."""
    return {
        "msgtype": msgtype,
        "body": text,
        "format": "org.matrix.custom.html",
        "formatted_body": html.escape(text).replace("\n", "<br>"),
    }


def notice(text: str, *, reply_to: str | None = None) -> dict[str, Any]:
    """An m.notice; a Matrix reply when `reply_to` is given."""
    message = content(text, "m.notice")
    if reply_to:
        message["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
    return message
