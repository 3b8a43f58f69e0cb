"""How case records read in the staff room: listings and timelines (fixed wording)."""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Sequence
from typing import Any

from bot.store.audit import AuditEntry
from bot.store.cases import Case

_KIND_WORDS = {
    "flagged": "flagged",
    "corroborated": "flagged again (corroboration)",
    "step.notify": "member notified",
    "step.remove": "member removed",
    "step.room_notice": "room notice",
    "step.alert": "staff alerted",
    "step.schedule": "check-in scheduled",
    "step.checkin": "check-in opened",
    "member_rejoined": "member rejoined the room",
    "member_replied": "member replied in the DM (relayed)",
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


def _when(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _age(since: dt.datetime, now: dt.datetime) -> str:
    seconds = int((now - since).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def notice(text: str, *, reply_to: str | None = None) -> dict[str, Any]:
    """An m.notice whose HTML keeps the line breaks; replies to the command when given."""
    content: dict[str, Any] = {
        "msgtype": "m.notice",
        "body": text,
        "format": "org.matrix.custom.html",
        "formatted_body": html.escape(text).replace("\n", "<br>"),
    }
    if reply_to:
        content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
    return content


def case_listing(found: Sequence[Case], which: str, now: dt.datetime) -> str:
    if not found:
        return f"No {which if which != 'all' else ''} cases.".replace("  ", " ")
    lines = [f"Cases ({which}):"]
    for case in found:
        checkin = "no check-in"
        if case.checkin_opened_at:
            checkin = (
                f"check-in open, claimed by {case.checkin_claimed_by}"
                if (case.checkin_claimed_by)
                else "check-in open, unclaimed"
            )
        elif case.due_at:
            checkin = f"check-in due {_when(case.due_at)}"
        lines.append(
            f"#{case.id} {case.member_id or '(purged)'} in {case.room_id or '(purged)'} — "
            f"{case.state}, {_age(case.received_at, now)} old, {checkin}"
        )
    return "\n".join(lines)


def _entry_line(entry: AuditEntry) -> str:
    facts = entry.facts
    personal = entry.personal or {}
    words = _KIND_WORDS.get(entry.kind, entry.kind)
    detail = []
    if "status" in facts and entry.kind.startswith("step."):
        detail.append(str(facts["status"]))
    for key in ("method", "why", "error", "service", "outcome", "via"):
        if facts.get(key):
            detail.append(f"{key}: {facts[key]}")
    for key in ("by", "flagger", "reference", "text"):
        if personal.get(key):
            detail.append(f"{key}: {personal[key]}")
    if entry.kind == "note":
        words = "NOTE (opinion)"
    suffix = f" — {'; '.join(detail)}" if detail else ""
    return f"{_when(entry.at)}  {words}{suffix}"


def case_timeline(case: Case, entries: Sequence[AuditEntry]) -> str:
    head = (
        f"Case #{case.id}: {case.member_id or '(purged)'} in {case.room_id or '(purged)'} — "
        f"{case.state}"
    )
    if case.outcome:
        head += f" (outcome: {case.outcome})"
    if case.hold_reason:
        head += f" — ON HOLD: {case.hold_reason}"
    return "\n".join([head, *(_entry_line(entry) for entry in entries)])
