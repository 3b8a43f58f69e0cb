"""One write transaction, whole, in one call: on SQLite, on a thread of its own.

Through the pool (aiosqlite) every statement of a transaction is a hand-over to the
driver's thread and back, BEGIN and COMMIT included: 0.3–0.6 ms each on this
machine, so the step engine's transaction between the member's notice and their
removal (a dozen statements) cost 7–10 ms while SQLite itself took well under one.
`transact(db, work, *args)` runs `work(conn, *args)` as one transaction (and
`read(db, work, *args)` as one read, without the write lock); on a
SQLite engine that can (appservice/database.py) the whole of it runs on a writer
thread with a plain connection, as the intake's records do (bot/store/ingest.py)
and as Synapse runs an interaction on its database thread: one hand-over.

`work` is the same code either way: an `async def` over the connection, using the
store's functions as everywhere else. On the thread, `ThreadConnection` gives it an
AsyncConnection's face over a plain one, and the coroutine is driven to its end in
one step. So `work` may await the database and nothing else: a transaction waiting
for the homeserver would hold the one write lock meanwhile. Awaiting anything else
raises `TransactionAwaited` (a bug of ours, found by the first test that runs it).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

P = ParamSpec("P")
T = TypeVar("T")

Work = Callable[Concatenate[AsyncConnection, P], Awaitable[T]]


class TransactionAwaited(RuntimeError):
    """A transaction run on the writer thread awaited something other than the database."""


async def transact(db: AsyncEngine, work: Work[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`work(conn, *args)` in one write transaction, committed when it returns."""
    on_thread = getattr(db, "transact", None)
    if on_thread is not None:
        return await on_thread(work, *args, **kwargs)  # type: ignore[no-any-return]
    async with db.begin() as conn:
        return await work(conn, *args, **kwargs)


async def read(db: AsyncEngine, work: Work[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`work(conn, *args)` as one read: a consistent snapshot, no write lock taken."""
    on_thread = getattr(db, "read", None)
    if on_thread is not None:
        return await on_thread(work, *args, **kwargs)  # type: ignore[no-any-return]
    async with db.connect() as conn:
        return await work(conn, *args, **kwargs)


class ThreadConnection:
    """What the store's functions use of an AsyncConnection, over a plain Connection.

    Each call runs at once on the calling thread (the writer thread): nothing in it
    ever suspends, which is what lets `run_whole` drive the transaction in one step.
    """

    def __init__(self, connection: sa.Connection) -> None:
        self.sync_connection = connection
        self.dialect = connection.dialect

    async def execute(
        self, statement: Any, parameters: Any = None, **kwargs: Any
    ) -> sa.CursorResult[Any]:
        return self.sync_connection.execute(statement, parameters, **kwargs)

    async def scalar(self, statement: Any, parameters: Any = None, **kwargs: Any) -> Any:
        return self.sync_connection.scalar(statement, parameters, **kwargs)

    @contextlib.asynccontextmanager
    async def begin_nested(self) -> AsyncIterator[None]:
        with self.sync_connection.begin_nested():
            yield


def run_whole(connection: sa.Connection, work: Work[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """On the writer thread: `work` as one transaction on `connection`, committed (or
    rolled back, if it raises) before this returns."""
    with connection.begin():
        coroutine = work(ThreadConnection(connection), *args, **kwargs)  # type: ignore[arg-type]
        return _drive(coroutine, getattr(work, "__qualname__", repr(work)))


def _drive(coroutine: Coroutine[Any, Any, T], name: str) -> T:
    try:
        coroutine.send(None)
    except StopIteration as finished:
        return finished.value  # type: ignore[no-any-return]
    coroutine.close()
    raise TransactionAwaited(f"{name} awaited something other than the database")
