"""The migrations build exactly the schema the store declares, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from appservice.database import create_engine, current_revision, head_revision, upgrade
from bot.store.schema import metadata
from tests.support.databases import BACKENDS, fresh_database


@pytest.fixture(params=BACKENDS)
async def engine(request, tmp_path):
    async with fresh_database(request.param, tmp_path) as url:
        engine = create_engine(url)
        yield engine
        await engine.dispose()


async def test_migrated_database_matches_the_declared_schema(engine):
    await upgrade(engine)
    await upgrade(engine)  # applying again is a no-op
    assert await current_revision(engine) == head_revision()
    async with engine.connect() as conn:
        differences = await conn.run_sync(
            lambda sync: compare_metadata(
                MigrationContext.configure(
                    sync, opts={"include_object": declared_for(sync.dialect.name)}
                ),
                metadata,
            )
        )
    assert differences == []


def declared_for(dialect: str):
    """Alembic compares every declared index, even one declared for another database
    only (`ddl_if`, as `seen_events`' BRIN index is)."""

    def include(obj, name, type_, reflected, compare_to) -> bool:
        only_on = getattr(getattr(obj, "_ddl_if", None), "dialect", None)
        return only_on is None or only_on == dialect

    return include


async def test_an_older_database_keeps_its_own_first_start(engine):
    """Catch-up never feeds what happened before the database first started: for a
    database upgraded from before that was recorded, that is its first case or audit entry,
    not the upgrade (which would skip what the homeserver never delivered until then)."""
    import asyncio
    import datetime as dt

    from bot.store import audit, positions
    from tests.support.policy import new_case

    await upgrade(engine, "0006")
    await new_case(engine)  # a case (and its `flagged` entry), recorded before the upgrade
    async with engine.connect() as conn:
        (entry,) = await audit.entries(conn)
    await asyncio.sleep(1.5)
    await upgrade(engine)
    async with engine.connect() as conn:
        first = await positions.database_first_started(conn)
    assert first is not None
    assert abs(first - entry.at) < dt.timedelta(seconds=1), "the first record, not the upgrade"
