"""`!rooms claim` (bot/staff/room_admin.py): a claim whose enrolment was not recorded is
retried to its end, not answered as if nothing were waiting."""

from __future__ import annotations

import datetime as dt

from bot.core.ports import HomeserverUnavailable
from bot.moderation.room_state import RoomStateCache
from bot.rooms.directory import RoomDirectory
from bot.rooms.staff_room import StaffRoom
from bot.staff.room_admin import RoomAdmin
from bot.store import rooms
from tests.support.policy import deployment, homeserver

ROOM = "!claimed:localhost"


async def test_a_claim_whose_record_failed_is_carried_out_when_retried(engine) -> None:
    hs = homeserver()
    settings = deployment()
    directory = RoomDirectory(StaffRoom("!staff:localhost"))
    admin = RoomAdmin(engine, hs, settings, RoomStateCache(hs), directory)
    directory.held_invites[ROOM] = {settings.community}
    async with engine.begin() as conn:
        await rooms.hold_invite(conn, ROOM, {settings.community}, dt.datetime.now(dt.UTC))
    recorded: list[str] = []

    async def enrol(room_id: str, by: str) -> None:
        # As `Membership.enrol` does: joined and moderated, then the record.
        directory.moderate(room_id, settings.community)
        directory.unrecorded.add(room_id)
        if not recorded:
            recorded.append("failed")
            raise HomeserverUnavailable("the homeserver went away before the record")
        directory.unrecorded.discard(room_id)
        recorded.append(room_id)

    try:
        await admin.claim(ROOM, "@staff:localhost", enrol)
    except HomeserverUnavailable:
        pass
    else:
        raise AssertionError("the first attempt's failure reaches the command's retry")
    reply = await admin.claim(ROOM, "@staff:localhost", enrol)

    assert recorded == ["failed", ROOM]
    assert "not waiting" not in reply
    assert directory.enrolled(ROOM)
    async with engine.connect() as conn:
        assert ROOM not in await rooms.held(conn), "claimed: no longer held"
    # Claimed and recorded: a third claim finds nothing waiting.
    assert "not waiting" in await admin.claim(ROOM, "@staff:localhost", enrol)
