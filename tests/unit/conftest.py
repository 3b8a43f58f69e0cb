"""Fixtures for the policy core's unit tests."""

from __future__ import annotations

import pytest

from appservice.database import create_engine, upgrade


@pytest.fixture
async def engine(tmp_path):
    """A migrated SQLite database of the test's own."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'safeguard.db'}")
    await upgrade(engine)
    yield engine
    await engine.dispose()
