"""Messages queued in the same DB transaction as the decision that needs them sent."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bot.store.schema import outbox


@dataclass(frozen=True)
class Outgoing:
    id: int
    room_id: str
    content: dict[str, Any]
    attempts: int
    failures: int = 0
    plain: bool = False  # in the clear, whatever the room
    created_at: dt.datetime | None = None

    @property
    def marker(self) -> str:
        """Its id and when it was queued: ids start again in a database restored from a
        backup, and a message found (or deduplicated by Synapse) under an id alone could be
        one sent before the restore, this one never sent."""
        if self.created_at is None:
            return f"outbox:{self.id}"
        return f"outbox:{self.id}.{int(self.created_at.timestamp() * 1_000_000)}"


async def queue(
    conn: AsyncConnection,
    room_id: str,
    content: dict[str, Any],
    now: dt.datetime,
    *,
    plain: bool = False,
    case_id: int | None = None,
) -> int:
    """`case_id`: the case the message tells of (retention redacts it with the case)."""
    result = await conn.execute(
        outbox.insert()
        .values(
            room_id=room_id,
            content=content,
            status="pending",
            created_at=now,
            plain=plain,
            case_id=case_id,
        )
        .returning(outbox.c.id)
    )
    return result.scalar_one()


async def pending(
    conn: AsyncConnection, *, now: dt.datetime | None = None, limit: int = 50
) -> list[Outgoing]:
    """Queued messages in order (those due for an attempt at `now`)."""
    query = sa.select(outbox).where(outbox.c.status == "pending")
    if now is not None:
        query = query.where(
            sa.or_(outbox.c.next_attempt_at.is_(None), outbox.c.next_attempt_at <= now)
        )
    rows = await conn.execute(query.order_by(outbox.c.id).limit(limit))
    return [
        Outgoing(
            row.id, row.room_id, row.content, row.attempts, row.failures, row.plain, row.created_at
        )
        for row in rows
    ]


async def retry_later(
    conn: AsyncConnection, message_id: int, until: dt.datetime, *, error: str
) -> None:
    await conn.execute(
        outbox.update()
        .where(outbox.c.id == message_id)
        .values(failures=outbox.c.failures + 1, next_attempt_at=until, error=error)
    )


async def failed_since(conn: AsyncConnection, since: dt.datetime) -> int:
    """Messages for staff given up on since `since` (shown on /health)."""
    query = (
        sa.select(sa.func.count())
        .select_from(outbox)
        .where(outbox.c.status == "failed", outbox.c.sent_at >= since)
    )
    return (await conn.execute(query)).scalar_one()


async def mark(
    conn: AsyncConnection,
    message_id: int,
    *,
    status: str,
    now: dt.datetime,
    event_id: str | None = None,
    error: str | None = None,
) -> None:
    values: dict[str, Any] = {"attempts": outbox.c.attempts + 1, "error": error}
    if status != "pending":
        # Delivered or given up: the text need not be kept.
        values |= {"status": status, "sent_at": now, "event_id": event_id, "content": None}
    await conn.execute(outbox.update().where(outbox.c.id == message_id).values(**values))
