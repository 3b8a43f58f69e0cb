"""Recording what Synapse delivered: transaction ids, event ids, the inbox to act on."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from bot.store.schema import inbox, seen_events, transactions


def _insert(conn: AsyncConnection, table: sa.Table) -> Any:
    return (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(table)


def storable_txn_id(txn_id: str) -> str:
    """Synapse's txn ids are small integers; anything longer than the column is hashed."""
    if len(txn_id) <= 255:
        return txn_id
    return "sha256:" + hashlib.sha256(txn_id.encode()).hexdigest()


@dataclass(frozen=True)
class Recorded:
    duplicate_transaction: bool
    new_event_ids: frozenset[str]


async def record_transaction(
    conn: AsyncConnection,
    txn_id: str,
    event_ids: Sequence[str],
    to_act_on: Sequence[tuple[dict[str, Any], int]],
    now: dt.datetime,
    *,
    caught_up: bool = False,
) -> Recorded:
    """Persist a transaction; only events never seen before are queued to act on.

    A retried transaction carries the same ids, so nothing is queued twice; a
    reused txn id (Synapse restored from backup) still has its new events queued.
    """
    inserted_txn = await conn.execute(
        _insert(conn, transactions)
        .values(txn_id=storable_txn_id(txn_id), received_at=now, event_count=len(event_ids))
        .on_conflict_do_nothing()
        .returning(transactions.c.txn_id)
    )
    duplicate = inserted_txn.first() is None
    new_ids: frozenset[str] = frozenset()
    if event_ids:
        unique_ids = list(dict.fromkeys(event_ids))
        result = await conn.execute(
            _insert(conn, seen_events).on_conflict_do_nothing().returning(seen_events.c.event_id),
            [{"event_id": event_id, "received_at": now} for event_id in unique_ids],
        )
        new_ids = frozenset(result.scalars())
    # One row per event id, even if a transaction carried an event twice.
    queued = {e["event_id"]: (e, lane) for e, lane in to_act_on if e["event_id"] in new_ids}
    if queued:
        await conn.execute(
            inbox.insert(),
            [
                {
                    "event_id": event["event_id"],
                    "room_id": event["room_id"],
                    "event_type": event["type"],
                    "payload": event,
                    "received_at": now,
                    "status": "pending",
                    "lane": lane,
                    "caught_up": caught_up,
                }
                for event, lane in queued.values()
            ],
        )
    return Recorded(duplicate, new_ids)


@dataclass(frozen=True)
class InboxItem:
    seq: int
    event_id: str
    room_id: str
    event_type: str
    payload: dict[str, Any]
    received_at: dt.datetime
    attempts: int
    lane: int = 1
    caught_up: bool = False


async def pending(
    conn: AsyncConnection,
    *,
    lane: int | None = None,
    now: dt.datetime | None = None,
    limit: int = 100,
) -> list[InboxItem]:
    """Queued events in arrival order (of one lane; due for an attempt at `now`)."""
    query = sa.select(inbox).where(inbox.c.status == "pending")
    if lane is not None:
        query = query.where(inbox.c.lane == lane)
    if now is not None:
        query = query.where(
            sa.or_(inbox.c.next_attempt_at.is_(None), inbox.c.next_attempt_at <= now)
        )
    rows = await conn.execute(query.order_by(inbox.c.seq).limit(limit))
    return [
        InboxItem(
            seq=row.seq,
            event_id=row.event_id,
            room_id=row.room_id,
            event_type=row.event_type,
            payload=row.payload,
            received_at=row.received_at,
            attempts=row.attempts,
            lane=row.lane,
            caught_up=row.caught_up,
        )
        for row in rows
    ]


async def next_attempt_at(conn: AsyncConnection, lane: int) -> dt.datetime | None:
    """When the lane's earliest event waiting to be retried falls due."""
    query = sa.select(sa.func.min(inbox.c.next_attempt_at)).where(
        inbox.c.status == "pending", inbox.c.lane == lane
    )
    return (await conn.execute(query)).scalar_one()


async def retry_encrypted_now(conn: AsyncConnection) -> None:
    """Keys arrived: encrypted events waiting for theirs are due again at once."""
    await conn.execute(
        inbox.update()
        .where(inbox.c.status == "pending", inbox.c.event_type == "m.room.encrypted")
        .values(next_attempt_at=None)
    )


async def retry_later(
    conn: AsyncConnection, seq: int, until: dt.datetime, error: str, *, counted: bool
) -> None:
    """Keep the event queued until `until`; `counted`: the attempt counts towards the cap."""
    values: dict[str, Any] = {"next_attempt_at": until, "error": error}
    if counted:
        values["attempts"] = inbox.c.attempts + 1
    await conn.execute(inbox.update().where(inbox.c.seq == seq).values(**values))


async def finish(
    conn: AsyncConnection, seq: int, now: dt.datetime, *, error: str | None = None
) -> None:
    """Mark an inbox event processed (or failed for good), and drop its content."""
    await conn.execute(
        inbox.update()
        .where(inbox.c.seq == seq)
        .values(
            status="failed" if error else "done",
            error=error,
            payload=None,
            processed_at=now,
            attempts=inbox.c.attempts + 1,
        )
    )


async def finish_many(conn: AsyncConnection, seqs: list[int], now: dt.datetime) -> None:
    """Mark several events that needed no action as processed, in one statement."""
    await conn.execute(
        inbox.update()
        .where(inbox.c.seq.in_(seqs))
        .values(status="done", payload=None, processed_at=now, attempts=inbox.c.attempts + 1)
    )


async def backlog(conn: AsyncConnection) -> int:
    query = sa.select(sa.func.count()).select_from(inbox).where(inbox.c.status == "pending")
    return (await conn.execute(query)).scalar_one()


async def prune(conn: AsyncConnection, older_than: dt.datetime) -> int:
    """Forget delivery bookkeeping older than the retention window."""
    removed = 0
    for table, column in (
        (transactions, transactions.c.received_at),
        (seen_events, seen_events.c.received_at),
    ):
        result = await conn.execute(table.delete().where(column < older_than))
        removed += result.rowcount or 0
    result = await conn.execute(
        inbox.delete().where(inbox.c.status != "pending", inbox.c.received_at < older_than)
    )
    return removed + (result.rowcount or 0)
