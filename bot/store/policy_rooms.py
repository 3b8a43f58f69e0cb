"""Members' `!policy` DMs: which room, and when they were last told and last answered
(bot/members/policy.py)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bot.store.schema import policy_rooms


@dataclass(frozen=True)
class PolicyRoom:
    user_id: str
    room_id: str
    last_sent_at: dt.datetime | None
    last_reply_at: dt.datetime | None
    community: str  # the one they last asked in


def _room(row: sa.Row) -> PolicyRoom:  # type: ignore[type-arg]
    return PolicyRoom(row.user_id, row.room_id, row.last_sent_at, row.last_reply_at, row.community)


async def of_member(conn: AsyncConnection, user_id: str) -> PolicyRoom | None:
    query = sa.select(policy_rooms).where(policy_rooms.c.user_id == user_id)
    row = (await conn.execute(query)).first()
    return _room(row) if row else None


async def in_room(conn: AsyncConnection, room_id: str) -> PolicyRoom | None:
    query = sa.select(policy_rooms).where(policy_rooms.c.room_id == room_id)
    row = (await conn.execute(query)).first()
    return _room(row) if row else None


async def opened(
    conn: AsyncConnection, user_id: str, room_id: str, at: dt.datetime, *, community: str
) -> None:
    await conn.execute(
        policy_rooms.insert().values(
            user_id=user_id, room_id=room_id, opened_at=at, community=community
        )
    )


async def sent(conn: AsyncConnection, user_id: str, at: dt.datetime, *, community: str) -> None:
    """Told how it works in `community`: what they write next is answered in its words
    (answered afresh: an answer in another community's words does not count)."""
    await conn.execute(
        policy_rooms.update()
        .where(policy_rooms.c.user_id == user_id)
        .values(
            last_sent_at=at,
            community=community,
            # The row as it was: the community before this update.
            last_reply_at=sa.case(
                (policy_rooms.c.community == community, policy_rooms.c.last_reply_at),
                else_=None,
            ),
        )
    )


async def community_of(conn: AsyncConnection, room_id: str) -> str | None:
    """The community a policy DM answers for (None: no such DM)."""
    query = sa.select(policy_rooms.c.community).where(policy_rooms.c.room_id == room_id)
    return (await conn.execute(query)).scalar_one_or_none()


async def replied(conn: AsyncConnection, room_id: str, at: dt.datetime) -> None:
    await conn.execute(
        policy_rooms.update().where(policy_rooms.c.room_id == room_id).values(last_reply_at=at)
    )


async def room_ids(conn: AsyncConnection) -> list[str]:
    return list((await conn.execute(sa.select(policy_rooms.c.room_id))).scalars())
