"""Appending to and reading the audit log (SQL only; the chain rules are in audit_chain)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bot.core.audit_chain import KEYED, ChainedEntry, personal_digest
from bot.store.schema import audit_entries, audit_head, cases


@dataclass(frozen=True)
class Provenance:
    """Stamped on every entry: which policy and which configuration were in force; and the
    deployment's secret that keys the digests of personal fields (never stored here)."""

    policy_version: str
    config_hash: str
    digest_key: bytes = field(repr=False)


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    case_id: int | None
    at: dt.datetime
    kind: str
    facts: dict[str, Any]
    personal: dict[str, Any] | None
    policy_version: str
    config_hash: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "case": self.case_id,
            "at": self.at.isoformat(),
            "kind": self.kind,
            "facts": self.facts,
            "personal": self.personal,
            "policy_version": self.policy_version,
            "config_hash": self.config_hash,
            "hash": self.hash,
        }


# Built once: an entry is appended at every step of every case, and building a statement
# (with its values) costs more than SQLite takes to run it.
_HEAD = sa.select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1)
_HEAD_FOR_UPDATE = _HEAD.with_for_update()
_INSERT_ENTRY = audit_entries.insert()
_MOVE_HEAD = (
    audit_head.update()
    .where(audit_head.c.id == 1)
    .values(
        seq=sa.bindparam("new_seq", type_=audit_head.c.seq.type),
        hash=sa.bindparam("new_hash", type_=audit_head.c.hash.type),
    )
)


async def append(
    conn: AsyncConnection,
    provenance: Provenance,
    kind: str,
    *,
    case_id: int | None = None,
    facts: dict[str, Any] | None = None,
    personal: dict[str, Any] | None = None,
    at: dt.datetime | None = None,
) -> int:
    """Append one entry inside the caller's transaction; returns its sequence number."""
    facts = facts or {}
    personal = personal or {}
    at = at or dt.datetime.now(dt.UTC)
    # The migration seeds this row, so there is always one to lock.
    head_query = _HEAD_FOR_UPDATE if conn.dialect.name == "postgresql" else _HEAD
    head = (await conn.execute(head_query)).one()
    prev_seq, prev_hash = head.seq, head.hash
    entry = ChainedEntry(
        seq=prev_seq + 1,
        case_id=case_id,
        at=at,
        kind=kind,
        facts=facts,
        personal_digest=personal_digest(personal, provenance.digest_key),
        policy_version=provenance.policy_version,
        config_hash=provenance.config_hash,
        prev_hash=prev_hash,
        personal_alg=KEYED,
    )
    entry_hash = entry.compute_hash()
    await conn.execute(
        _INSERT_ENTRY,
        {
            "seq": entry.seq,
            "case_id": case_id,
            "at": at,
            "kind": kind,
            "facts": facts,
            "personal": personal,
            "personal_digest": entry.personal_digest,
            "personal_alg": entry.personal_alg,
            "policy_version": entry.policy_version,
            "config_hash": entry.config_hash,
            "prev_hash": prev_hash,
            "hash": entry_hash,
        },
    )
    await conn.execute(_MOVE_HEAD, {"new_seq": entry.seq, "new_hash": entry_hash})
    return entry.seq


def _entry(row: sa.Row[Any]) -> AuditEntry:
    return AuditEntry(
        seq=row.seq,
        case_id=row.case_id,
        at=row.at,
        kind=row.kind,
        facts=row.facts,
        personal=row.personal,
        policy_version=row.policy_version,
        config_hash=row.config_hash,
        hash=row.hash,
    )


async def entries(
    conn: AsyncConnection,
    *,
    case_id: int | None = None,
    without_case: bool = False,
    since: dt.datetime | None = None,
    community: str | None = None,
) -> list[AuditEntry]:
    """The entries in order; `community`: only those of that community's cases."""
    query = sa.select(audit_entries).order_by(audit_entries.c.seq)
    if community is not None:
        theirs = sa.select(cases.c.id).where(cases.c.community == community)
        query = query.where(audit_entries.c.case_id.in_(theirs))
    if case_id is not None:
        query = query.where(audit_entries.c.case_id == case_id)
    if without_case:
        query = query.where(audit_entries.c.case_id.is_(None))
    if since is not None:
        query = query.where(audit_entries.c.at >= since)
    return [_entry(row) for row in await conn.execute(query)]


async def first_of_case(conn: AsyncConnection, case_id: int) -> AuditEntry | None:
    """The entry that opened the case (the flag: who, how, why)."""
    row = (
        await conn.execute(
            sa.select(audit_entries)
            .where(audit_entries.c.case_id == case_id)
            .order_by(audit_entries.c.seq)
            .limit(1)
        )
    ).first()
    return _entry(row) if row else None


async def chain_rows(
    conn: AsyncConnection, batch: int = 1000
) -> AsyncIterator[tuple[ChainedEntry, str, dict[str, Any] | None]]:
    """Every entry in order, as verify_chain reads them, a batch at a time."""
    last = 0
    while True:
        rows = (
            await conn.execute(
                sa.select(audit_entries)
                .where(audit_entries.c.seq > last)
                .order_by(audit_entries.c.seq)
                .limit(batch)
            )
        ).all()
        if not rows:
            return
        for row in rows:
            yield (
                ChainedEntry(
                    seq=row.seq,
                    case_id=row.case_id,
                    at=row.at,
                    kind=row.kind,
                    facts=row.facts,
                    personal_digest=row.personal_digest,
                    policy_version=row.policy_version,
                    config_hash=row.config_hash,
                    prev_hash=row.prev_hash,
                    personal_alg=row.personal_alg,
                ),
                row.hash,
                row.personal,
            )
        last = rows[-1].seq


async def head(conn: AsyncConnection) -> tuple[int, str]:
    row = (await conn.execute(sa.select(audit_head.c.seq, audit_head.c.hash))).one()
    return row.seq, row.hash
