"""After the check-in opens: who joins it, and staff claiming it (✋ or `!case N claim`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bot.config.deployment import Deployment
from bot.core.ports import Homeserver
from bot.intake.dispatch import Handling
from bot.moderation.room_state import membership_in
from bot.rooms.staff_room import StaffRoom
from bot.store import audit, cases, outbox
from bot.store.cases import Case
from bot.texts.catalogues import language
from bot.texts.templates import notice

PRESENT = frozenset({"join", "invite"})


class CheckinEvents:
    def __init__(
        self,
        db: AsyncEngine,
        homeserver: Homeserver,
        deployment: Deployment,
        staff_room: StaffRoom,
        *,
        is_staff: Callable[[str], Awaitable[bool]],
        on_outbox: Callable[[], None],
    ) -> None:
        self._db = db
        self._hs = homeserver
        self._deployment = deployment
        self._staff_room = staff_room
        self._is_staff = is_staff
        self._on_outbox = on_outbox
        self._claimed = language(deployment.language)._(
            "Case #{case}: check-in claimed by {by} (✋)."
        )

    async def membership(self, handling: Handling) -> None:
        """Someone joined or left a check-in room: the member, or staff picking it up."""
        item = handling.item
        event = item.payload
        user = event.get("state_key")
        membership = membership_in(event.get("content"))
        prev = membership_in((event.get("unsigned") or {}).get("prev_content"))
        async with self._db.connect() as conn:
            case = await cases.by_checkin_room(conn, item.room_id)
        if case is None or not isinstance(user, str):
            return
        now = dt.datetime.now(dt.UTC)
        kind: str | None = None
        fields: dict[str, Any] = {}
        if user == case.member_id:
            if membership == "join" and prev != "join":
                kind, fields = "checkin_member_joined", {"checkin_member_joined_at": now}
            elif membership == "leave" and prev == "invite":
                kind = "checkin_invite_rejected"
        elif (
            membership == "join"
            and prev != "join"
            and case.checkin_staff_joined_at is None
            and await self._is_staff(user)
        ):
            kind, fields = "checkin_staff_joined", {"checkin_staff_joined_at": now}
            if case.dealt_with_at is None:
                fields["dealt_with_at"] = now
        if kind is None:
            return
        async with handling.transaction() as conn:
            if fields:
                await cases.set_fields(conn, case.id, **fields)
            await audit.append(
                conn,
                self._deployment.provenance,
                kind,
                case_id=case.id,
                personal={"user": user},
                at=now,
            )

    async def claim_by_reaction(self, handling: Handling, target: str) -> bool:
        """✋ on a check-in notice in the staff room; False if `target` is none."""
        async with self._db.connect() as conn:
            case = await cases.by_checkin_notice(conn, target, community=self._deployment.community)
        if case is None:
            return False
        sender = handling.item.payload.get("sender", "")
        claimed = await self.claim(handling, case, sender, via="reaction")
        if claimed:
            async with self._db.begin() as conn:
                await self._reply(
                    conn, case.id, target, self._claimed.format(case=case.id, by=sender)
                )
            self._on_outbox()
        return True

    async def claim(self, handling: Handling, case: Case, user: str, *, via: str) -> bool:
        """Record a staff member's claim and make sure they are in the room. False: not staff."""
        now = dt.datetime.now(dt.UTC)
        if not await self._is_staff(user):
            async with handling.transaction() as conn:
                await audit.append(
                    conn,
                    self._deployment.provenance,
                    "claim_refused",
                    case_id=case.id,
                    facts={"via": via, "why": "not staff"},
                    personal={"by": user},
                    at=now,
                )
            return False
        if (
            case.checkin_room_id
            and await self._hs.membership(case.checkin_room_id, user) not in PRESENT
        ):
            await self._hs.invite(case.checkin_room_id, user)
        async with handling.transaction() as conn:
            if case.checkin_claimed_by is None:
                await cases.set_fields(conn, case.id, checkin_claimed_by=user)
            if case.dealt_with_at is None:
                await cases.set_fields(conn, case.id, dealt_with_at=now)
            await audit.append(
                conn,
                self._deployment.provenance,
                "checkin_claimed",
                case_id=case.id,
                facts={"via": via, "first": case.checkin_claimed_by is None},
                personal={"by": user},
                at=now,
            )
        return True

    async def _reply(self, conn: AsyncConnection, case_id: int, to_event: str, text: str) -> None:
        await outbox.queue(
            conn,
            self._staff_room.address,
            notice(text, reply_to=to_event),
            dt.datetime.now(dt.UTC),
            case_id=case_id,
        )
