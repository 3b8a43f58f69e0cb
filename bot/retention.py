"""Retention: purge personal fields of cases closed longer ago than audit.retention_days."""

from __future__ import annotations

import datetime as dt

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.store import audit
from bot.store.retention import Purged, purge_closed_before


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
    async with engine.begin() as conn:
        return await purge_closed_before(
            conn, provenance, now - dt.timedelta(days=retention_days), now
        )
