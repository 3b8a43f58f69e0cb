"""Recognising a flag in a raw Matrix event (pure): a reaction, a reply command, or a named user.

Never raises: events come from any client, and a shape we do not understand
is simply not a flag.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any, Literal

from bot.core.reactions import annotation, normalise_key

MAX_REASON = 500
_USER_ID = re.compile(r"@[^\s:]+:[^\s]+")
# What a flag may name, as the spec bounds it (255 characters). Anything longer or
# stranger is not a flag: acting on it would only make the homeserver choke.
_PLAUSIBLE_USER = re.compile(r"@[\x21-\x39\x3b-\x7e]+:[A-Za-z0-9.\-:\[\]]+")
_PLAUSIBLE_EVENT = re.compile(r"\$[\x21-\x7e]+")
MAX_ID = 255
# Element pills: <a href="https://matrix.to/#/@user:server">Name</a>. Read with an HTML
# parser (one pass), never a backtracking pattern: anyone may send formatted_body.
_PILL_HREF = re.compile(r"https://matrix\.to/#/(@[^\"'?/]+)", re.I)
# More formatted text than any command needs is not read at all (the plain body is).
MAX_FORMATTED = 16_384


@dataclass(frozen=True)
class Flag:
    method: Literal["reaction", "reply", "command"]
    room_id: str
    flagger: str
    flag_event_id: str
    target_event_id: str | None
    target_user: str | None
    reason: str | None


def plausible_user_id(value: object) -> bool:
    return (
        isinstance(value, str) and len(value) <= MAX_ID and bool(_PLAUSIBLE_USER.fullmatch(value))
    )


def plausible_event_id(value: object) -> bool:
    return (
        isinstance(value, str) and len(value) <= MAX_ID and bool(_PLAUSIBLE_EVENT.fullmatch(value))
    )


def strip_reply_fallback(body: str) -> str:
    """Drop the `> <@user> quoted` lines clients put before a reply's own text."""
    lines = body.split("\n")
    index = 0
    while index < len(lines) and lines[index].startswith(">"):
        index += 1
    if index and index < len(lines) and lines[index].strip() == "":
        index += 1
    return "\n".join(lines[index:]) if index else body


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _relation(content: Mapping[str, Any]) -> Mapping[str, Any]:
    relation = content.get("m.relates_to")
    return relation if isinstance(relation, Mapping) else {}


def _reply_target(relation: Mapping[str, Any]) -> str | None:
    """The replied-to event id, unless it is only a thread's fallback."""
    if relation.get("rel_type") == "m.thread" and relation.get("is_falling_back") is True:
        return None
    in_reply_to = relation.get("m.in_reply_to")
    if isinstance(in_reply_to, Mapping):
        return _text(in_reply_to.get("event_id"))
    return None


def _reason(text: str) -> str | None:
    text = " ".join(text.split())
    return text[:MAX_REASON] or None


def _recognise_reaction(
    event: Mapping[str, Any], content: Mapping[str, Any], keys: frozenset[str]
) -> Flag | None:
    reacted = annotation(content)
    if reacted is None or reacted[0] not in keys or not plausible_event_id(reacted[1]):
        return None
    target = reacted[1]
    return Flag(
        "reaction", event["room_id"], event["sender"], event["event_id"], target, None, None
    )


class _PillText(HTMLParser):
    """formatted_body as text: each pill its user id (the body has only the name), the
    reply fallback (<mx-reply>) left out, every other tag dropped."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.pills = 0
        self._in_reply = 0
        self._pill: str | None = None  # the user of the pill being read
        self._pill_text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "mx-reply":
            self._in_reply += 1
        elif tag == "a" and self._pill is None and not self._in_reply:
            href = next((value for name, value in attrs if name == "href"), None) or ""
            found = _PILL_HREF.match(href[: MAX_ID + 32])
            if found:
                self._pill, self._pill_text = found.group(1), []

    def handle_endtag(self, tag: str) -> None:
        if tag == "mx-reply" and self._in_reply:
            self._in_reply -= 1
        elif tag == "a" and self._pill is not None:
            self.parts.append(self._pill)
            self.pills += 1
            self._pill, self._pill_text = None, []

    def handle_data(self, data: str) -> None:
        if self._in_reply:
            return
        (self._pill_text if self._pill is not None else self.parts).append(data)

    def text(self) -> str:
        self.close()
        return "".join(self.parts + self._pill_text)  # a pill never closed: its name as text


_REPLY_END = re.compile(r"</mx-reply\s*>", re.IGNORECASE)


def _pills_read(formatted: str, *, reply: bool = False) -> tuple[str, int] | None:
    """(the text with pills as user ids, how many) of a formatted_body of a bounded size;
    None if it cannot be read (the plain body is read instead).

    `reply`: everything up to the last `</mx-reply>` is the quoted message's (a client's
    reply fallback quotes its HTML), not the moderator's: a stray `</mx-reply>` in what the
    flagged person wrote must not make their words, pills included, read as the command."""
    if len(formatted) > MAX_FORMATTED:
        return None
    if reply:
        # Found in the text itself: a lower-cased copy may differ in length ("İ").
        ends = list(_REPLY_END.finditer(formatted))
        if ends:
            formatted = formatted[ends[-1].end() :]
    reader = _PillText()
    try:
        reader.feed(formatted)
        return reader.text(), reader.pills
    except Exception:  # html.parser asserts on some markup (`<![ x`): anyone can send it
        return None


def _recognise_command(
    event: Mapping[str, Any], content: Mapping[str, Any], command: str
) -> Flag | None:
    body = _text(content.get("body"))
    if body is None:
        return None
    relation = _relation(content)
    if relation.get("rel_type") == "m.replace":
        return None  # an edit re-states an earlier message; the original was the flag
    reply_to = _reply_target(relation)
    formatted = _text(content.get("formatted_body"))
    read = (
        _pills_read(formatted, reply=reply_to is not None)
        if formatted and "matrix.to" in formatted
        else None
    )
    if read is not None and read[1]:
        text = read[0].strip()
    else:
        text = (strip_reply_fallback(body) if reply_to else body).strip()
    words = text.split(maxsplit=2)
    if not words or words[0].casefold() != command.casefold():
        return None
    named = words[1] if len(words) > 1 and _USER_ID.fullmatch(words[1]) else None
    if named is not None and not plausible_user_id(named):
        return None
    if named is not None:
        # An explicit user in the command wins over the message it replies to:
        # the moderator said whom they meant.
        reason = _reason(words[2]) if len(words) > 2 else None
        return Flag(
            "command", event["room_id"], event["sender"], event["event_id"], None, named, reason
        )
    rest = text[len(words[0]) :]
    if reply_to is not None:
        if not plausible_event_id(reply_to):
            return None
        return Flag(
            "reply",
            event["room_id"],
            event["sender"],
            event["event_id"],
            reply_to,
            None,
            _reason(rest),
        )
    # No id in the text and not a reply: a client may have put the pill only in m.mentions.
    # (Replies add the replied-to sender there, so this is only trusted without a reply.)
    mentions = content.get("m.mentions")
    user_ids = mentions.get("user_ids") if isinstance(mentions, Mapping) else None
    if isinstance(user_ids, list) and len(user_ids) == 1 and plausible_user_id(user_ids[0]):
        return Flag(
            "command", event["room_id"], event["sender"], event["event_id"], None, user_ids[0], None
        )
    return None


def recognise_flag(
    event: Mapping[str, Any], *, reactions: Sequence[str], command: str
) -> Flag | None:
    """The flag this event raises, or None (encrypted reactions count: relations are cleartext)."""
    try:
        if not isinstance(event, Mapping):
            return None
        for key in ("event_id", "room_id", "sender", "type"):
            if not isinstance(event.get(key), str):
                return None
        content = event.get("content")
        if not isinstance(content, Mapping) or not content:
            return None
        keys = frozenset(normalise_key(k) for k in reactions)
        if event["type"] in ("m.reaction", "m.room.encrypted"):
            return _recognise_reaction(event, content, keys)
        if event["type"] == "m.room.message":
            return _recognise_command(event, content, command)
    except (TypeError, ValueError, AttributeError):
        return None
    return None
