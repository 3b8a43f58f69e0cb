"""The audit log on both backends: append-only chain, verification, tampering detected."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
import sqlalchemy as sa

from bot.audit_chain import verify_chain
from bot.store import audit
from bot.store.schema import audit_entries

PROVENANCE = audit.Provenance("test-policy", "0" * 64)


@pytest.fixture
def engine(migrated_engine):
    return migrated_engine


async def _verify(engine, anchor=None):
    async with engine.connect() as conn:
        rows = [row async for row in audit.chain_rows(conn)]
    return verify_chain(rows, anchor=anchor)


async def _append_some(engine, count: int) -> None:
    for number in range(count):
        async with engine.begin() as conn:
            await audit.append(
                conn,
                PROVENANCE,
                "flagged",
                case_id=1,
                facts={"n": number, "méthode": "réaction"},
                personal={"member": f"@m{number}:localhost"},
            )


async def test_chain_verifies_and_head_matches(engine):
    await _append_some(engine, 5)
    result = await _verify(engine)
    assert result.ok and result.entries == 5
    async with engine.connect() as conn:
        assert await audit.head(conn) == (result.head_seq, result.head_hash)


async def test_altered_row_is_named(engine):
    await _append_some(engine, 5)
    async with engine.begin() as conn:
        await conn.execute(
            audit_entries.update().where(audit_entries.c.seq == 3).values(facts={"n": 99})
        )
    result = await _verify(engine)
    assert not result.ok
    assert result.first_bad_seq == 3


async def test_altered_personal_field_is_detected(engine):
    await _append_some(engine, 3)
    async with engine.begin() as conn:
        await conn.execute(
            audit_entries.update()
            .where(audit_entries.c.seq == 2)
            .values(personal={"member": "@someone-else:localhost"})
        )
    result = await _verify(engine)
    assert (result.ok, result.first_bad_seq) == (False, 2)


async def test_purged_personal_fields_keep_the_chain(engine):
    await _append_some(engine, 3)
    async with engine.begin() as conn:
        await conn.execute(audit_entries.update().values(personal=None))
    assert (await _verify(engine)).ok


async def test_deleted_entry_is_detected(engine):
    await _append_some(engine, 4)
    async with engine.begin() as conn:
        await conn.execute(audit_entries.delete().where(audit_entries.c.seq == 2))
    result = await _verify(engine)
    assert not result.ok and result.first_bad_seq == 3


async def test_recomputed_chain_fails_against_posted_head(engine):
    await _append_some(engine, 3)
    posted = await _verify(engine)
    # Someone rewrites entry 2 and recomputes every hash after it.
    async with engine.begin() as conn:
        rows = (await conn.execute(sa.select(audit_entries).order_by(audit_entries.c.seq))).all()
        await conn.execute(audit_entries.delete())
        await conn.execute(sa.text("UPDATE audit_head SET seq = 0, hash = :h"), {"h": "0" * 64})
    for row in rows:
        async with engine.begin() as conn:
            facts = {"n": "rewritten"} if row.seq == 2 else row.facts
            await audit.append(
                conn,
                PROVENANCE,
                row.kind,
                case_id=row.case_id,
                facts=facts,
                personal=row.personal,
                at=row.at,
            )
    assert (await _verify(engine)).ok  # self-consistent...
    result = await _verify(engine, anchor=(posted.head_seq, posted.head_hash))
    assert not result.ok  # ...but not the log whose head was posted


async def test_concurrent_appends_do_not_fork_the_chain(engine):
    async def one(number: int) -> None:
        async with engine.begin() as conn:
            await audit.append(conn, PROVENANCE, "note", facts={"n": number})

    await asyncio.gather(*(one(n) for n in range(20)))
    result = await _verify(engine)
    assert result.ok and result.entries == 20


async def test_timestamps_round_trip_exactly(engine):
    at = dt.datetime(2026, 3, 29, 0, 59, 59, 123456, tzinfo=dt.UTC)
    async with engine.begin() as conn:
        await audit.append(conn, PROVENANCE, "note", at=at)
    async with engine.connect() as conn:
        (entry,) = await audit.entries(conn)
    assert entry.at == at
    assert (await _verify(engine)).ok
