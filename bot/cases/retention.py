"""Retention: a case closed longer ago than `policy.retention_days` is purged, here and on
the homeserver; entries outside any case recorded longer ago than that are erased too.

A case that left nothing on the homeserver is erased at once. Any other is handed to its
`purge` step (bot/steps/purge.py), run by the step engine like every step: its staff-room
messages redacted, its rooms no longer DMs in the bot's `m.direct`, the member told where
to get help now, its rooms left — and only then its rows erased. An outage of the
homeserver defers it; nothing it needs is erased before it is done.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.steps import POSITIONS
from bot.store import audit
from bot.store import retention as store
from bot.store.retention import PURGE_STEP, Purged


async def purge(
    engine: AsyncEngine,
    provenance: audit.Provenance,
    retention_days: int,
    now: dt.datetime | None = None,
) -> Purged:
    """0 days means keep for ever: nothing is purged. `now` decides what is due (the
    retention period is counted to it); a purge step handed a case runs at once."""
    if retention_days <= 0:
        return Purged(0, 0)
    started = dt.datetime.now(dt.UTC)
    now = now or started
    cutoff = now - dt.timedelta(days=retention_days)
    erased = entries = 0
    scheduled: list[int] = []
    async with engine.begin() as conn:
        for case in await store.due_cases(conn, cutoff):
            if await store.on_the_homeserver(conn, case.id):
                if await store.schedule(conn, case.id, POSITIONS[PURGE_STEP], cutoff, started):
                    scheduled.append(case.id)
                continue
            entries += await store.erase_now(conn, provenance, case, now)
            erased += 1
        caseless = await store.purge_caseless_before(conn, provenance, cutoff, now)
    return Purged(erased, entries, caseless, tuple(scheduled))
