"""Fixtures for tests that need a migrated database on every backend, or a shorter long poll."""

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


# The safety net's long poll, shortened from 30 s for tests that measure idle windows: a
# window holding more than one long poll then costs seconds, not a minute.
SHORT_LONG_POLL_SECONDS = 8.0


@pytest.fixture
def short_long_poll(monkeypatch: pytest.MonkeyPatch) -> float:
    """The in-process service's long poll (bot/intake/safety_net.py), shortened."""
    monkeypatch.setattr("bot.intake.safety_net.POLL_SECONDS", SHORT_LONG_POLL_SECONDS)
    return SHORT_LONG_POLL_SECONDS
