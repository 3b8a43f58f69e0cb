"""Membership and power changes: the rooms the bot moderates, and members coming back.

The moderated rooms are the rooms the bot was invited to. Each time it joins
one, staff are told who added it and whether it can remove members there, and
told again if that power is taken away later.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bot.config.deployment import Deployment
from bot.core.ports import Homeserver, Refused
from bot.intake.dispatch import Handling
from bot.moderation.authorization import room_powers
from bot.moderation.room_state import RoomStateCache, membership_in
from bot.moderation.upgrades import RoomUpgrades
from bot.rooms.directory import RoomDirectory, RoomKind
from bot.rooms.names import named_room, names_of
from bot.rooms.refusal_reports import RefusalReports
from bot.rooms.staff_room import StaffRoom
from bot.steps import POSITIONS
from bot.steps.rejoin import rejoin_due
from bot.store import audit, cases, outbox, rooms
from bot.store.audit import Provenance
from bot.texts.messages import Texts
from bot.texts.wording import person, place

log = logging.getLogger(__name__)

ABSENT = frozenset({"leave", "ban", None})


class Membership:
    def __init__(
        self,
        db: AsyncEngine,
        homeserver: Homeserver,
        deployment: Deployment,
        staff_room: StaffRoom,
        room_directory: RoomDirectory,
        *,
        may_invite: Callable[[str], Awaitable[bool]],
        room_state: RoomStateCache,
        reports: RefusalReports,
        texts: Texts,
        on_outbox: Callable[[], None],
        on_staff_room_joined: Callable[[], None],
        on_case: Callable[[int], None] = lambda case_id: None,
        upgrades: RoomUpgrades | None = None,
        on_space_joined: Callable[[], None] | None = None,
        on_space_left: Callable[[str], None] | None = None,
        is_space: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self._on_case = on_case
        # Told when the bot joins its community's Space (its rooms are then claimed), and
        # when someone removes it from the Space (by whom).
        self._on_space_joined = on_space_joined
        self._on_space_left = on_space_left
        # Whether a room is the community's Space, its alias resolved now if it was not
        # yet (staff may make the alias and invite the bot in one go).
        self._is_space = is_space
        self._upgrades = upgrades
        self._db = db
        self._hs = homeserver
        self._deployment = deployment
        self._staff_room = staff_room
        self._rooms = room_directory
        self._may_invite = may_invite
        self._room_state = room_state
        self._reports = reports
        self._texts = texts
        self._on_outbox = on_outbox
        # Told when the bot joins the staff room on an invite (alerts may be waiting for it).
        self._on_staff_room_joined = on_staff_room_joined

    async def bot_membership(self, handling: Handling) -> None:
        """The bot was invited somewhere, or removed from a room."""
        membership = membership_in(handling.item.payload.get("content"))
        if membership == "invite":
            await self._invited(handling)
        elif membership in ("leave", "ban"):
            await self._removed(handling, membership)

    async def member_event(self, handling: Handling) -> None:
        """Someone's membership changed in a group room: a member coming back ends their case."""
        item = handling.item
        event = item.payload
        user = event.get("state_key")
        membership = membership_in(event.get("content"))
        unsigned = event.get("unsigned") if isinstance(event.get("unsigned"), Mapping) else {}
        previous = membership_in(unsigned.get("prev_content"))
        # A display-name change is a join after a join: only a real return counts.
        if membership != "join" or previous == "join" or not isinstance(user, str):
            return
        now = dt.datetime.now(dt.UTC)
        removing = self._deployment.policy.on_rejoin == "remove"
        async with handling.transaction() as conn:
            case = await cases.active_case(conn, item.room_id, user)
            if case is None:
                return
            if case.state == "open" and removing:
                # They are removed again: the case stays the one later flags corroborate.
                # From the room they came back to (the replacement of an upgraded room).
                # The return's event names the message that tells them, once a return.
                again = {"room": item.room_id, "return": item.event_id}
                await cases.rearm_step(
                    conn, case.id, "remove_again", POSITIONS["remove_again"], again
                )
            else:
                await cases.end_active(conn, item.room_id, user, now)
            if case.state == "open":
                await rejoin_due(conn, case.id, removing=removing, position=POSITIONS["rejoin"])
                await cases.set_next_attempt(conn, case.id, now)
            await audit.append(
                conn,
                self._deployment.provenance,
                "member_rejoined",
                case_id=case.id,
                facts={
                    "removed_again": case.state == "open" and removing,
                    "note": "later flags in this room open a new case"
                    if not (case.state == "open" and removing)
                    else "removed again (policy.on_rejoin: remove)",
                },
                personal={"room": item.room_id, "member": user},
                at=now,
            )
        self._on_case(case.id)

    async def _invited(self, handling: Handling) -> None:
        """The bot acts only where staff put it: the staff room's invite is always taken,
        and a room's the community lists; any other room's only from staff (or the
        inviters operators allowed)."""
        item = handling.item
        inviter = item.payload.get("sender", "")
        room_id = item.room_id
        now = dt.datetime.now(dt.UTC)
        if self._staff_room.room_id is None:
            # The staff room's alias may only now exist (this may be that room's invite).
            await self._staff_room.resolve(self._hs)
        if self._staff_room.is_staff_room(room_id):
            await self._join_staff_room(handling, inviter)
            return
        if self._rooms.spaces.get(room_id) == self._deployment.community or (
            self._is_space is not None and await self._is_space(room_id)
        ):
            # The community's Space: joined to read (and follow) its rooms, not moderated.
            joined = await self._join(handling, inviter, tell_staff=False)
            if joined and self._on_space_joined is not None:
                self._on_space_joined()
            return
        if room_id in self._rooms.unrecorded:
            # Joined on this invite already (decided, and acted on), its record not made
            # then: made now, not decided again.
            await self.enrol(room_id, inviter, handling)
            return
        if room_id in self._rooms.moderated:
            # Taken already: the same invite, seen by the bot's sync (bot/intake/safety_net.py)
            # before Synapse's push came (a room the bot is in cannot invite it again).
            return
        upgrade = await self._upgrades.awaited(room_id) if self._upgrades else None
        if upgrade is not None and self._upgrades is not None:
            # The replacement of a room the bot moderates, which it could not join on its
            # own: anyone there may let it in (its create event proves what it is).
            if await self._join(handling, inviter, tell_staff=True):
                await self._upgrades.follow(
                    handling,
                    old_room_id=upgrade.old_room_id,
                    new_room_id=room_id,
                    by=upgrade.upgraded_by,
                )
            return
        listed = self._rooms.listed.get(room_id) == self._deployment.community
        if not listed and not await self._may_invite(inviter):
            async with declined_invite(
                self._hs, handling, self._deployment.provenance, "inviter not allowed", now
            ) as conn:
                told = await self._reports.refused(
                    conn,
                    kind="invite",
                    actor=inviter,
                    room_id=room_id,
                    report=self._texts.invite_refused(inviter=inviter, room=room_id),
                    now=now,
                )
            if told:
                self._on_outbox()
            return
        await self.enrol(room_id, inviter, handling)

    async def enrol(self, room_id: str, inviter: str, handling: Handling | None) -> None:
        """Join a room of this community's and moderate it: recorded, and its staff told
        (as for an invite from them; a room found in the community's Space too, when
        there is no event being handled: `handling` None)."""
        # Joined already, its record not made then: not joined again (a join refused now,
        # in a room the bot is in, would tell staff it could not join).
        joined = room_id in self._rooms.unrecorded
        if not joined and not await self._join(handling, inviter, tell_staff=True, room_id=room_id):
            return
        # From the join on, a flag there is decided as a flag (not left as a stranger's),
        # even while what follows waits for the homeserver: the bot is in the room, and
        # staff put it there. A record that fails leaves it so (`unrecorded`), never
        # unmoderated: a flag raised meanwhile, queued as a flag, would be refused as from
        # a room the bot does not moderate, and lost. The invite's retry (or the Space's
        # next walk, or the claim's retry) records it. While a record is being made the
        # room is not `unrecorded`, so no other path records it too.
        self._rooms.moderate(room_id, self._deployment.community)
        self._rooms.unrecorded.discard(room_id)
        try:
            await self._record_enrolment(room_id, inviter, handling)
        except BaseException:
            if room_id in self._rooms.moderated:  # (not left meanwhile)
                self._rooms.unrecorded.add(room_id)
            raise
        self._on_outbox()

    async def _record_enrolment(
        self, room_id: str, inviter: str, handling: Handling | None
    ) -> None:
        kick, redact = await self._powers(room_id)
        named = await named_room(self._hs, room_id)
        now = dt.datetime.now(dt.UTC)
        async with self._transaction(handling) as conn:
            await rooms.joined(
                conn,
                room_id,
                inviter=inviter,
                at=now,
                can_kick=kick,
                can_redact=redact,
                community=self._deployment.community,
            )
            await audit.append(
                conn,
                self._deployment.provenance,
                "room_joined",
                facts={"can_kick": kick, "can_redact": redact},
                personal={"room": room_id, "inviter": inviter},
                at=now,
            )
            await outbox.queue(
                conn,
                self._staff_room.address,
                self._texts.room_joined(
                    inviter=inviter, room=named, can_kick=kick, can_redact=redact
                ),
                now,
            )

    def _transaction(
        self, handling: Handling | None
    ) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        """The event's transaction (marking it done), or one of its own without one."""
        return handling.transaction() if handling is not None else self._db.begin()

    async def _join(
        self,
        handling: Handling | None,
        inviter: str,
        *,
        tell_staff: bool,
        room_id: str | None = None,
    ) -> bool:
        """Join the room the bot was invited to (or `room_id`); a refusal is recorded,
        and staff are told (when it is not the staff room itself: that is on /health)."""
        if room_id is None:
            assert handling is not None
            room_id = handling.item.room_id
        joined = await self._hs.join_room(room_id)
        if not isinstance(joined, Refused):
            return True
        now = dt.datetime.now(dt.UTC)
        async with self._transaction(handling) as conn:
            await audit.append(
                conn,
                self._deployment.provenance,
                "join_failed",
                facts={"errcode": joined.errcode},
                personal={"room": room_id, "inviter": inviter, "error": str(joined)},
                at=now,
            )
            if tell_staff:
                await outbox.queue(
                    conn,
                    self._staff_room.address,
                    self._texts.join_failed(inviter=inviter, room=room_id, error=joined.errcode),
                    now,
                )
        if tell_staff:
            self._on_outbox()
        return False

    async def _join_staff_room(self, handling: Handling, inviter: str) -> None:
        room_id = handling.item.room_id
        if not await self._join(handling, inviter, tell_staff=False):
            return
        await self._record(handling, "staff_room_joined", {}, {"room": room_id, "inviter": inviter})
        self._on_staff_room_joined()

    async def _removed(self, handling: Handling, membership: str) -> None:
        """Someone removed the bot from a room. From a moderated room, staff are told: flags
        there no longer reach it; from their community's Space, too: rooms added to it are
        not seen until the bot is invited back. Its own leaving is recorded by what made it leave
        (`!rooms leave`, a declined invite), not again here."""
        item = handling.item
        by = item.payload.get("sender")
        if by == self._deployment.bot_user_id:
            return
        now = dt.datetime.now(dt.UTC)
        # This community's Space: rooms added to it from now on are not seen.
        space = self._rooms.spaces.get(item.room_id) == self._deployment.community
        if space and self._on_space_left is not None:
            self._on_space_left(str(by))
        async with self._db.connect() as conn:
            known = await rooms.get(conn, item.room_id)
        moderated = known is not None and known.left_at is None
        self._rooms.stop_moderating(item.room_id)
        # An invite held for staff to claim, withdrawn: there is nothing left to claim
        # (forgotten here once that is recorded: a retry after a failed write finds it).
        withdrawn = item.room_id in self._rooms.held_invites
        told = None
        if moderated or space:
            # Named as staff know them: the bot may still read the room's name as it was
            # when it was removed; the ids alone where it cannot.
            names = await names_of(self._hs, [item.room_id, str(by)])
            whom = person(str(by), names[str(by)])
            where = place(item.room_id, names[item.room_id])
            if moderated:
                told = self._texts.room_removed(by=whom, room=where)
            else:
                told = self._texts.space_removed(by=whom, space=where)
        async with handling.transaction() as conn:
            await rooms.left(conn, item.room_id, at=now)
            if withdrawn:
                await rooms.release_invite(conn, item.room_id)
            await audit.append(
                conn,
                self._deployment.provenance,
                "bot_removed",
                facts={
                    "membership": membership,
                    "moderated": moderated,
                    "space": space,
                    "held_invite_withdrawn": withdrawn,
                },
                personal={"room": item.room_id, "by": by},
                at=now,
            )
            if told is not None:
                await outbox.queue(conn, self._staff_room.address, told, now)
        if withdrawn:
            self._rooms.held_invites.pop(item.room_id, None)
        if told is not None:
            self._on_outbox()

    async def power_levels_changed(self, handling: Handling) -> None:
        """Only moderated rooms (the bot was invited in) matter; not rooms the bot made."""
        item = handling.item
        room_id = item.room_id
        if self._rooms.kind(room_id) is not RoomKind.GROUP:
            return
        async with self._db.connect() as conn:
            known = await rooms.get(conn, room_id)
        if known is None:
            return  # not a room we were invited to moderate
        kick, redact = await self._powers(room_id)
        if known.can_kick == kick and known.can_redact == redact:
            return
        now = dt.datetime.now(dt.UTC)
        lost = (known.can_kick and not kick) or (known.can_redact and not redact)
        named = await named_room(self._hs, room_id) if lost else room_id
        async with handling.transaction() as conn:
            await rooms.set_powers(conn, room_id, can_kick=kick, can_redact=redact)
            await audit.append(
                conn,
                self._deployment.provenance,
                "kick_power_changed",
                facts={"can_kick": kick, "can_redact": redact},
                personal={"room": room_id, "by": item.payload.get("sender")},
                at=now,
            )
            if lost:
                await outbox.queue(
                    conn,
                    self._staff_room.address,
                    self._texts.powers_lost(room=named, can_kick=kick, can_redact=redact),
                    now,
                )
        self._on_outbox()

    async def _powers(self, room_id: str) -> tuple[bool | None, bool | None]:
        """Whether the bot can remove members there, and redact others' events (None:
        the room's state cannot be read). Read fresh; the cache keeps it for flags."""
        state = await self._room_state.fresh(room_id)
        if isinstance(state, Refused):
            return None, None
        return room_powers(self._deployment.bot_user_id, state)

    async def _record(
        self, handling: Handling, kind: str, facts: dict[str, Any], personal: dict[str, Any]
    ) -> None:
        async with handling.transaction() as conn:
            await audit.append(
                conn,
                self._deployment.provenance,
                kind,
                facts=facts,
                personal=personal,
                at=dt.datetime.now(dt.UTC),
            )


@contextlib.asynccontextmanager
async def declined_invite(
    homeserver: Homeserver,
    handling: Handling,
    provenance: Provenance,
    why: str,
    now: dt.datetime,
) -> AsyncIterator[AsyncConnection]:
    """Decline the bot's invite (it leaves the room) and record why, in a transaction
    the caller may add to (who is told)."""
    item = handling.item
    await homeserver.leave_room(item.room_id)  # rejects the invite
    async with handling.transaction() as conn:
        await audit.append(
            conn,
            provenance,
            "invite_refused",
            facts={"why": why},
            personal={"room": item.room_id, "inviter": item.payload.get("sender", "")},
            at=now,
        )
        yield conn
