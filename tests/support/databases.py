"""Database URLs for tests: SQLite always, PostgreSQL when reachable (required under CI=true)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

PG_ADMIN_URL = os.environ.get(
    "SAFEGUARD_TEST_PG", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
_pg_reachable: bool | None = None


async def postgres_reachable() -> bool:
    global _pg_reachable
    if _pg_reachable is None:
        engine = create_async_engine(PG_ADMIN_URL)
        try:
            async with asyncio.timeout(5), engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            _pg_reachable = True
        except Exception:
            _pg_reachable = False
        finally:
            await engine.dispose()
    return _pg_reachable


@asynccontextmanager
async def fresh_database(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """A URL to an empty database of the backend, removed afterwards."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / f'safeguard-{uuid.uuid4().hex[:8]}.db'}"
        return
    if not await postgres_reachable():
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL} (required under CI=true)")
        pytest.skip("PostgreSQL not reachable")
    name = f"safeguard_test_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


BACKENDS = ["sqlite", "postgresql"]


async def record_events(
    engine, txn_id: str, event_ids: list[str], to_act_on: list[tuple[dict, int]], now
):
    """Record one transaction as the intake does, on a recorder of its own."""
    from bot.store.ingest import TransactionRecorder

    recorder = TransactionRecorder(engine)
    try:
        return await recorder.record(txn_id, event_ids, to_act_on, now)
    finally:
        await recorder.close()


def offline_config(directory: Path, database_url: str, **sections: Any) -> Path:
    """A config for the commands that need only the database (no homeserver answers at
    its URL), written as config.yaml in `directory`."""
    path = directory / "config.yaml"
    data = {
        "homeserver": {"url": "http://127.0.0.1:1", "domain": "localhost"},
        "appservice": {"url": "http://127.0.0.1:2"},
        "database": {"url": database_url},
        **sections,
    }
    path.write_text(yaml.safe_dump(data))
    return path
