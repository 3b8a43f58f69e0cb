"""Retention: purge personal fields of cases closed longer ago than audit.retention_days,
and of entries outside any case recorded longer ago than that."""

from __future__ import annotations

import datetime as dt

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.store import audit
from bot.store.retention import Purged, purge_caseless_before, purge_closed_before


async def purge(
    engine: AsyncEngine,
    provenance: audit.Provenance,
    retention_days: int,
    now: dt.datetime | None = None,
) -> Purged:
    """0 days means keep for ever: nothing is purged."""
    if retention_days <= 0:
        return Purged(0, 0)
    now = now or dt.datetime.now(dt.UTC)
    cutoff = now - dt.timedelta(days=retention_days)
    async with engine.begin() as conn:
        purged = await purge_closed_before(conn, provenance, cutoff, now)
        caseless = await purge_caseless_before(conn, provenance, cutoff, now)
    return Purged(purged.cases, purged.entries, caseless)
