"""`!policy`: any member of a moderated room can ask how safeguarding works there.

The charity promised its members it would be open about this: what happens if a
moderator is worried about them, what is shared and with whom, where to talk instead.
A member who sends `!policy` in a moderated room is told all that in a DM of their own
(made once, used again each time they ask), with the confidentiality policy's link
(`policy.confidentiality_url`). Nothing in it is about anyone's case: the same text
for everyone, whoever asks and whatever is open.

Nobody on the staff team reads that DM, and the bot never pretends otherwise: the
explanation says so, and anything the member writes there is answered (at most once
an hour) with where to talk now and how to reach staff. Their words go nowhere else:
not to staff, not to the record (which keeps that they wrote, not what).

Asking again within REPEAT_AFTER of the last answer changes nothing (one DM message,
not one per `!policy` someone types in a loop). Every send is idempotent: the room
by its marker, the message by a transaction id of the request's event.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.config.deployment import Deployment
from bot.core.ports import EncryptionUnavailable, Homeserver, Refused, Sent, message_txn_id
from bot.intake.dispatch import Handling
from bot.rooms.directory import RoomDirectory
from bot.store import audit
from bot.store import policy_rooms as store
from bot.texts.messages import Texts

log = logging.getLogger(__name__)

REPEAT_AFTER = dt.timedelta(minutes=10)
REPLY_EVERY = dt.timedelta(hours=1)
IN_THE_ROOM = frozenset({"join", "invite"})


class PolicyExplainer:
    def __init__(
        self,
        db: AsyncEngine,
        homeserver: Homeserver,
        deployment: Deployment,
        room_directory: RoomDirectory,
        *,
        texts: Texts,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._db = db
        self._hs = homeserver
        self._deployment = deployment
        self._rooms = room_directory
        self._texts = texts
        self._now = now

    async def request(self, handling: Handling) -> None:
        """`!policy` in a moderated room: the explanation, in the member's policy DM."""
        item = handling.item
        member = item.payload.get("sender")
        if not isinstance(member, str) or member == self._deployment.bot_user_id:
            return
        now = self._now()
        async with handling.database() as conn:
            known = await store.of_member(conn, member)
        community = self._deployment.community
        if (
            known is not None
            and known.community == community
            and known.last_sent_at
            and now - known.last_sent_at < REPEAT_AFTER
        ):
            return  # told moments ago, in this community's words: the message is there
        room_id = await self._room_with(member, known)
        if isinstance(room_id, Refused):
            await self._not_sent(handling, member, room_id)
            return
        sent, plain = await self._send(
            room_id, self._texts.policy_explained(), f"policy:{item.event_id}"
        )
        if isinstance(sent, Refused):
            await self._not_sent(handling, member, sent)
            return
        async with handling.transaction() as conn:
            await store.sent(conn, member, now, community=community)
            await audit.append(
                conn,
                self._deployment.provenance,
                "policy_explained",
                facts={"unencrypted": plain},
                personal={"member": member, "asked_in": item.room_id},
                at=now,
            )
        log.info("told a member how safeguarding works here (!policy)")

    async def _send(
        self, room_id: str, content: dict[str, Any], marker: str
    ) -> tuple[Sent | Refused, bool]:
        """Sent encrypted where the room is; in the clear if this attempt cannot encrypt
        it (it waits a few seconds at most: the text is the same for everyone, nothing in
        it is anyone's), unless operators chose `encryption.fallback: none` (then it is
        tried again later). Returns what was sent and whether in the clear."""
        try:
            return await self._hs.send(room_id, content, txn_id=message_txn_id(marker)), False
        except EncryptionUnavailable:
            if self._deployment.plain_fallback_after is None:
                raise
        sent = await self._hs.send(
            room_id, content, txn_id=message_txn_id(f"{marker}:plain"), plain=True
        )
        return sent, True

    async def _room_with(self, member: str, known: store.PolicyRoom | None) -> str | Refused:
        """Their policy DM, with them in it (or invited): made the first time they ask.

        A room kept from before, or one an earlier attempt created (found by its marker,
        its invite not proven sent), is used once they are verifiably in it or invited."""
        if known is not None:
            return await self._with_them_in(known.room_id, member)
        created = await self._hs.create_room(
            marker=f"policy:{member}",
            invite=[member],
            is_direct=True,
            encrypted=self._deployment.encrypt_private_rooms,
        )
        if isinstance(created, Refused):
            return created
        # What they write there is answered from now on (and after a restart).
        self._rooms.add_policy_room(created.room_id)
        async with self._db.begin() as conn:
            if await store.in_room(conn, created.room_id) is None:
                await store.opened(
                    conn, member, created.room_id, self._now(), community=self._deployment.community
                )
        if created.existing:
            return await self._with_them_in(created.room_id, member)
        self._hs.expect_member(created.room_id, member)
        return created.room_id

    async def _with_them_in(self, room_id: str, member: str) -> str | Refused:
        if await self._hs.membership(room_id, member) not in IN_THE_ROOM:
            invited = await self._hs.invite(room_id, member, is_direct=True)
            if isinstance(invited, Refused):
                return invited
        return room_id

    async def _not_sent(self, handling: Handling, member: str, refused: Refused) -> None:
        """The homeserver refused (they block invites, say): recorded; nobody else to tell,
        since it was their own question, and the group room hears nothing."""
        async with handling.transaction() as conn:
            await audit.append(
                conn,
                self._deployment.provenance,
                "policy_not_sent",
                facts={"errcode": refused.errcode},
                personal={"member": member, "error": str(refused)},
                at=self._now(),
            )
        log.warning("could not tell a member how safeguarding works here: %s", refused.errcode)

    async def written_to(self, handling: Handling) -> None:
        """Someone wrote in a policy DM: answered with where to talk now (once an hour)."""
        item = handling.item
        if item.payload.get("sender") == self._deployment.bot_user_id:
            return
        now = self._now()
        async with handling.database() as conn:
            room = await store.in_room(conn, item.room_id)
        if room is None or (room.last_reply_at and now - room.last_reply_at < REPLY_EVERY):
            return
        sent, _ = await self._send(
            item.room_id, self._texts.policy_room_reply(), f"policy-reply:{item.event_id}"
        )
        async with handling.transaction() as conn:
            if not isinstance(sent, Refused):
                await store.replied(conn, item.room_id, now)
            await audit.append(
                conn,
                self._deployment.provenance,
                "policy_room_written",
                facts={"answered": not isinstance(sent, Refused)},
                personal={"member": item.payload.get("sender")},
                at=now,
            )
