"""How people, rooms, times and delays read in the bot's texts (pure)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

from bot.config.settings import Resource
from bot.texts.catalogues import N_, Language, language

ENGLISH = language()
# "on Monday" … as a whole phrase: languages inflect it (Welsh: "ddydd Llun").
ON_WEEKDAY = (
    N_("on Monday"),
    N_("on Tuesday"),
    N_("on Wednesday"),
    N_("on Thursday"),
    N_("on Friday"),
    N_("on Saturday"),
    N_("on Sunday"),
)


def _first_upper(text: str) -> str:
    """The first letter made a capital, the rest as written (`str.capitalize` would
    lower-case "A&E", "SHOUT")."""
    return text[:1].upper() + text[1:]


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


def when(at: dt.datetime, zone: dt.tzinfo, language: Language = ENGLISH) -> str:
    """`Wed 25 Nov 2026, 10:00`, in the one zone every staff text uses (named once)."""
    return language.date(at.astimezone(zone), "EEE dd MMM y, HH:mm")


def duration_words(delta: dt.timedelta, language: Language = ENGLISH) -> str:
    """'24 hours', '5 minutes', '1 h 30 min': a duration as people say it."""
    _ = language._
    seconds = max(int(delta.total_seconds()), 0)
    if seconds >= 86400 and seconds % 86400 == 0:
        days = seconds // 86400
        return (_("1 day") if days == 1 else _("{count} days")).format(count=days)
    if seconds >= 3600:
        hours, minutes = seconds // 3600, (seconds % 3600) // 60
        if minutes:
            return _("{hours} h {minutes} min").format(hours=hours, minutes=minutes)
        return (_("1 hour") if hours == 1 else _("{count} hours")).format(count=hours)
    if seconds >= 60:
        count = seconds // 60
        return (_("1 minute") if count == 1 else _("{count} minutes")).format(count=count)
    return (_("1 second") if seconds == 1 else _("{count} seconds")).format(count=seconds)


def checkin_when(
    now: dt.datetime, due: dt.datetime | None, zone: dt.tzinfo, language: Language = ENGLISH
) -> str:
    """When the check-in will be, as the member reads it: 'tomorrow morning', 'later today'."""
    _ = language._
    if due is None:
        return _("soon")
    local_now, local_due = now.astimezone(zone), due.astimezone(zone)
    days = (local_due.date() - local_now.date()).days
    ahead = due - now
    if ahead <= dt.timedelta(hours=1):
        return _("within the hour") if ahead > dt.timedelta(minutes=5) else _("very soon")
    if days <= 0:
        return _("in a few hours") if ahead <= dt.timedelta(hours=4) else _("later today")
    if days == 1:
        if local_due.hour < 12:
            return _("tomorrow morning")
        return _("tomorrow afternoon") if local_due.hour < 17 else _("tomorrow evening")
    if days < 7:
        return _(ON_WEEKDAY[local_due.weekday()])
    return _("{on_weekday} {date}").format(
        on_weekday=_(ON_WEEKDAY[local_due.weekday()]), date=language.date(local_due, "d MMMM")
    )


def since_words(
    then: dt.datetime, now: dt.datetime, zone: dt.tzinfo, language: Language = ENGLISH
) -> str:
    """How long ago something happened, as the member reads it: 'yesterday', 'earlier today'."""
    _ = language._
    local_then, local_now = then.astimezone(zone), now.astimezone(zone)
    days = (local_now.date() - local_then.date()).days
    if days <= 0:
        return _("a little while ago") if now - then < dt.timedelta(hours=2) else _("earlier today")
    if days == 1:
        return _("yesterday")
    if days < 7:
        return _(ON_WEEKDAY[local_then.weekday()])
    return _("on {date}").format(date=language.date(local_then, "d MMMM"))


def resource_lines(resources: Sequence[Resource], language: Language = ENGLISH) -> str:
    """The services to talk to, one a line (the emergency line is said apart)."""
    lines = []
    for resource in resources:
        if resource.emergency:
            continue
        line = f"• {resource.name}: {language.resource(resource.contact)}"
        if resource.when:
            line += f" ({language.resource(resource.when)})"
        lines.append(line)
    return "\n".join(lines)


def confidentiality_line(url: str | None, language: Language = ENGLISH) -> str:
    """The link to the charity's confidentiality policy, as the last paragraph of a
    message to the member; nothing when none is configured."""
    return "\n\n" + language._("What we share and why: {url}").format(url=url) if url else ""


def emergency_resources(resources: Sequence[Resource]) -> list[Resource]:
    """The emergency lines among the resources (said apart from the services to talk to)."""
    return [r for r in resources if r.emergency]


def emergency_line(resources: Sequence[Resource], language: Language = ENGLISH) -> str:
    """'If your life is in danger right now, call 999 or go to A&E.' — from the resources."""
    _ = language._
    emergencies = emergency_resources(resources)
    if not emergencies:
        return _("If your life is in danger right now, call your local emergency number.")
    return " ".join(
        _("{when}, {contact}.").format(
            when=_first_upper(language.resource(r.when) if r.when else _("in an emergency")),
            contact=language.resource(r.contact),
        )
        for r in emergencies
    )
