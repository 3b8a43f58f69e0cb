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
            lambda sync: compare_metadata(MigrationContext.configure(sync), metadata)
        )
    assert differences == []
