"""What the policy must know of a moderated room — create event, power levels, every
member's membership — known ahead of the flag, and provably fresh, so that a flag
needs no read at all.

How an entry is known to be current:

- Only what the homeserver answers to our own reads enters it: one read of the
  room's whole state (GET /rooms/{id}/state) when the room is first seen, after a
  change, after a gap. Events pushed to us never do, and an answer that looks
  malformed or forged (a create event without a sender, a member event under
  someone else's key, the same state twice) is used for that one decision and
  never kept.
- Synapse pushes every event of the room to us, in order, and the transaction
  that carries a state event is taken before any transaction after it. The
  intake tells this cache of each state event the moment it arrives, before any
  flag that follows it is handled: a change to the power levels, the create
  event, the join rules or a tombstone drops the room's entry; a member event
  makes that member unknown. Either way a read is started at once, off the flag
  path, so the flag that follows usually finds it done.
- A read is kept only if nothing it could have missed arrived while it was in
  flight (a change pushed meanwhile: read again).
- A gap — the service starting, the homeserver away (Synapse may drop the events
  it had queued for us when it restarts) — makes everything unknown: the next
  decision reads, as it would without a cache. Reconciliation then feeds what
  was missed through the intake, which invalidates like any push.
- An entry is also unknown after `max_age`, as a bound on anything else; an entry
  in use is read again, off the flag path, once it is half that old.

Whenever an entry is not known to be current, the caller reads, exactly as it
would without a cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bot.core.ports import Homeserver, HomeserverUnavailable, Refused, RoomState

log = logging.getLogger(__name__)
# A member event the bot read, or None: never a member of the room.
MemberEvent = dict[str, Any] | None
MEMBERSHIPS = frozenset({"join", "invite", "leave", "ban", "knock"})
# Reads begun before a change are read again, this many times, then answered uncached.
READ_ATTEMPTS = 3


def membership_in(content: object) -> str | None:
    """The `membership` of an m.room.member content (or prev_content); None if it has none."""
    if isinstance(content, dict):
        value = content.get("membership")
        return value if isinstance(value, str) else None
    return None


def member_well_formed(event: object, room_id: str, user_id: str) -> bool:
    """A member event fit to be kept: the shape the decisions read, under its own key."""
    if not isinstance(event, dict):
        return False
    content = event.get("content")
    ts = event.get("origin_server_ts")
    return (
        event.get("type", "m.room.member") == "m.room.member"
        and event.get("state_key", user_id) == user_id
        and event.get("room_id", room_id) == room_id
        and isinstance(event.get("sender"), str)
        and isinstance(content, dict)
        and content.get("membership") in MEMBERSHIPS
        and isinstance(ts, int)
        and not isinstance(ts, bool)
    )


@dataclass(frozen=True)
class Snapshot:
    """One read of a room's whole state, as far as the policy needs it."""

    state: RoomState
    members: dict[str, dict[str, Any]]  # user -> their member event (well-formed ones)
    malformed_members: frozenset[str]  # member events not fit to keep: never known


def snapshot(room_id: str, events: Iterable[Any]) -> Snapshot | None:
    """The room's state from GET /rooms/{id}/state; None if it looks malformed or forged."""
    seen: set[tuple[str, str]] = set()
    create: dict[str, Any] | None = None
    power: dict[str, Any] | None = None
    members: dict[str, dict[str, Any]] = {}
    malformed: set[str] = set()
    for event in events:
        if not isinstance(event, dict):
            return None
        kind, key = event.get("type"), event.get("state_key")
        if not isinstance(kind, str) or not isinstance(key, str):
            return None
        if (kind, key) in seen or event.get("room_id", room_id) != room_id:
            return None  # the same state twice, or another room's: not an answer to trust
        seen.add((kind, key))
        if kind == "m.room.member":
            if member_well_formed(event, room_id, key):
                members[key] = event
            else:
                malformed.add(key)
        elif (kind, key) == ("m.room.create", ""):
            create = event
        elif (kind, key) == ("m.room.power_levels", ""):
            content = event.get("content")
            if not isinstance(content, dict):
                return None
            power = content
    if create is None:
        return None
    sender, content = create.get("sender"), create.get("content")
    if not isinstance(sender, str) or not sender or not isinstance(content, dict):
        return None
    if not isinstance(content.get("room_version", "1"), str):
        return None
    return Snapshot(RoomState.of(room_id, create, power), members, frozenset(malformed))


@dataclass
class _Entry:
    state: RoomState
    loaded_at: float
    # Every member event of the room as read; a user in neither map nor `unknown` was
    # never a member (the read listed them all).
    members: dict[str, dict[str, Any]]
    unknown: set[str]  # changed since the read (or not fit to keep): read before use


class RoomStateCache:
    def __init__(self, homeserver: Homeserver, *, max_age: float = 300.0) -> None:
        self._hs = homeserver
        self._max_age = max_age
        self._entries: dict[str, _Entry] = {}
        # Every change pushed to us (and every gap) takes the next number. A read keeps
        # what it read only if nothing it could have missed was numbered after it began;
        # the marks are kept only while some read is in flight (later reads begin later).
        self._seq = 0
        self._reads = 0
        self._room_changed: dict[str, int] = {}
        self._member_changed: dict[tuple[str, str], int] = {}
        self._forgotten = 0
        self._loading: dict[str, asyncio.Task[RoomState | Refused]] = {}
        self._refreshes: set[asyncio.Task[Any]] = set()

    # ---- reading ---------------------------------------------------------------------------

    def current(self, room_id: str) -> RoomState | None:
        """The room's state if it is known to be current, without any I/O; else None."""
        entry = self._current_entry(room_id)
        return entry.state if entry is not None else None

    async def state(self, room_id: str) -> RoomState | Refused:
        """Current state: from the cache when known to be current, else read now."""
        return self.current(room_id) or await self._load(room_id)

    async def fresh(self, room_id: str) -> RoomState | Refused:
        """Read now, whatever the cache holds (and keep what was read)."""
        return await self._load(room_id, force=True)

    def known_member(self, room_id: str, user_id: str) -> tuple[bool, MemberEvent]:
        """(known, the member event): known only while the room's entry is current."""
        entry = self._current_entry(room_id)
        if entry is None or user_id in entry.unknown:
            return False, None
        return True, entry.members.get(user_id)

    async def member_event(self, room_id: str, user_id: str) -> MemberEvent | Refused:
        """The member's current m.room.member event: known, else read now."""
        known, event = self.known_member(room_id, user_id)
        if known:
            return event
        return await self._read_member(room_id, user_id)

    # ---- invalidation (hot path: no I/O, no awaiting) ------------------------------------

    def state_changed(self, room_id: str, event_type: str, state_key: object) -> None:
        """A state event was pushed: what it changed is unknown until read again."""
        self._seq += 1
        if event_type == "m.room.member" and isinstance(state_key, str):
            if self._reads:
                self._member_changed[(room_id, state_key)] = self._seq
            entry = self._entries.get(room_id)
            if entry is not None:
                entry.members.pop(state_key, None)
                entry.unknown.add(state_key)
                self._start(self._refresh_member(room_id, state_key))
            return
        # Anything else (a member event without a proper key included) may change who
        # may flag whom: the whole entry goes.
        if self._reads:
            self._room_changed[room_id] = self._seq
        if self._entries.pop(room_id, None) is not None:
            self._start(self._refresh(room_id))

    def forget_everything(self) -> None:
        """After a gap (the homeserver away): nothing is known to be current any more."""
        self._seq += 1
        self._forgotten = self._seq
        self._entries.clear()

    def warm(self, room_id: str) -> None:
        """Read a room's state now, off any flag's path (a room just joined, say)."""
        self._start(self._refresh(room_id))

    async def close(self) -> None:
        for task in (*self._refreshes, *self._loading.values()):
            task.cancel()
        await asyncio.gather(*self._refreshes, *self._loading.values(), return_exceptions=True)

    # ---- loading ---------------------------------------------------------------------------

    def _current_entry(self, room_id: str) -> _Entry | None:
        entry = self._entries.get(room_id)
        if entry is None:
            return None
        age = time.monotonic() - entry.loaded_at
        if age > self._max_age:
            return None
        if age > self._max_age / 2 and room_id not in self._loading:
            self._start(self._refresh(room_id))  # in use: read again before it runs out
        return entry

    def _start(self, work: Any) -> None:
        try:
            task = asyncio.get_running_loop().create_task(work)
        except RuntimeError:  # no loop (a unit test calling from sync code): read on demand
            work.close()
            return
        self._refreshes.add(task)
        task.add_done_callback(self._refreshes.discard)

    async def _refresh(self, room_id: str) -> None:
        with contextlib.suppress(HomeserverUnavailable):
            await self._load(room_id)

    async def _refresh_member(self, room_id: str, user_id: str) -> None:
        with contextlib.suppress(HomeserverUnavailable):
            await self._read_member(room_id, user_id)

    async def _load(self, room_id: str, *, force: bool = False) -> RoomState | Refused:
        """One read at a time per room: callers arriving meanwhile share its answer."""
        loading = self._loading.get(room_id)
        if loading is None or (force and loading.done()):
            loading = asyncio.get_running_loop().create_task(self._read(room_id))
            self._loading[room_id] = loading
            loading.add_done_callback(lambda _: self._loading.pop(room_id, None))
        return await asyncio.shield(loading)

    def _begin_read(self) -> int:
        self._reads += 1
        return self._seq

    def _end_read(self) -> None:
        self._reads -= 1
        if not self._reads:
            self._room_changed.clear()
            self._member_changed.clear()

    def _missed(self, began: int, room_id: str, user_id: str | None = None) -> bool:
        """Whether something a read begun at `began` may not show arrived since."""
        if self._forgotten > began:
            return True
        if user_id is not None:
            return self._member_changed.get((room_id, user_id), -1) > began
        return self._room_changed.get(room_id, -1) > began

    async def _read(self, room_id: str) -> RoomState | Refused:
        read: Snapshot | None = None
        for _ in range(READ_ATTEMPTS):
            began = self._begin_read()
            try:
                loaded_at = time.monotonic()
                events = await self._hs.room_state_events(room_id)
                if isinstance(events, Refused):
                    self._entries.pop(room_id, None)
                    return events
                read = snapshot(room_id, events)
                if read is None:
                    break
                if self._missed(began, room_id):
                    continue  # the room changed while we read: what we have may predate it
                self._keep(room_id, read, loaded_at, began)
                return read.state
            finally:
                self._end_read()
        if read is None:
            # Not fit to keep: this decision is made on the create event and power
            # levels read one by one, as without a cache, and nothing is kept.
            log.warning("the state of %s looks malformed: not cached", room_id)
            self._entries.pop(room_id, None)
            return await self._hs.room_state(room_id)
        return read.state  # changing as fast as we read: answered, but nothing kept

    def _keep(self, room_id: str, read: Snapshot, loaded_at: float, began: int) -> None:
        # A member whose event arrived while we read may be shown as they were: unknown.
        changed = {
            user
            for room, user in self._member_changed
            if room == room_id and self._missed(began, room_id, user)
        }
        members = {user: event for user, event in read.members.items() if user not in changed}
        unknown = set(read.malformed_members) | changed
        self._entries[room_id] = _Entry(read.state, loaded_at, members, unknown)
        for user in changed:
            self._start(self._refresh_member(room_id, user))

    async def _read_member(self, room_id: str, user_id: str) -> MemberEvent | Refused:
        began = self._begin_read()
        try:
            event = await self._hs.member_event(room_id, user_id)
            entry = self._entries.get(room_id)
            keep = (
                entry is not None
                and not isinstance(event, Refused)
                and (event is None or member_well_formed(event, room_id, user_id))
                and not self._missed(began, room_id, user_id)
            )
            if keep:
                assert entry is not None and not isinstance(event, Refused)
                if event is None:
                    entry.members.pop(user_id, None)
                else:
                    entry.members[user_id] = event
                entry.unknown.discard(user_id)
            return event
        finally:
            self._end_read()
