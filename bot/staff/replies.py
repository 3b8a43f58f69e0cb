"""How case records read in the staff room: listings and timelines (fixed wording), every
time in the charity's zone, as the alert above them is."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence

from bot.store.audit import AuditEntry
from bot.store.cases import Case
from bot.texts.case_words import kind_words, word
from bot.texts.catalogues import N_, Language
from bot.texts.wording import ENGLISH, person, place, when


def _zone_note(zone: dt.tzinfo, language: Language) -> str:
    return language._("(times: {zone})").format(zone=zone)


def _whose(case: Case, names: Mapping[str, str | None], language: Language) -> str:
    """'Sam (@sam:…) in Group chat (!…)': the case's member and room by the names people
    know (`names`, by id), or what retention left."""
    purged = language._("(purged)")
    member = person(case.member_id, names.get(case.member_id)) if case.member_id else purged
    room = place(case.room_id, names.get(case.room_id)) if case.room_id else purged
    return language._("{member} in {room}").format(member=member, room=room)


def _age(since: dt.datetime, now: dt.datetime, language: Language) -> str:
    """'3d', '5h', '12m': how long a case has been open, as short as a listing needs."""
    seconds = int((now - since).total_seconds())
    units = ((N_("{count}d"), 86400), (N_("{count}h"), 3600), (N_("{count}m"), 60))
    for unit, size in units:
        if seconds >= size:
            return language._(unit).format(count=seconds // size)
    return language._(N_("{count}s")).format(count=max(seconds, 0))


# Cases per `!case list` page: with ids at their longest the reply stays far below
# Matrix's 64 KiB event limit (the HTML copy doubles it).
LIST_PAGE_SIZE = 20


def case_listing(
    found: Sequence[Case],
    which: str,
    now: dt.datetime,
    *,
    zone: dt.tzinfo = dt.UTC,
    names: Mapping[str, str | None] | None = None,
    page: int = 1,
    total: int | None = None,
    language: Language = ENGLISH,
) -> str:
    _ = language._
    total = len(found) if total is None else total
    if total == 0:
        return (
            _("No cases.")
            if which == "all"
            else _("No {which} cases.").format(which=word(which, language))
        )
    pages = max(1, -(-total // LIST_PAGE_SIZE))
    if not found:
        return _("There are {pages} page(s) of {which} cases; `{command}` is the last.").format(
            pages=pages, which=word(which, language), command=f"!case list {which} {pages}"
        )
    first = (page - 1) * LIST_PAGE_SIZE + 1
    lines = [
        _("Cases ({which}), {first}–{last} of {total} {zone}:").format(
            which=word(which, language),
            first=first,
            last=first + len(found) - 1,
            total=total,
            zone=_zone_note(zone, language),
        )
    ]
    for case in found:
        checkin = _("no check-in")
        if case.checkin_opened_at:
            checkin = (
                _("check-in open, claimed by {by}").format(by=case.checkin_claimed_by)
                if (case.checkin_claimed_by)
                else _("check-in open, unclaimed")
            )
        elif case.due_at:
            checkin = _("check-in due {when}").format(when=when(case.due_at, zone, language))
        lines.append(
            _("#{case} {whose} — {state}, {age} old, {checkin}").format(
                case=case.id,
                whose=_whose(case, names or {}, language),
                state=word(case.state, language),
                age=_age(case.received_at, now, language),
                checkin=checkin,
            )
        )
    if page < pages:
        lines.append(
            _("More: `{command}` (page {page} of {pages}).").format(
                command=f"!case list {which} {page + 1}", page=page, pages=pages
            )
        )
    return "\n".join(lines)


# Fields of an entry's personal part that name a person, shown by name (the id after).
_PEOPLE = ("by", "flagger", "member")


def people_in(entries: Sequence[AuditEntry]) -> list[str]:
    """The user ids a timeline of these entries names (to read their names first)."""
    return [
        value
        for entry in entries
        for key in _PEOPLE
        if isinstance(value := (entry.personal or {}).get(key), str) and value.startswith("@")
    ]


def _entry_line(
    entry: AuditEntry,
    zone: dt.tzinfo,
    names: Mapping[str, str | None] | None,
    language: Language,
) -> str:
    facts = entry.facts
    personal = dict(entry.personal or {})
    for key in _PEOPLE:
        value = personal.get(key)
        if isinstance(value, str) and value.startswith("@"):
            personal[key] = person(value, (names or {}).get(value))
    words = kind_words(entry.kind, language)
    detail = []
    if entry.kind.startswith("step.") and facts.get("status") not in (None, "done"):
        detail.append(word(str(facts["status"]), language))
    for key in ("method", "why", "via"):
        if facts.get(key):
            detail.append(f"{word(key, language)}: {word(str(facts[key]), language)}")
    if entry.kind == "notice_read" and isinstance(facts.get("read_at"), str):
        read_at = when(dt.datetime.fromisoformat(facts["read_at"]), zone, language)
        detail.append(language._("read at {when}").format(when=read_at))
    for key in ("by", "flagger", "reference", "service", "outcome", "why", "error", "text"):
        if personal.get(key):
            detail.append(f"{word(key, language)}: {personal[key]}")
    if entry.kind == "note":
        words = language._("NOTE (opinion)")
    suffix = f" — {'; '.join(detail)}" if detail else ""
    return f"{when(entry.at, zone, language)}  {words}{suffix}"


def notice_read_line(
    case: Case, zone: dt.tzinfo = dt.UTC, language: Language = ENGLISH
) -> str | None:
    """Whether the member has read their notice, by their read receipt (None: no notice)."""
    if case.notice_event_id is None:
        return None
    if case.notice_read_at is not None:
        return language._("The member read the notice at {when}.").format(
            when=when(case.notice_read_at, zone, language)
        )
    return language._(
        "The member has not opened the notice yet (no read receipt; some apps send none)."
    )


# A timeline longer than this (characters) shows its latest entries only.
MAX_TIMELINE = 24_000


def case_timeline(
    case: Case,
    entries: Sequence[AuditEntry],
    *,
    zone: dt.tzinfo = dt.UTC,
    names: Mapping[str, str | None] | None = None,
    language: Language = ENGLISH,
) -> str:
    _ = language._
    head = _("Case #{case}: {whose} — {state} {zone}").format(
        case=case.id,
        whose=_whose(case, names or {}, language),
        state=word(case.state, language),
        zone=_zone_note(zone, language),
    )
    if case.outcome:
        head += _(" (outcome: {outcome})").format(outcome=case.outcome)
    if case.hold_reason:
        head += _(" — ON HOLD: {why}").format(why=case.hold_reason)
    read = notice_read_line(case, zone, language)
    if read:
        head += f"\n{read}"
    lines = [_entry_line(entry, zone, names, language) for entry in entries]
    kept: list[str] = []
    size = len(head)
    for line in reversed(lines):
        size += len(line) + 1
        if size > MAX_TIMELINE:
            omitted = len(lines) - len(kept)
            kept.append(
                _("… {count} earlier entries: `{command}` has them all").format(
                    count=omitted, command=f"safeguard cases show {case.id}"
                )
            )
            break
        kept.append(line)
    return "\n".join([head, *reversed(kept)])
