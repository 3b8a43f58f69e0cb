"""What the policy must know of a moderated room — create event, power levels, members —
known ahead of the flag, and provably fresh.

Only what the homeserver answers to our own reads enters the cache; events
pushed to us never do (a malformed or forged-looking event cannot poison it).
A pushed state event only marks its room's entry (or that member's) stale, at
once, on the transaction's hot path — before any flag that follows it is
handled, since transactions are taken in order — and a fresh read is started
off the flag path. An entry is also stale after `max_age`, and everything is
stale after a gap (the homeserver away, the service starting): then the next
decision reads, as it would without a cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from bot.ports import Homeserver, HomeserverUnavailable, Refused, RoomState

log = logging.getLogger(__name__)
# A member event the bot read, or None: never a member of the room.
MemberEvent = dict[str, Any] | None


@dataclass
class _Entry:
    state: RoomState
    loaded_at: float
    members: dict[str, MemberEvent] = field(default_factory=dict)


class RoomStateCache:
    def __init__(self, homeserver: Homeserver, *, max_age: float = 300.0) -> None:
        self._hs = homeserver
        self._max_age = max_age
        self._entries: dict[str, _Entry] = {}
        # Bumped when a room's state changes: a read begun before cannot be stored as current.
        self._generation: dict[str, int] = {}
        self._loading: dict[str, asyncio.Task[RoomState | Refused]] = {}
        self._refreshes: set[asyncio.Task[Any]] = set()

    # ---- reading ---------------------------------------------------------------------------

    def current(self, room_id: str) -> RoomState | None:
        """The room's state if it is known to be current, without any I/O; else None."""
        entry = self._entries.get(room_id)
        if entry is None or time.monotonic() - entry.loaded_at > self._max_age:
            return None
        return entry.state

    async def state(self, room_id: str) -> RoomState | Refused:
        """Current state: from the cache when known to be current, else read now."""
        return self.current(room_id) or await self._load(room_id)

    async def fresh(self, room_id: str) -> RoomState | Refused:
        """Read now, whatever the cache holds (and keep what was read)."""
        return await self._load(room_id, force=True)

    def known_member(self, room_id: str, user_id: str) -> tuple[bool, MemberEvent]:
        """(known, the member event): known only while the room's entry is current."""
        entry = self._entries.get(room_id)
        if entry is None or self.current(room_id) is None or user_id not in entry.members:
            return False, None
        return True, entry.members[user_id]

    async def member_event(self, room_id: str, user_id: str) -> MemberEvent | Refused:
        known, event = self.known_member(room_id, user_id)
        if known:
            return event
        generation = self._generation.get(room_id, 0)
        read = await self._hs.member_event(room_id, user_id)
        entry = self._entries.get(room_id)
        if (
            entry is not None
            and not isinstance(read, Refused)
            and self._generation.get(room_id, 0) == generation
        ):
            entry.members[user_id] = read
        return read

    # ---- invalidation (hot path: no I/O, no awaiting) ------------------------------------

    def state_changed(self, room_id: str, event_type: str, state_key: object) -> None:
        """A state event was pushed: what it changed is stale until read again."""
        self._generation[room_id] = self._generation.get(room_id, 0) + 1
        entry = self._entries.get(room_id)
        if entry is None:
            return
        if event_type == "m.room.member":
            if isinstance(state_key, str):
                entry.members.pop(state_key, None)
            return
        del self._entries[room_id]
        self._refresh_soon(room_id)

    def forget_everything(self) -> None:
        """After a gap (the homeserver away): nothing is known to be current any more."""
        for room_id in self._entries:
            self._generation[room_id] = self._generation.get(room_id, 0) + 1
        self._entries.clear()

    def warm(self, room_id: str) -> None:
        """Read a room's state now, off any flag's path (a room just joined, say)."""
        self._refresh_soon(room_id)

    async def close(self) -> None:
        for task in (*self._refreshes, *self._loading.values()):
            task.cancel()
        await asyncio.gather(*self._refreshes, *self._loading.values(), return_exceptions=True)

    # ---- loading ---------------------------------------------------------------------------

    def _refresh_soon(self, room_id: str) -> None:
        try:
            task = asyncio.get_running_loop().create_task(self._refresh(room_id))
        except RuntimeError:  # no loop (a unit test calling from sync code): read on demand
            return
        self._refreshes.add(task)
        task.add_done_callback(self._refreshes.discard)

    async def _refresh(self, room_id: str) -> None:
        with contextlib.suppress(HomeserverUnavailable):
            await self._load(room_id)

    async def _load(self, room_id: str, *, force: bool = False) -> RoomState | Refused:
        """One read at a time per room: callers arriving meanwhile share its answer."""
        loading = self._loading.get(room_id)
        if loading is None or (force and loading.done()):
            loading = asyncio.get_running_loop().create_task(self._read(room_id))
            self._loading[room_id] = loading
            loading.add_done_callback(lambda _: self._loading.pop(room_id, None))
        return await asyncio.shield(loading)

    async def _read(self, room_id: str) -> RoomState | Refused:
        for _ in range(3):
            started = time.monotonic()
            generation = self._generation.get(room_id, 0)
            state = await self._hs.room_state(room_id)
            if isinstance(state, Refused):
                self._entries.pop(room_id, None)
                return state
            if self._generation.get(room_id, 0) == generation:
                break
            # The room changed while we read: what we have may predate it. Read again.
        else:
            return state  # changing as fast as we read: answer, but cache nothing
        previous = self._entries.get(room_id)
        # Members read earlier stay valid unless a member event arrived since (which
        # removed them from the map): keep them.
        members = previous.members if previous is not None else {}
        self._entries[room_id] = _Entry(state, started, members)
        return state
