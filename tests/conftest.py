"""Session fixtures: the real Synapse the integration tests run against."""

from __future__ import annotations

import pytest_asyncio

from tests.support.synapse import start_synapse


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def synapse(tmp_path_factory):
    handle = await start_synapse(tmp_path_factory.mktemp("synapse"))
    yield handle
    await handle.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def strict_synapse(tmp_path_factory):
    """A second Synapse with low rate limits and `rate_limited: true` for the bot (429 tests)."""
    handle = await start_synapse(tmp_path_factory.mktemp("strict-synapse"), rate_limits="strict")
    yield handle
    await handle.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def restartable_synapse(tmp_path_factory):
    """A Synapse of its own for the fault-injection tests, which stop and kill it."""
    handle = await start_synapse(tmp_path_factory.mktemp("restartable-synapse"))
    yield handle
    await handle.close()
