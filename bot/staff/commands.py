"""Parsing the staff room's `!case` commands (pure): what staff asked for, or how to ask right."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from bot.texts.catalogues import N_, Language

PREFIX = "!case"
Action = Literal[
    "help",
    "list",
    "show",
    "es",
    "note",
    "claim",
    "ack",
    "close",
    "reopen",
    "hold",
    "withdraw",
    "stats",
    "remove",
    "notify",
]
# Actions on one case that need text after them, and what that text is called.
_NEEDS_TEXT: dict[str, str] = {
    "note": "<text>",
    "close": "<outcome>",
    "reopen": "<why>",
    "hold": "<why>",
    "es": "<reference> [service]",
    "withdraw": "<why> [--keep-checkin]",
}
KEEP_CHECKIN = "--keep-checkin"
_NO_TEXT = ("claim", "ack", "remove", "notify")
LIST_FILTERS = ("open", "closed", "all")

USAGE = N_("""\
!case list [open|closed|all] [page] — the cases, oldest first, a page at a time
!case N — case N's whole timeline
!case N es <reference> [service] — record that emergency services were informed
!case N note <text> — add a staff note (kept apart from facts)
!case N claim — claim the check-in (same as reacting ✋ to its notice)
!case N ack — acknowledge the alert (same as reacting ✅ to it)
!case N notify — try again to tell the member (when their notice could not be sent)
!case N remove — remove the member now, without waiting for the notice (your decision,
    recorded)
!case N close <outcome> — close the case
!case N reopen <why> — reopen a closed case
!case N hold <why> — keep the case from retention purges
!case N withdraw <why> [--keep-checkin] — a wrong flag: apologise, invite the member back,
    cancel the check-in (unless kept) and close the case as withdrawn
!case stats [days] — flags per moderator and per room (default: the last 30 days)
!case help — this list
!rooms — the rooms I moderate: who added me, when, whether I can remove and redact there
!rooms leave <room> — make me leave a room (a room id or #alias)
!rooms claim <room> — a room I was asked about (invited by staff of more than one
    community): make it this community's""")


@dataclass(frozen=True)
class CaseCommand:
    action: Action
    case: int | None = None
    text: str = ""
    words: tuple[str, ...] = field(default=())
    page: int = 1  # the listing's page, or the days `stats` looks back

    @property
    def keep_checkin(self) -> bool:
        return KEEP_CHECKIN in self.words

    @property
    def reference(self) -> str:
        return self.words[0] if self.words else ""

    @property
    def service(self) -> str:
        return " ".join(self.words[1:]) or N_("emergency services")


@dataclass(frozen=True)
class CommandError:
    """A `!case` command that could not be understood: how to write it (English, with
    `{placeholders}` filled from `values`; `in_` says it in a community's language)."""

    template: str
    values: Mapping[str, Any] = field(default_factory=dict)

    def in_(self, language: Language) -> str:
        return language._(self.template).format_map(self.values)

    @property
    def message(self) -> str:
        return self.template.format_map(self.values)


def parse_case_command(body: str) -> CaseCommand | CommandError | None:
    """None when the message is not a `!case` command at all."""
    if not isinstance(body, str):
        return None
    words = body.strip().split()
    if not words or words[0].casefold() != PREFIX:
        return None
    rest = words[1:]
    if not rest or rest[0].casefold() == "help":
        return CaseCommand("help")
    head = rest[0].casefold()
    if head == "stats":
        if len(rest) == 1:
            return CaseCommand("stats", page=30)
        if len(rest) == 2 and re.fullmatch(r"\d{1,4}", rest[1]) and int(rest[1]) > 0:
            return CaseCommand("stats", page=int(rest[1]))
        return CommandError(N_("write `!case stats` or `!case stats 90` (days)"))
    if head == "list":
        arguments = [word.casefold() for word in rest[1:]]
        chosen = "open"
        if arguments and arguments[0] in LIST_FILTERS:
            chosen = arguments.pop(0)
        page = 1
        if arguments and re.fullmatch(r"\d{1,6}", arguments[0]) and int(arguments[0]) > 0:
            page = int(arguments.pop(0))
        if arguments:
            return CommandError(
                N_(
                    "write `!case list`, `!case list closed`, `!case list all` "
                    "(add a page number for more, e.g. `!case list all 2`)"
                )
            )
        return CaseCommand("list", text=chosen, page=page)
    number = rest[0].lstrip("#")
    if not re.fullmatch(r"\d{1,9}", number):
        return CommandError(
            N_("`{word}` is not a case number: write e.g. `!case 12` or `!case help`"),
            {"word": rest[0]},
        )
    case = int(number)
    if len(rest) == 1:
        return CaseCommand("show", case)
    action = rest[1].casefold()
    arguments = rest[2:]
    text = " ".join(arguments)
    if action in _NO_TEXT:
        return CaseCommand(action, case)  # type: ignore[arg-type]
    if action in _NEEDS_TEXT:
        if action == "withdraw":
            keep = KEEP_CHECKIN in arguments
            arguments = [word for word in arguments if word != KEEP_CHECKIN]
            text = " ".join(arguments)
            if not arguments:
                return CommandError(N_("write `{usage}`"), {"usage": _usage(case, action)})
            return CaseCommand(
                "withdraw", case, text=text[:2000], words=(KEEP_CHECKIN,) if keep else ()
            )
        if not arguments:
            return CommandError(N_("write `{usage}`"), {"usage": _usage(case, action)})
        return CaseCommand(action, case, text=text[:2000], words=tuple(arguments))  # type: ignore[arg-type]
    return CommandError(
        N_("`{word}` is not a case command; `!case help` lists them"), {"word": rest[1]}
    )


def _usage(case: int, action: str) -> str:
    return f"!case {case} {action} {_NEEDS_TEXT[action]}"


@dataclass(frozen=True)
class RoomsCommand:
    """`!rooms` (list), `!rooms leave <room>`, or `!rooms claim <room>` (a room the bot
    was invited to by someone who is staff of several communities)."""

    action: Literal["list", "leave", "claim"]
    room: str | None = None


def parse_rooms_command(body: str) -> RoomsCommand | CommandError | None:
    """None when the message is not a `!rooms` command at all."""
    if not isinstance(body, str):
        return None
    words = body.strip().split()
    if not words or words[0].casefold() != "!rooms":
        return None
    if len(words) == 1:
        return RoomsCommand("list")
    action = words[1].casefold()
    if action in ("leave", "claim") and len(words) == 3 and words[2][:1] in ("!", "#"):
        return RoomsCommand("leave" if action == "leave" else "claim", words[2])
    return CommandError(
        N_(
            "write `!rooms`, `!rooms leave !roomid:server` (or a #alias), or "
            "`!rooms claim !roomid:server`"
        )
    )
