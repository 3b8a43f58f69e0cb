"""Whole transactions on SQLite's writer thread (bot/store/transact.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from appservice.database import create_engine
from bot.store.transact import TransactionAwaited, read, transact

metadata = sa.MetaData()
notes = sa.Table(
    "notes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("text", sa.String, unique=True),
)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'notes.db'}")
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


async def _count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return (await conn.execute(sa.select(sa.func.count()).select_from(notes))).scalar_one()


async def _write(conn: AsyncConnection, *texts: str) -> str:
    for text in texts:
        await conn.execute(notes.insert().values(text=text))
    return threading.current_thread().name


async def test_a_transaction_runs_whole_on_a_thread_of_its_own(engine: AsyncEngine) -> None:
    where = await transact(engine, _write, "a", "b")
    assert where == "safeguard-transactions"
    assert await _count(engine) == 2


async def test_one_that_raises_writes_nothing(engine: AsyncEngine) -> None:
    with pytest.raises(IntegrityError):
        await transact(engine, _write, "a", "a")
    assert await _count(engine) == 0
    # The thread and its connection go on serving.
    await transact(engine, _write, "c")
    assert await _count(engine) == 1


async def test_a_savepoint_rolls_back_alone(engine: AsyncEngine) -> None:
    async def insert_twice(conn: AsyncConnection) -> bool:
        await conn.execute(notes.insert().values(text="kept"))
        try:
            async with conn.begin_nested():
                await conn.execute(notes.insert().values(text="kept"))
        except IntegrityError:
            return True
        return False

    assert await transact(engine, insert_twice)
    assert await _count(engine) == 1


async def test_awaiting_anything_but_the_database_is_refused(engine: AsyncEngine) -> None:
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def waits(conn: AsyncConnection) -> None:
        await conn.execute(notes.insert().values(text="half"))
        await never  # a transaction must not wait for anything outside it

    with pytest.raises(TransactionAwaited):
        await transact(engine, waits)
    assert await _count(engine) == 0


async def test_a_read_needs_no_turn_to_write(engine: AsyncEngine) -> None:
    await transact(engine, _write, "a")

    async def count(conn: AsyncConnection) -> int:
        return (await conn.execute(sa.select(sa.func.count()).select_from(notes))).scalar_one()

    async with engine.writing():  # type: ignore[attr-defined]
        assert await asyncio.wait_for(read(engine, count), 5) == 1


async def test_without_a_thread_it_is_an_ordinary_transaction(tmp_path: Path) -> None:
    # PostgreSQL's engines (and any other) run the same work through `begin()`.
    plain = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'p.db'}")
    async with plain.begin() as conn:
        await conn.run_sync(metadata.create_all)
    assert await transact(plain, _write, "a") == threading.current_thread().name
    assert await _count(plain) == 1
    await plain.dispose()


async def test_a_failed_statement_never_carries_what_it_wrote_into_its_error(engine):
    """A write that fails (a full disk, a dropped connection, a constraint) is logged and
    recorded with its error: a member's reply in it must not come along."""
    secret = "I am going to do it tonight"

    async def insert_twice(conn: AsyncConnection) -> None:
        await conn.execute(sa.insert(notes), [{"text": secret}, {"text": secret}])

    with pytest.raises(IntegrityError) as on_the_thread:
        await transact(engine, insert_twice)  # the whole transaction on its thread
    async with engine.begin() as conn:
        with pytest.raises(IntegrityError) as in_the_pool:
            await insert_twice(conn)
    for failed in (on_the_thread, in_the_pool):
        assert secret not in str(failed.value)
