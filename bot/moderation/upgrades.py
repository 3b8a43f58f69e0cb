"""Room upgrades: a moderated room replaced by a new one stays moderated, in the new one.

Upgrading a room (Element's "upgrade this room", Synapse's /upgrade) makes a new room
and leaves a `m.room.tombstone` in the old one naming it; members move over. A bot
that did not follow would watch an empty room while the group talks, unwatched, in
the new one, and nobody would be told. So, on a tombstone in a room the bot moderates:

- it is believed only from someone with the power to send it in that room (on the
  room's state read fresh; Synapse checks that too, but a push is only as good as
  the hs_token, so it is checked again here). Anyone else's is ignored, recorded and
  reported to staff (once per sender and room in the refusal window);
- the bot joins the replacement and checks that the replacement names the old room
  as its predecessor (its m.room.create): a tombstone cannot point the bot at a room
  of someone's choosing. One that does not is left at once, and reported;
- a replacement the bot cannot join yet (an invite-only room: upgrades keep the join
  rules) is recorded as awaited: staff are asked to invite the bot, and that invite
  is taken from anyone (bot/moderation/membership.py), since the replacement's own
  create event proves what it is;
- joined, the replacement is moderated as the old room was (staff are told, with
  what the bot can do there), and the old room's open cases carry on in it: a flag
  there corroborates them, and a member coming back there is a return
  (`policy.on_rejoin`). The old room stays moderated too, for whoever is still in it.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.config.deployment import Deployment
from bot.core.ports import Homeserver, Refused
from bot.intake.dispatch import Handling
from bot.moderation.authorization import event_level, power_level, room_powers
from bot.moderation.room_state import RoomStateCache
from bot.rooms.directory import RoomDirectory
from bot.rooms.names import named_room, names_of
from bot.rooms.refusal_reports import RefusalReports
from bot.rooms.staff_room import StaffRoom
from bot.store import audit, cases, outbox, rooms
from bot.store import room_upgrades as store
from bot.texts.messages import Texts
from bot.texts.wording import place

log = logging.getLogger(__name__)

TOMBSTONE = "m.room.tombstone"


class UnreadableRoom(RuntimeError):
    """The room's state cannot be read now: the event is tried again (the dispatcher)."""


def replacement_of(event: Mapping[str, Any]) -> str | None:
    """The room a tombstone names (None: not a well-formed tombstone)."""
    content = event.get("content")
    room = content.get("replacement_room") if isinstance(content, Mapping) else None
    if event.get("state_key") != "" or not isinstance(room, str):
        return None
    # Room ids from version 12 on carry no server name: "!" and an opaque part.
    return room if room.startswith("!") and 1 < len(room) <= 255 else None


class RoomUpgrades:
    def __init__(
        self,
        db: AsyncEngine,
        homeserver: Homeserver,
        deployment: Deployment,
        staff_room: StaffRoom,
        room_directory: RoomDirectory,
        *,
        room_state: RoomStateCache,
        reports: RefusalReports,
        texts: Texts,
        on_outbox: Callable[[], None],
    ) -> None:
        self._db = db
        self._hs = homeserver
        self._deployment = deployment
        self._staff_room = staff_room
        self._rooms = room_directory
        self._room_state = room_state
        self._reports = reports
        self._texts = texts
        self._on_outbox = on_outbox

    async def tombstone(self, handling: Handling) -> None:
        """A tombstone in a group room (the dispatcher's handler)."""
        item = handling.item
        old = item.room_id
        if old not in self._rooms.moderated:
            return  # a room the bot does not moderate: nothing of ours moves
        sender = str(item.payload.get("sender", ""))
        new = replacement_of(item.payload)
        state = await self._room_state.fresh(old)
        if isinstance(state, Refused):
            raise UnreadableRoom(f"the power levels of {old} cannot be read ({state.errcode})")
        needed = event_level(state, TOMBSTONE, state_event=True)
        if power_level(sender, state) < needed:
            why = f"they are below the power to send it ({needed})"
            await self._ignore(handling, sender, why, old, new)
            return
        if new is None or new == old:
            await self._ignore(handling, sender, "it names no other room", old, new)
            return
        async with self._db.connect() as conn:
            known = await store.get(conn, new)
        if known is not None and known.followed_at is not None:
            return  # followed already (the same tombstone, seen again by the sync)
        now = dt.datetime.now(dt.UTC)
        joined = await self._hs.join_room(new)
        if isinstance(joined, Refused):
            named_old = await named_room(self._hs, old)
            async with handling.transaction() as conn:
                await store.noted(conn, old_room_id=old, new_room_id=new, by=sender, at=now)
                await audit.append(
                    conn,
                    self._deployment.provenance,
                    "room_upgrade_awaited",
                    facts={"errcode": joined.errcode},
                    personal={"room": old, "replacement": new, "by": sender},
                    at=now,
                )
                await outbox.queue(
                    conn,
                    self._staff_room.address,
                    self._texts.upgrade_join_failed(
                        by=sender, old=named_old, new=new, error=joined.errcode
                    ),
                    now,
                )
            self._on_outbox()
            return
        await self.follow(handling, old_room_id=old, new_room_id=new, by=sender)

    async def awaited(self, room_id: str) -> store.RoomUpgrade | None:
        """The upgrade whose replacement this is, if the bot is still to join it."""
        async with self._db.connect() as conn:
            upgrade = await store.get(conn, room_id)
        return upgrade if upgrade is not None and upgrade.followed_at is None else None

    async def follow(
        self, handling: Handling, *, old_room_id: str, new_room_id: str, by: str
    ) -> None:
        """Joined the replacement: moderate it, if it really replaces the old room."""
        state = await self._room_state.fresh(new_room_id)
        if isinstance(state, Refused):
            raise UnreadableRoom(f"the new room {new_room_id} cannot be read ({state.errcode})")
        predecessor = state.create_content.get("predecessor")
        named_from = predecessor.get("room_id") if isinstance(predecessor, Mapping) else None
        if named_from != old_room_id:
            left = await self._hs.leave_room(new_room_id)
            if isinstance(left, Refused):
                log.warning("could not leave %s (not a replacement): %s", new_room_id, left)
            why = "the room it names does not say it replaces this one"
            await self._ignore(handling, by, why, old_room_id, new_room_id)
            return
        # From the join on, a flag there is a flag (not a stranger's), and the members
        # whose cases move are watched before their cases do (bot/rooms/directory.py).
        # The replacement is the old room's community's (these handlers are its).
        self._rooms.moderate(new_room_id, self._deployment.community)
        async with self._db.connect() as conn:
            members = await cases.active_members(conn, old_room_id)
        for member in members:
            self._rooms.watch_member(new_room_id, member)
        kick, redact = room_powers(self._deployment.bot_user_id, state)
        names = await names_of(self._hs, [old_room_id, new_room_id])
        named_old, named_new = (
            place(old_room_id, names[old_room_id]),
            place(new_room_id, names[new_room_id]),
        )
        now = dt.datetime.now(dt.UTC)
        async with handling.transaction() as conn:
            await store.noted(conn, old_room_id=old_room_id, new_room_id=new_room_id, by=by, at=now)
            await store.followed(conn, new_room_id, now)
            await rooms.joined(
                conn,
                new_room_id,
                inviter=by,
                at=now,
                can_kick=kick,
                can_redact=redact,
                community=self._deployment.community,
            )
            moved = await cases.follow_upgrade(conn, old_room_id, new_room_id)
            await audit.append(
                conn,
                self._deployment.provenance,
                "room_upgraded",
                facts={"can_kick": kick, "can_redact": redact, "cases_moved": len(moved)},
                personal={"room": old_room_id, "replacement": new_room_id, "by": by},
                at=now,
            )
            await outbox.queue(
                conn,
                self._staff_room.address,
                self._texts.room_upgraded(
                    by=by,
                    old=named_old,
                    new=named_new,
                    cases=len(moved),
                    can_kick=kick,
                    can_redact=redact,
                ),
                now,
            )
        log.info("followed the upgrade of %s to %s", old_room_id, new_room_id)
        self._on_outbox()

    async def _ignore(
        self, handling: Handling, sender: str, why: str, room_id: str, replacement: str | None
    ) -> None:
        """A tombstone not acted on (in `room_id`, naming `replacement`): recorded, and staff
        told (once in the window)."""
        now = dt.datetime.now(dt.UTC)
        named = await named_room(self._hs, room_id)
        async with handling.transaction() as conn:
            await audit.append(
                conn,
                self._deployment.provenance,
                "tombstone_ignored",
                facts={"why": why},
                personal={
                    "room": room_id,
                    "sender": sender,
                    "replacement": replacement,
                },
                at=now,
            )
            told = await self._reports.refused(
                conn,
                kind="tombstone",
                actor=sender,
                room_id=room_id,
                report=self._texts.tombstone_ignored(sender=sender, room=named, why=why),
                now=now,
            )
        log.warning("ignored a tombstone from %s in %s: %s", sender, room_id, why)
        if told:
            self._on_outbox()
