"""Rooms and people by the names others see, for what staff read (the id after, once)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from bot.core.ports import Homeserver, HomeserverUnavailable
from bot.texts.wording import place


async def names_of(hs: Homeserver, ids: Iterable[str]) -> dict[str, str | None]:
    """Each room's name (`!…`) or person's display name (`@…`), read at once; None when
    there is none, or it cannot be read now."""
    unique = list(dict.fromkeys(ids))

    async def name(some_id: str) -> str | None:
        try:
            if some_id.startswith("@"):
                return await hs.display_name(some_id)
            return await hs.room_name(some_id)
        except HomeserverUnavailable:
            return None

    return dict(zip(unique, await asyncio.gather(*map(name, unique)), strict=True))


async def named_room(hs: Homeserver, room_id: str) -> str:
    """'Group chat (!abc:example.org)', or the id alone when no name can be read."""
    return place(room_id, (await names_of(hs, [room_id]))[room_id])
