"""Fixtures for tests that need a migrated database on every backend."""

from __future__ import annotations

import pytest

from appservice.database import create_engine, upgrade
from tests.support.databases import BACKENDS, fresh_database


@pytest.fixture(params=BACKENDS)
async def migrated_engine(request, tmp_path):
    """An empty, migrated database: SQLite always, PostgreSQL when reachable."""
    async with fresh_database(request.param, tmp_path) as url:
        engine = create_engine(url)
        await upgrade(engine)
        yield engine
        await engine.dispose()
