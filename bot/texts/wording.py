"""How people, rooms, times and delays read in the bot's texts (pure)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

from bot.config.settings import Resource

_CONTROL = re.compile(r"[\x00-\x1f\x7f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")
MAX_NAME = 64


def clean_name(name: object) -> str | None:
    """A display name or room name as safe plain text: one line, no direction tricks."""
    if not isinstance(name, str):
        return None
    text = " ".join(_CONTROL.sub(" ", name).split())[:MAX_NAME]
    return text or None


def person(user_id: str, display_name: object = None) -> str:
    """`Sam (@sam:example.org)`: the name people know, and the id that cannot be faked."""
    name = clean_name(display_name)
    return f"{name} ({user_id})" if name and name != user_id else user_id


def place(room_id: str, name: object = None) -> str:
    name = clean_name(name)
    return f"{name} ({room_id})" if name else room_id


def when(at: dt.datetime, zone: dt.tzinfo) -> str:
    """`Wed 25 Nov 2026, 10:00`, in the one zone every staff text uses (named once)."""
    return at.astimezone(zone).strftime("%a %d %b %Y, %H:%M")


def duration_words(delta: dt.timedelta) -> str:
    """'24 hours', '5 minutes', '1 h 30 min': a duration as people say it."""
    seconds = max(int(delta.total_seconds()), 0)

    def plural(count: int, unit: str) -> str:
        return f"{count} {unit}{'s' if count != 1 else ''}"

    if seconds >= 86400 and seconds % 86400 == 0:
        return plural(seconds // 86400, "day")
    if seconds >= 3600:
        hours, minutes = seconds // 3600, (seconds % 3600) // 60
        return plural(hours, "hour") if not minutes else f"{hours} h {minutes} min"
    if seconds >= 60:
        return plural(seconds // 60, "minute")
    return plural(seconds, "second")


def _part_of_day(local: dt.datetime) -> str:
    if local.hour < 12:
        return "morning"
    return "afternoon" if local.hour < 17 else "evening"


def checkin_when(now: dt.datetime, due: dt.datetime | None, zone: dt.tzinfo) -> str:
    """When the check-in will be, as the member reads it: 'tomorrow morning', 'later today'."""
    if due is None:
        return "soon"
    local_now, local_due = now.astimezone(zone), due.astimezone(zone)
    days = (local_due.date() - local_now.date()).days
    ahead = due - now
    if ahead <= dt.timedelta(hours=1):
        return "within the hour" if ahead > dt.timedelta(minutes=5) else "very soon"
    if days <= 0:
        return "in a few hours" if ahead <= dt.timedelta(hours=4) else "later today"
    if days == 1:
        return f"tomorrow {_part_of_day(local_due)}"
    if days < 7:
        return f"on {local_due.strftime('%A')}"
    return f"on {local_due.strftime('%A %d %B')}"


def since_words(then: dt.datetime, now: dt.datetime, zone: dt.tzinfo) -> str:
    """How long ago something happened, as the member reads it: 'yesterday', 'earlier today'."""
    local_then, local_now = then.astimezone(zone), now.astimezone(zone)
    days = (local_now.date() - local_then.date()).days
    if days <= 0:
        return "a little while ago" if now - then < dt.timedelta(hours=2) else "earlier today"
    if days == 1:
        return "yesterday"
    if days < 7:
        return f"on {local_then.strftime('%A')}"
    return f"on {local_then.strftime('%d %B')}"


def resource_lines(resources: Sequence[Resource]) -> str:
    """The services to talk to, one a line (the emergency line is said apart)."""
    lines = []
    for resource in resources:
        if resource.emergency:
            continue
        line = f"• {resource.name}: {resource.contact}"
        if resource.when:
            line += f" ({resource.when})"
        lines.append(line)
    return "\n".join(lines)


def confidentiality_line(url: str | None) -> str:
    """The link to the charity's confidentiality policy, as the last paragraph of a
    message to the member; nothing when none is configured."""
    return f"\n\nWhat we share and why: {url}" if url else ""


def emergency_line(resources: Sequence[Resource]) -> str:
    """'If your life is in danger right now, call 999 or go to A&E.' — from the resources."""
    emergencies = [r for r in resources if r.emergency]
    if not emergencies:
        return "If your life is in danger right now, call your local emergency number."
    return " ".join(
        f"{(r.when or 'in an emergency').capitalize()}, {r.contact}." for r in emergencies
    )
