"""Rooms by the names their members see, for what staff read (the id after, once)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from bot.core.ports import Homeserver, HomeserverUnavailable
from bot.texts.wording import place


async def room_names(hs: Homeserver, room_ids: Iterable[str]) -> dict[str, str | None]:
    """Each room's name (None: it has none, or it cannot be read now), read at once."""
    unique = list(dict.fromkeys(room_ids))

    async def name(room_id: str) -> str | None:
        try:
            return await hs.room_name(room_id)
        except HomeserverUnavailable:
            return None

    return dict(zip(unique, await asyncio.gather(*map(name, unique)), strict=True))


async def named_room(hs: Homeserver, room_id: str) -> str:
    """'Group chat (!abc:example.org)', or the id alone when no name can be read."""
    return place(room_id, (await room_names(hs, [room_id]))[room_id])
