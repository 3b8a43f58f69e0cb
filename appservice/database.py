"""Database engines, migrations and the one-instance lock.

SQLite runs in WAL mode with a busy timeout and BEGIN IMMEDIATE, so the CLI can
read while the service writes and two writers queue instead of failing with
"database is locked"; PostgreSQL needs nothing special.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from appservice.errors import ConfigError

MIGRATIONS = Path(__file__).with_name("migrations")
# An arbitrary constant: the advisory-lock key that says "a safeguard service runs here".
_PG_LOCK_KEY = 0x5AFE6A4D
SQLITE_BUSY_TIMEOUT_MS = 15_000


def create_engine(url: str) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.drivername.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let us issue BEGIN ourselves (pysqlite's own BEGIN is deferred).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(connection: Any) -> None:
            # Take the write lock up front: a deferred transaction that later
            # writes can fail at once with SQLITE_BUSY instead of waiting.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


def _alembic_config(connection: Any) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    async with engine.begin() as conn:
        await conn.run_sync(lambda sync: command.upgrade(_alembic_config(sync), revision))


async def current_revision(engine: AsyncEngine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    async with engine.connect() as conn:
        return await conn.run_sync(
            lambda sync: MigrationContext.configure(sync).get_current_revision()
        )


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


class InstanceLock:
    """Held while the service runs; dies with the process, so a crash never blocks a restart."""

    def __init__(self, database_url: str) -> None:
        self._url = make_url(database_url)
        self._file: Any = None
        self._pg: AsyncConnection | None = None
        self._pg_engine: AsyncEngine | None = None

    @property
    def _sqlite_path(self) -> Path | None:
        database = self._url.database
        if self._url.drivername.startswith("sqlite") and database and database != ":memory:":
            return Path(database + ".lock")
        return None

    async def acquire(self) -> None:
        lock_path = self._sqlite_path
        if lock_path is not None:
            handle = open(lock_path, "a+")  # noqa: SIM115 - held for the process lifetime
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise ConfigError(
                    f"another safeguard service ({holder}) is already running against "
                    f"{self._url.database}; only one instance may run per database"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}")
            handle.flush()
            self._file = handle
            return
        if self._url.drivername.startswith("postgresql"):
            # A dedicated connection: the advisory lock lives exactly as long as it.
            self._pg_engine = create_async_engine(self._url, pool_size=1, max_overflow=0)
            self._pg = await self._pg_engine.connect()
            locked = (
                await self._pg.execute(
                    text("SELECT pg_try_advisory_lock(:key)"), {"key": _PG_LOCK_KEY}
                )
            ).scalar_one()
            await self._pg.commit()
            if not locked:
                await self.release()
                raise ConfigError(
                    "another safeguard service is already running against this PostgreSQL "
                    "database; only one instance may run per database"
                )

    async def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._pg is not None:
            await self._pg.close()
            self._pg = None
        if self._pg_engine is not None:
            await self._pg_engine.dispose()
            self._pg_engine = None


@asynccontextmanager
async def opened(url: str, *, migrate: bool = True) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(url)
    try:
        if migrate:
            await upgrade(engine)
        yield engine
    finally:
        await engine.dispose()
