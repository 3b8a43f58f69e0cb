"""When the next-day check-in falls due (pure), DST-correct in the charity's time zone.

Counted from the flag's own time, so a flag that reached us late is not pushed
back. "Tomorrow at 10:00" means the next local calendar day at 10:00 local time,
whatever the UTC offset does overnight.
"""

from __future__ import annotations

import datetime as dt

from bot.config.settings import CheckinSettings


def local_wall_time(day: dt.date, at: dt.time, zone: dt.tzinfo) -> dt.datetime:
    """`day` at `at` in `zone` as an aware datetime.

    A time that does not exist (the spring-forward gap) moves forward by the
    gap, as a clock would; an ambiguous one (autumn) is its first occurrence.
    """
    # fold=0 is the first occurrence of an ambiguous time, and for a nonexistent
    # one it applies the offset from before the gap (PEP 495), which lands the
    # same distance past the gap: normalising through UTC gives that wall time.
    return (
        dt.datetime.combine(day, at)
        .replace(tzinfo=zone, fold=0)
        .astimezone(dt.UTC)
        .astimezone(zone)
    )


def due_at(flagged_at: dt.datetime, checkin: CheckinSettings) -> dt.datetime:
    """The check-in's due time in UTC."""
    if flagged_at.tzinfo is None:
        raise ValueError("flagged_at must be timezone-aware")
    if checkin.after is not None:
        return (flagged_at + checkin.after).astimezone(dt.UTC)
    zone = checkin.zone
    next_day = flagged_at.astimezone(zone).date() + dt.timedelta(days=1)
    return local_wall_time(next_day, checkin.local_time, zone).astimezone(dt.UTC)
