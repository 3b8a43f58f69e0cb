"""DM rooms made ahead of any flag, so telling a flagged member waits for no room creation.

Creating a room is most of what a notice costs: on Synapse a createRoom with its
invite takes several times as long as an invite into a room that exists. So the
bot keeps `policy.ready_dm_rooms` empty private rooms of its own, encrypted from
their first event when DMs are (`encryption.private_rooms`). A flag's notice takes
one (bot/steps/direct.py), invites the member into it as a DM and sends the notice;
another is made a few seconds later, off every flag's path.

A ready room holds nothing and no one but the bot: nothing about any member is
prepared before a flag, and no one sees a room until they are invited to it.

What can go wrong, and what then:
- a creation cut short (crash, lost answer): its row was written first, with the
  room's marker, so the next round finishes it (the marker's alias finds the room)
  instead of making a second;
- the homeserver away or refusing: nothing is ready, and a notice creates its room
  as it would with none kept (the same call the pool saves); retried next round;
- the setting for encrypted DMs changed: rooms of the other kind are left, not used;
- two notices at once: the row's delete decides who gets a room (bot/store/ready_rooms.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bot.core.ports import Homeserver, HomeserverUnavailable, Refused
from bot.rooms.directory import RoomDirectory
from bot.store import cases
from bot.store import ready_rooms as store
from bot.store.transact import transact

log = logging.getLogger(__name__)
MARKER_PREFIX = "ready:"
# After a room was taken, wait this long before making the next: the case that took
# it is still removing the member and telling staff, and a room creation on the same
# homeserver would only slow those down.
REFILL_AFTER_SECONDS = 2.0


def taken(what: str, room_id: str) -> dict[str, Any]:
    """What a step's progress records of a room made ahead that it took."""
    return {f"{what}_room": room_id, f"{what}_made_ahead": True}


async def record_taken(
    conn: AsyncConnection,
    case_id: int,
    step: str,
    what: str,
    progress: dict[str, Any],
    case_field: str,
    room_id: str,
) -> dict[str, Any]:
    """A room made ahead, taken: recorded as the step's `<what>_room` and the case's
    `case_field`, in the caller's transaction; the step's progress as recorded."""
    progress = progress | taken(what, room_id)
    await cases.save_progress(conn, case_id, step, progress)
    await cases.set_fields(conn, case_id, **{case_field: room_id})
    return progress


class ReadyRooms:
    def __init__(
        self,
        db: AsyncEngine,
        homeserver: Homeserver,
        rooms: RoomDirectory,
        *,
        wanted: int,
        encrypted: bool,
    ) -> None:
        self._db = db
        self._hs = homeserver
        self._rooms = rooms
        self.wanted = wanted
        self._encrypted = encrypted
        self.ready = 0  # as of the last round (for /health)
        self.problem: str | None = None  # why the last round could not make one
        self.on_taken = lambda: None  # told when a room was handed over (to make another)
        # The bot's m.direct, read ahead too: a notice takes a room as its case opens only
        # once it is known the member has no DM with the bot (bot/steps/notify.py).
        self._direct_read = False
        # The created rooms of the kind DMs are, as last known: one is chosen from these,
        # without a read, for a notice sent ahead (bot/steps/notify_ahead.py); the
        # transaction that reserves it decides whether it is still there.
        self._free: list[str] = []

    async def load(self) -> None:
        """Before the first transaction: ready rooms are the bot's conversations, not
        rooms it moderates."""
        async with self._db.connect() as conn:
            known = await store.all_rooms(conn)
        for room in known:
            if room.room_id is not None:
                self._rooms.add_dm(room.room_id)
        self._know(known)

    async def work_once(self) -> bool:
        """Finish, clear out or make one room; True if there may be more to do now."""
        async with self._db.connect() as conn:
            known = await store.all_rooms(conn)
        self._know(known)
        try:
            if not self._direct_read and self.wanted > 0:
                await self._hs.direct_rooms()
                self._direct_read = True
            for room in known:
                if room.encrypted != self._encrypted or self.wanted <= 0:
                    await self._discard(room)
                    return True
                if room.room_id is None:
                    return await self._create(room.marker)
            if self.ready >= self.wanted:
                self.problem = None
                return False
            marker = f"{MARKER_PREFIX}{uuid.uuid4().hex}"
            async with self._db.begin() as conn:
                await store.plan(
                    conn, marker, encrypted=self._encrypted, now=dt.datetime.now(dt.UTC)
                )
            return await self._create(marker)
        except HomeserverUnavailable as exc:
            self._failed(f"the homeserver is not reachable ({exc})")
            return False

    async def _create(self, marker: str) -> bool:
        created = await self._hs.create_room(
            marker=marker, invite=[], is_direct=False, encrypted=self._encrypted
        )
        if isinstance(created, Refused):
            # Refused, so not made (a room an earlier attempt made is found, not refused):
            # the plan goes, and the next round plans afresh.
            async with self._db.begin() as conn:
                await store.forget(conn, marker)
            self._failed(f"the homeserver refused to create a room ({created})")
            return False
        self._rooms.add_dm(created.room_id)
        async with self._db.begin() as conn:
            await store.created(conn, marker, created.room_id)
        self._free.append(created.room_id)
        self.problem = None
        return True

    def _know(self, known: list[store.ReadyRoom]) -> None:
        self._free = [r.room_id for r in known if r.room_id and r.encrypted == self._encrypted]
        self.ready = len(self._free)

    def claim_free(self) -> str | None:
        """A created room to reserve, gone from what is known free (until the next round
        reads the pool again); None if none is known. The newest: a case takes the
        oldest (`take`), so two flags at once do not reach for the same room."""
        if self.wanted <= 0 or not self._free:
            return None
        return self._free.pop()

    async def _discard(self, room: store.ReadyRoom) -> None:
        """A room of the kind DMs no longer are (the encryption setting changed)."""
        if room.room_id is not None:
            left = await self._hs.leave_room(room.room_id)
            if isinstance(left, Refused):
                log.warning("could not leave the unused room %s: %s", room.room_id, left)
        async with self._db.begin() as conn:
            await store.forget(conn, room.marker)

    def status(self) -> dict[str, Any]:
        """For /health: always ok (with none ready, a notice creates its room, only
        slower), with why none could be made, if so."""
        return {"ok": True, "ready": self.ready, "wanted": self.wanted} | (
            {"problem": self.problem} if self.problem else {}
        )

    def _failed(self, why: str) -> None:
        if why != self.problem:
            log.warning("no DM room made ahead: %s (notices create their rooms)", why)
        self.problem = why

    async def take(
        self, case_id: int, step: str, what: str, progress: dict[str, Any], case_field: str
    ) -> str | None:
        """A ready room, recorded as the step's `<what>_room` (and `<what>_made_ahead`) and
        as the case's `case_field` in the transaction that takes it (a resumed attempt
        finds it there, and the member's replies in it reach staff after a restart), or
        None if none is ready."""
        if self.wanted <= 0:
            return None
        # Runs to its end even if the step is cut short (at the alert's deadline): a room
        # taken is always a room recorded, and never half a transaction.
        room_id = await asyncio.shield(
            transact(self._db, self.take_in, case_id, step, what, progress, case_field)
        )
        if room_id is not None:
            self.handed_over()
        return room_id

    async def take_in(
        self,
        conn: AsyncConnection,
        case_id: int,
        step: str,
        what: str,
        progress: dict[str, Any],
        case_field: str,
    ) -> str | None:
        """`take` in the caller's transaction (the one that opens the case: see
        bot/steps/notify.py); once it has committed, the caller calls `handed_over`."""
        if self.wanted <= 0:
            return None
        room_id = await store.take(conn, encrypted=self._encrypted)
        if room_id is not None:
            with contextlib.suppress(ValueError):
                self._free.remove(room_id)
            await record_taken(conn, case_id, step, what, progress, case_field, room_id)
        return room_id

    def handed_over(self) -> None:
        """A room taken (and committed): one fewer ready, and another to be made."""
        self.ready = max(self.ready - 1, 0)
        self.on_taken()
