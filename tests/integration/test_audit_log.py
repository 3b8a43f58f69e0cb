"""The audit log on both backends: append-only chain, verification, tampering detected."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
import sqlalchemy as sa

from bot.core.audit_chain import verify_chain
from bot.store import audit
from bot.store.schema import audit_entries

PROVENANCE = audit.Provenance("test-policy", "0" * 64, b"5" * 64)


@pytest.fixture
def engine(migrated_engine):
    return migrated_engine


async def _verify(engine, anchor=None):
    async with engine.connect() as conn:
        rows = [row async for row in audit.chain_rows(conn)]
    return verify_chain(rows, anchor=anchor, key=PROVENANCE.digest_key)


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


async def test_personal_digests_are_keyed(engine):
    """A purged entry's digest cannot be matched by hashing guessed user ids."""
    from bot.core.audit_chain import digest, personal_digest

    await _append_some(engine, 1)
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(audit_entries))).one()
    guess = {"member": "@m0:localhost"}
    assert row.personal_alg == "hmac-sha256"
    assert row.personal_digest != digest(guess), "not a plain hash anyone could recompute"
    assert row.personal_digest == personal_digest(guess, PROVENANCE.digest_key)
    wrong_key = verify_chain([r async for r in _rows(engine)], key=b"another deployment's key")
    assert not wrong_key.ok


async def _rows(engine):
    async with engine.connect() as conn:
        async for row in audit.chain_rows(conn):
            yield row


async def test_entries_from_before_keyed_digests_still_verify(engine):
    """Plain SHA-256 entries (written before this version) verify as they were."""
    from bot.core.audit_chain import GENESIS_HASH, ChainedEntry, digest

    at = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    personal = {"member": "@old:localhost"}
    old = ChainedEntry(1, 1, at, "flagged", {"n": 0}, digest(personal), "p", "c" * 64, GENESIS_HASH)
    async with engine.begin() as conn:
        await conn.execute(
            audit_entries.insert().values(
                seq=1,
                case_id=1,
                at=at,
                kind="flagged",
                facts={"n": 0},
                personal=personal,
                personal_digest=old.personal_digest,
                personal_alg="sha256",
                policy_version="p",
                config_hash="c" * 64,
                prev_hash=GENESIS_HASH,
                hash=old.compute_hash(),
            )
        )
        await conn.execute(
            sa.text("UPDATE audit_head SET seq = 1, hash = :h"), {"h": old.compute_hash()}
        )
    await _append_some(engine, 2)
    assert (await _verify(engine)).ok
    # Passing a keyed entry off as a plain one breaks its hash.
    async with engine.begin() as conn:
        await conn.execute(
            audit_entries.update().where(audit_entries.c.seq == 2).values(personal_alg="sha256")
        )
    result = await _verify(engine)
    assert (result.ok, result.first_bad_seq) == (False, 2)
