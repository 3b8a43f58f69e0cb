"""How case records read in the staff room: listings and timelines (fixed wording), every
time in the charity's zone, as the alert above them is."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence

from bot.store.audit import AuditEntry
from bot.store.cases import Case
from bot.texts.wording import person, place, when

# What each step did, in words (its status is added when it is not "done").
_STEP_WORDS = {
    "notify": "member told (the notice)",
    "remove": "member removed from the room",
    "room_notice": "room told (no one named)",
    "alert": "staff alerted",
    "schedule": "check-in scheduled",
    "checkin": "check-in opened",
    "checkin_notice": "staff told the check-in is open",
    "checkin_reminder": "staff reminded of the check-in",
    "escalate": "alert raised again (unacknowledged)",
    "redact_flag": "the flag taken out of the room",
    "redact_message": "the flagged message taken out of the room",
    "debrief": "moderator debriefed",
    "withdraw_apology": "member sent an apology (flag withdrawn)",
    "withdraw_reinvite": "member invited back (flag withdrawn)",
    "withdraw_report": "staff told the flag was withdrawn",
    "remove_again": "member removed again",
    "corroboration": "staff told of another flag",
    "rejoin": "staff told the member came back",
    "purge": "personal data purged (retention)",
    "unread_notice": "staff told the notice is unread",
    "mark_dm": "the member's DM marked as a direct chat",
}

_KIND_WORDS = {
    **{f"step.{step}": words for step, words in _STEP_WORDS.items()},
    "flagged": "flagged",
    "corroborated": "flagged again (corroboration)",
    "step.notify": "member notified",
    "notice_read": "member read the notice",
    "step.unread_notice": "staff told the notice is unread",
    "step.remove": "member removed",
    "step.room_notice": "room notice",
    "step.alert": "staff alerted",
    "step.schedule": "check-in scheduled",
    "step.checkin": "check-in opened",
    "member_rejoined": "member rejoined the room",
    "member_replied": "member replied in the DM (relayed)",
    "checkin_member_wrote": "member wrote in the check-in room (relayed)",
    "moderator_replied": "moderator replied to the debrief (relayed)",
    "flag_withdrawn": "flag withdrawn",
    "checkin_member_joined": "member joined the check-in",
    "checkin_invite_rejected": "member declined the check-in invite",
    "checkin_staff_joined": "staff joined the check-in",
    "checkin_claimed": "check-in claimed",
    "checkin_reminded": "staff reminded about the check-in",
    "emergency_services_informed": "emergency services informed",
    "note": "staff note",
    "alert_acknowledged": "alert acknowledged",
    "alert_raised_again": "alert raised again (unacknowledged)",
    "closed": "case closed",
    "reopened": "case reopened",
    "held": "placed on hold",
    "purged": "personal data purged (retention)",
}


def _words(kind: str) -> str:
    """An entry's kind in words: the table's, else its name read as words."""
    return _KIND_WORDS.get(kind) or kind.removeprefix("step.").replace("_", " ")


def _zone_note(zone: dt.tzinfo) -> str:
    return f"(times: {zone})"


def _whose(case: Case, names: Mapping[str, str | None]) -> str:
    """'Sam (@sam:…) in Group chat (!…)': the case's member and room by the names people
    know (`names`, by id), or what retention left."""
    member = person(case.member_id, names.get(case.member_id)) if case.member_id else "(purged)"
    room = place(case.room_id, names.get(case.room_id)) if case.room_id else "(purged)"
    return f"{member} in {room}"


def _age(since: dt.datetime, now: dt.datetime) -> str:
    seconds = int((now - since).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


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
) -> str:
    total = len(found) if total is None else total
    if total == 0:
        return f"No {which if which != 'all' else ''} cases.".replace("  ", " ")
    pages = max(1, -(-total // LIST_PAGE_SIZE))
    if not found:
        return (
            f"There are {pages} page(s) of {which} cases; `!case list {which} {pages}` is the last."
        )
    first = (page - 1) * LIST_PAGE_SIZE + 1
    lines = [f"Cases ({which}), {first}–{first + len(found) - 1} of {total} {_zone_note(zone)}:"]
    for case in found:
        checkin = "no check-in"
        if case.checkin_opened_at:
            checkin = (
                f"check-in open, claimed by {case.checkin_claimed_by}"
                if (case.checkin_claimed_by)
                else "check-in open, unclaimed"
            )
        elif case.due_at:
            checkin = f"check-in due {when(case.due_at, zone)}"
        lines.append(
            f"#{case.id} {_whose(case, names or {})} — "
            f"{case.state}, {_age(case.received_at, now)} old, {checkin}"
        )
    if page < pages:
        lines.append(f"More: `!case list {which} {page + 1}` (page {page} of {pages}).")
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
    entry: AuditEntry, zone: dt.tzinfo, names: Mapping[str, str | None] | None = None
) -> str:
    facts = entry.facts
    personal = dict(entry.personal or {})
    for key in _PEOPLE:
        value = personal.get(key)
        if isinstance(value, str) and value.startswith("@"):
            personal[key] = person(value, (names or {}).get(value))
    words = _words(entry.kind)
    detail = []
    if entry.kind.startswith("step.") and facts.get("status") not in (None, "done"):
        detail.append(str(facts["status"]))
    for key in ("method", "why", "via"):
        if facts.get(key):
            detail.append(f"{key}: {facts[key]}")
    if entry.kind == "notice_read" and isinstance(facts.get("read_at"), str):
        detail.append(f"read at {when(dt.datetime.fromisoformat(facts['read_at']), zone)}")
    for key in ("by", "flagger", "reference", "service", "outcome", "why", "error", "text"):
        if personal.get(key):
            detail.append(f"{key}: {personal[key]}")
    if entry.kind == "note":
        words = "NOTE (opinion)"
    suffix = f" — {'; '.join(detail)}" if detail else ""
    return f"{when(entry.at, zone)}  {words}{suffix}"


def notice_read_line(case: Case, zone: dt.tzinfo = dt.UTC) -> str | None:
    """Whether the member has read their notice, by their read receipt (None: no notice)."""
    if case.notice_event_id is None:
        return None
    if case.notice_read_at is not None:
        return f"The member read the notice at {when(case.notice_read_at, zone)}."
    return "The member has not opened the notice yet (no read receipt; some apps send none)."


# A timeline longer than this (characters) shows its latest entries only.
MAX_TIMELINE = 24_000


def case_timeline(
    case: Case,
    entries: Sequence[AuditEntry],
    *,
    zone: dt.tzinfo = dt.UTC,
    names: Mapping[str, str | None] | None = None,
) -> str:
    head = f"Case #{case.id}: {_whose(case, names or {})} — {case.state} {_zone_note(zone)}"
    if case.outcome:
        head += f" (outcome: {case.outcome})"
    if case.hold_reason:
        head += f" — ON HOLD: {case.hold_reason}"
    read = notice_read_line(case, zone)
    if read:
        head += f"\n{read}"
    lines = [_entry_line(entry, zone, names) for entry in entries]
    kept: list[str] = []
    size = len(head)
    for line in reversed(lines):
        size += len(line) + 1
        if size > MAX_TIMELINE:
            omitted = len(lines) - len(kept)
            kept.append(
                f"… {omitted} earlier entries: `safeguard cases show {case.id}` has them all"
            )
            break
        kept.append(line)
    return "\n".join([head, *reversed(kept)])
