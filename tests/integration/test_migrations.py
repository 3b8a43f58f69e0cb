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
    from tests.support.policy import PROVENANCE

    await upgrade(engine, "0006")
    async with engine.begin() as conn:  # an entry recorded before the upgrade
        await audit.append(
            conn, PROVENANCE, "refused", facts={}, at=dt.datetime.now(dt.UTC).replace(microsecond=0)
        )
    async with engine.connect() as conn:
        (entry,) = await audit.entries(conn)
    await asyncio.sleep(1.5)
    await upgrade(engine)
    async with engine.connect() as conn:
        first = await positions.database_first_started(conn)
    assert first is not None
    assert abs(first - entry.at) < dt.timedelta(seconds=1), "the first record, not the upgrade"


async def test_event_ids_recorded_before_0010_keep_their_time_and_are_pruned_by_it(engine):
    """0010 stores SQLite's `seen_events.received_at` as milliseconds: rows recorded as
    text before it keep their time, and the prune still tells old from recent."""
    import datetime as dt

    import sqlalchemy as sa

    from bot.store import ingest
    from bot.store.schema import seen_events

    await upgrade(engine, "0009")
    old = dt.datetime(2026, 1, 2, 3, 4, 5, 678000)
    recent = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0)
    async with engine.begin() as conn:
        await conn.execute(
            sa.text("INSERT INTO seen_events (event_id, received_at) VALUES (:e, :t)"),
            [{"e": "$old", "t": old}, {"e": "$recent", "t": recent}],
        )
    await upgrade(engine)
    async with engine.connect() as conn:
        stored = dict((await conn.execute(sa.select(seen_events))).all())
    assert stored == {
        "$old": old.replace(tzinfo=dt.UTC),
        "$recent": recent.replace(tzinfo=dt.UTC),
    }
    async with engine.begin() as conn:
        removed = await ingest.prune(conn, dt.datetime(2026, 6, 1, tzinfo=dt.UTC))
    assert removed == 1
    async with engine.connect() as conn:
        assert await ingest.not_seen(conn, ["$old", "$recent"]) == {"$old"}


async def test_cases_recorded_before_0013_are_the_one_community_defaults(engine):
    """0013 puts every case in a community: those recorded before it in `default`, the
    one community of an install without `communities:`, whose staff keep seeing them."""
    import datetime as dt

    import sqlalchemy as sa

    from bot.store import cases

    await upgrade(engine, "0012")
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO cases (room_id, member_id, state, dry_run, flagged_at, received_at)"
                " VALUES ('!r:x', '@m:x', 'open', false, :t, :t)"
            ),
            {"t": dt.datetime(2026, 12, 1, 12, 0)},
        )
    await upgrade(engine)
    async with engine.connect() as conn:
        (case,) = await cases.listing(conn)
        assert case.community == cases.DEFAULT_COMMUNITY
        assert await cases.get(conn, case.id, community="default") == case
        assert await cases.get(conn, case.id, community="wales") is None
