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

    @property
    def marker(self) -> str:
        return f"outbox:{self.id}"


async def queue(
    conn: AsyncConnection, room_id: str, content: dict[str, Any], now: dt.datetime
) -> int:
    result = await conn.execute(
        outbox.insert()
        .values(room_id=room_id, content=content, status="pending", created_at=now)
        .returning(outbox.c.id)
    )
    return result.scalar_one()


async def pending(conn: AsyncConnection, limit: int = 50) -> list[Outgoing]:
    rows = await conn.execute(
        sa.select(outbox).where(outbox.c.status == "pending").order_by(outbox.c.id).limit(limit)
    )
    return [Outgoing(row.id, row.room_id, row.content, row.attempts) for row in rows]


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
