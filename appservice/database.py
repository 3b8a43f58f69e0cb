"""Database engines, migrations and the one-instance lock.

SQLite runs in WAL mode with a busy timeout. Writes (`engine.begin()`) take the
write lock up front with BEGIN IMMEDIATE, so two writers queue instead of one
failing with "database is locked"; reads (`engine.connect()`) begin deferred
and take no lock at all, so the CLI and /health read while the service writes.
PostgreSQL needs nothing special.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from appservice.config import sqlite_file
from appservice.errors import ConfigError
from bot.store.outages import is_database_outage
from bot.store.schema import heartbeat
from bot.store.transact import Work, run_whole
from bot.store.writer_thread import WriterThread

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).with_name("migrations")
# An arbitrary constant: the advisory-lock key that says "a safeguard service runs here".
_PG_LOCK_KEY = 0x5AFE6A4D
SQLITE_BUSY_TIMEOUT_MS = 15_000
_KEEPALIVE_SETTINGS = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
}
# /health must answer within seconds even while another process holds the write lock.
HEALTH_BUSY_TIMEOUT_MS = 2_000
_WRITE = "safeguard_write"
_READ = "safeguard_read"


def _configure_sqlite(dbapi_connection: Any, busy_timeout_ms: int) -> None:
    """Every connection to the database, pooled or plain, runs with these settings."""
    # Let us issue BEGIN ourselves (pysqlite's own BEGIN is deferred).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # What is deleted (a relayed reply once sent, an event's content once handled) is
    # overwritten, not left in free pages for anyone who copies the file.
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


class SqliteEngine(AsyncEngine):
    """`begin()` is a write transaction (BEGIN IMMEDIATE); `connect()` reads take no lock.

    SQLite has one writer at a time. Writers in this process queue on an asyncio lock
    (`writing()`) before they ask SQLite: one waiting for SQLite's lock busy-waits, in
    sleeps of up to tens of milliseconds, while the lock is handed over the moment it
    is free. SQLite's busy timeout is left for writers in other processes (the CLI).
    """

    _write_lock: asyncio.Lock | None = None
    _write_lock_loop: asyncio.AbstractEventLoop | None = None
    busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS
    # Whole transactions (`transact`, `read`): their thread and its one plain connection.
    _transactions: WriterThread | None = None
    _plain_engine: sa.Engine | None = None

    def plain_connection(self) -> sqlite3.Connection:
        """A plain sqlite3 connection with the pool's settings, for the thread that opens it.

        For a writer that runs a whole transaction in one call on a thread of its own
        (the intake): one hand-over to that thread, where the pool's driver makes one
        per statement. Writers still take their turn with `writing()` first.
        """
        database = sqlite_file(self.url)
        if database is None:
            raise ValueError("an in-memory SQLite database cannot be opened a second time")
        conn = sqlite3.connect(database, timeout=self.busy_timeout_ms / 1000)
        _configure_sqlite(conn, self.busy_timeout_ms)
        return conn

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        """This process's turn to write (wrap BEGIN IMMEDIATE … COMMIT in it)."""
        loop = asyncio.get_running_loop()
        if self._write_lock is None or self._write_lock_loop is not loop:
            # A lock serves one event loop (tests run one engine on several in turn).
            self._write_lock, self._write_lock_loop = asyncio.Lock(), loop
        async with self._write_lock:
            yield

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        async with self.writing(), self.connect() as conn:
            await conn.execution_options(**{_WRITE: True})
            async with conn.begin():
                yield conn

    async def transact(self, work: Work[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`work(conn, *args)` as one write transaction, run whole on a thread of its own
        with a plain connection: one hand-over, where `begin()` makes one per statement
        (bot/store/transact.py). In this process's turn to write, as every writer."""
        async with self.writing():
            return await self._whole_on_thread(work, args, kwargs, write=True)

    async def read(self, work: Work[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`work(conn, *args)` as one read (a consistent snapshot, no lock), run whole on
        the same thread."""
        return await self._whole_on_thread(work, args, kwargs, write=False)

    async def _whole_on_thread(
        self, work: Work[..., Any], args: tuple[Any, ...], kwargs: Any, *, write: bool
    ) -> Any:
        if self._transactions is None:
            self._transactions = WriterThread("safeguard-transactions")
        return await self._transactions.run(self._run_whole, work, args, kwargs, write)

    def _run_whole(
        self, work: Work[..., Any], args: tuple[Any, ...], kwargs: Any, write: bool
    ) -> Any:
        """On the transactions' thread: its one connection, opened there on first use."""
        if self._plain_engine is None:
            self._plain_engine = _plain_engine(self)
        try:
            with self._plain_engine.connect() as connection:
                if not write:
                    connection = connection.execution_options(**{_READ: True})
                return run_whole(connection, work, *args, **kwargs)
        except sa.exc.DBAPIError as exc:
            if exc.connection_invalidated or is_database_outage(exc):
                # A file gone or a disk that failed: the next transaction opens afresh.
                self._close_plain()
            raise

    def _close_plain(self) -> None:
        if self._plain_engine is not None:
            engine, self._plain_engine = self._plain_engine, None
            engine.dispose()

    async def dispose(self, close: bool = True) -> None:
        transactions = self._transactions
        if transactions is not None:
            await transactions.run(self._close_plain)
            transactions.stop()
            self._transactions = None
        await super().dispose(close)


def _plain_engine(engine: SqliteEngine) -> sa.Engine:
    """A synchronous engine on the same file, holding one plain connection (for the
    thread that opens it), whose transactions begin as the pool's writes do."""
    plain = sa.create_engine(
        "sqlite://", creator=engine.plain_connection, poolclass=StaticPool, hide_parameters=True
    )

    @event.listens_for(plain, "begin")
    def _on_begin(connection: Any) -> None:
        reading = connection.get_execution_options().get(_READ, False)
        connection.exec_driver_sql("BEGIN" if reading else "BEGIN IMMEDIATE")

    return plain


def create_engine(url: str, *, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.drivername.startswith("sqlite"):
        plain = create_async_engine(
            url, connect_args={"timeout": busy_timeout_ms / 1000}, hide_parameters=True
        )
        engine = SqliteEngine(plain.sync_engine)
        engine.busy_timeout_ms = busy_timeout_ms

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            _configure_sqlite(dbapi_connection, busy_timeout_ms)

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(connection: Any) -> None:
            # A write takes the lock up front: a deferred transaction that later writes
            # can fail at once with SQLITE_BUSY instead of waiting its turn. A read
            # takes none, and sees a consistent snapshot (WAL).
            writing = connection.get_execution_options().get(_WRITE, False)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if writing else "BEGIN")

        return engine
    # A server that is gone or restarting is an answer within the busy timeout (asyncpg's
    # own connect timeout is a minute), as is a pool with every connection in use.
    seconds = busy_timeout_ms / 1000
    return create_async_engine(
        url,
        # A failed statement's error never carries what it wrote (a member's reply, a
        # staff note) into the log, the inbox's error or the audit's `event_failed`.
        hide_parameters=True,
        pool_size=10,
        max_overflow=10,
        pool_pre_ping=True,
        pool_timeout=seconds,
        connect_args={"timeout": seconds},
    )


def sqlite_journal(database: Path) -> list[Path]:
    """The files SQLite keeps beside a database in WAL mode."""
    return [database.with_name(database.name + end) for end in ("-wal", "-shm")]


def protect_files(*paths: Path | None) -> None:
    """Files readable by their owner only, folders enterable by their owner only (what an
    older version, or an operator's copy, left more open)."""
    for path in paths:
        if path is None or not path.exists():
            continue
        if path.is_dir():
            path.chmod(0o700)
            for child in path.iterdir():
                if child.is_file():
                    child.chmod(0o600)
        else:
            path.chmod(0o600)


async def checkpoint(engine: AsyncEngine) -> None:
    """SQLite: write the journal (WAL) back into the database and empty it, so what was
    deleted does not linger in the journal either. Nothing on PostgreSQL."""
    if engine.dialect.name == "sqlite":
        async with engine.connect() as conn:
            await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


async def write_heartbeat(engine: AsyncEngine) -> None:
    """A committed write: the only proof the database can record (a read, or a write rolled
    back, succeeds on a full or read-only disk)."""
    now = dt.datetime.now(dt.UTC)
    async with engine.begin() as conn:
        updated = await conn.execute(heartbeat.update().where(heartbeat.c.id == 1).values(at=now))
        if not updated.rowcount:
            await conn.execute(heartbeat.insert().values(id=1, at=now))


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


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config(None)).get_current_head()
    assert head is not None
    return head


async def schema_problem(engine: AsyncEngine) -> str | None:
    """None if the database is at the latest schema; else what to do about it."""
    try:
        current = await current_revision(engine)
    except Exception as exc:
        return f"the database cannot be read ({type(exc).__name__}: {exc})"
    head = head_revision()
    if current == head:
        return None
    if current is None:
        return "the database has no schema yet: run `safeguard db upgrade -c CONFIG` first"
    return (
        f"the database schema is at {current}, this version needs {head}: "
        "run `safeguard db upgrade -c CONFIG` first"
    )


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


class InstanceLock:
    """Held while the service runs; dies with the process, so a crash never blocks a restart.

    On PostgreSQL the lock lives on one connection: if that connection drops (the server
    restarted, the network blinked), the lock is gone and a second instance could take
    it. `watch` checks it every second. When it is lost, `on_lost` is told (the service
    stops acting: no step runs without the lock), and the lock is taken again on a new
    connection, with backoff, for as long as the database stays away; `on_regained` is
    told once it is held again. Only if another instance took it meanwhile is `on_taken`
    told (the service then stops, non-zero). A newly started instance waits
    `settle_seconds` before acting, so one whose connection just dropped has noticed and
    paused first.
    """

    WATCH_SECONDS = 1.0
    RETAKE_MAX_SECONDS = 10.0
    # Another session holding the lock this long after ours was lost is another instance.
    TAKEN_GRACE_SECONDS = 10.0

    def __init__(self, database_url: str) -> None:
        self._url = make_url(database_url)
        self._file: Any = None
        self._pg: AsyncConnection | None = None
        self._pg_engine: AsyncEngine | None = None
        self._pg_pid: int | None = None  # the server process (session) that holds the lock
        self._watcher: asyncio.Task[None] | None = None

    @property
    def settle_seconds(self) -> float:
        """How long to wait after taking the lock before acting (PostgreSQL only)."""
        return 3 * self.WATCH_SECONDS if self._pg is not None else 0.0

    def watch(
        self,
        on_lost: Callable[[str], None],
        on_regained: Callable[[], None] = lambda: None,
        on_taken: Callable[[str], None] | None = None,
    ) -> None:
        if self._pg is not None and self._watcher is None:
            self._watcher = asyncio.create_task(
                self._watch(on_lost, on_regained, on_taken or on_lost), name="instance-lock"
            )

    async def _holds(self) -> bool:
        """Whether the lock's connection still holds the lock (raises if it is broken)."""
        assert self._pg is not None
        async with asyncio.timeout(self.WATCH_SECONDS):
            held = (
                await self._pg.execute(
                    text(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                        "AND pid = pg_backend_pid() AND objid = :key AND granted"
                    ),
                    {"key": _PG_LOCK_KEY},
                )
            ).scalar_one()
            await self._pg.commit()
        return bool(held)

    async def _watch(
        self,
        on_lost: Callable[[str], None],
        on_regained: Callable[[], None],
        on_taken: Callable[[str], None],
    ) -> None:
        while True:
            await asyncio.sleep(self.WATCH_SECONDS)
            try:
                held = await self._holds()
                why = "the instance lock is no longer held"
            except Exception as exc:
                held = False
                why = f"the connection holding the instance lock failed ({type(exc).__name__})"
            if held:
                continue
            on_lost(why)
            if not await self._retake():
                on_taken("another instance took the instance lock while it was away")
                return
            on_regained()

    async def _retake(self) -> bool:
        """Take the lock again on a new connection, waiting out the database; False if
        another instance holds it.

        The server may not have noticed yet that our old connection is gone (a network
        blip: it keeps the session, and the lock, until TCP gives up): a lock held by
        our own old session is ended and taken again. One held by any other session is
        waited on for TAKEN_GRACE_SECONDS (it may be ending) before we yield to it."""
        delay = self.WATCH_SECONDS
        loop = asyncio.get_running_loop()
        others_since: float | None = None
        while True:
            old_pid = self._pg_pid
            await self._close_pg()
            try:
                if await self._take_pg():
                    log.warning("the instance lock is held again")
                    return True
                holder = await self._lock_holder()
                if holder is not None and holder == old_pid:
                    log.warning("our old session %d still holds the lock: ending it", old_pid)
                    await self._end_session(old_pid)
                    self._pg_pid = None
                    continue
                self._pg_pid = old_pid
                others_since = others_since if others_since is not None else loop.time()
                if loop.time() - others_since >= self.TAKEN_GRACE_SECONDS:
                    return False
            except Exception as exc:
                log.warning(
                    "the instance lock cannot be taken again yet (%s); retrying in %.0fs",
                    type(exc).__name__,
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.RETAKE_MAX_SECONDS)

    async def _take_pg(self) -> bool:
        """A dedicated connection: the advisory lock lives exactly as long as it."""
        self._pg_engine = create_async_engine(
            self._url,
            pool_size=1,
            max_overflow=0,
            # The server notices within half a minute that this session's client is gone
            # (keepalives), so a lock left on a dead connection does not outlive it long.
            connect_args={"timeout": 5, "server_settings": _KEEPALIVE_SETTINGS},
        )
        self._pg = await self._pg_engine.connect()
        locked, pid = (
            await self._pg.execute(
                text("SELECT pg_try_advisory_lock(:key), pg_backend_pid()"), {"key": _PG_LOCK_KEY}
            )
        ).one()
        await self._pg.commit()
        if locked:
            self._pg_pid = int(pid)
        return bool(locked)

    async def _lock_holder(self) -> int | None:
        """The server process (session) holding the lock, if any."""
        assert self._pg is not None
        holder = (
            await self._pg.execute(
                text(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = :key "
                    "AND granted"
                ),
                {"key": _PG_LOCK_KEY},
            )
        ).scalar_one_or_none()
        await self._pg.commit()
        return None if holder is None else int(holder)

    async def _end_session(self, pid: int) -> None:
        assert self._pg is not None
        await self._pg.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        await self._pg.commit()
        await asyncio.sleep(0.2)  # the lock goes when the session has ended

    async def _close_pg(self) -> None:
        if self._pg is not None:
            with contextlib.suppress(Exception):
                await self._pg.close()
            self._pg = None
        if self._pg_engine is not None:
            with contextlib.suppress(Exception):
                await self._pg_engine.dispose()
            self._pg_engine = None

    @property
    def _sqlite_path(self) -> Path | None:
        database = sqlite_file(self._url)
        return None if database is None else database.with_name(database.name + ".lock")

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
        if self._url.drivername.startswith("postgresql") and not await self._take_pg():
            await self.release()
            raise ConfigError(
                "another safeguard service is already running against this PostgreSQL "
                "database; only one instance may run per database"
            )

    async def release(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        await self._close_pg()


@asynccontextmanager
async def opened(url: str, *, migrate: bool = False) -> AsyncIterator[AsyncEngine]:
    """An engine on the database; read-only users (migrate=False) need it up to date."""
    engine = create_engine(url)
    try:
        if migrate:
            await upgrade(engine)
        else:
            problem = await schema_problem(engine)
            if problem is not None:
                raise ConfigError(problem)
        yield engine
    finally:
        await engine.dispose()
