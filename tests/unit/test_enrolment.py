"""Enrolling a room (bot/moderation/membership.py): joined, it stays moderated while its
record waits for the homeserver, and the retry records it once, without joining again."""

from __future__ import annotations

import pytest

from bot.core.ports import HomeserverUnavailable
from bot.moderation.membership import Membership
from bot.moderation.room_state import RoomStateCache
from bot.rooms.directory import RoomDirectory
from bot.rooms.staff_room import StaffRoom
from bot.store import audit, rooms
from bot.texts.messages import Texts
from tests.support.policy import BOT, STAFF, deployment, homeserver, refusal_reports

ROOM = "!group:localhost"
INVITER = "@staff:localhost"


def membership(engine, hs, directory: RoomDirectory) -> Membership:
    settings = deployment()
    staff_room = StaffRoom(STAFF)
    texts = Texts(settings)

    async def may_invite(user_id: str) -> bool:
        return True

    return Membership(
        engine,
        hs,
        settings,
        staff_room,
        directory,
        may_invite=may_invite,
        room_state=RoomStateCache(hs),
        reports=refusal_reports(engine, staff_room, settings, texts),
        texts=texts,
        on_outbox=lambda: None,
        on_staff_room_joined=lambda: None,
    )


async def test_a_record_that_fails_keeps_the_room_moderated_and_is_made_once_on_retry(
    engine,
) -> None:
    hs = homeserver()
    hs.add_room(ROOM, {INVITER: "join"}, {INVITER: 100, BOT: 50})
    directory = RoomDirectory(StaffRoom(STAFF))
    enrolling = membership(engine, hs, directory)

    hs.unavailable_for = {"room_state_events"}  # the homeserver gone after the join
    with pytest.raises(HomeserverUnavailable):
        await enrolling.enrol(ROOM, INVITER, None)
    assert ROOM in directory.moderated, "a flag there is still acted on"
    assert ROOM in directory.unrecorded and not directory.enrolled(ROOM)

    hs.unavailable_for = set()
    await enrolling.enrol(ROOM, INVITER, None)
    assert directory.enrolled(ROOM) and ROOM not in directory.unrecorded
    assert hs.calls.count("join_room") == 1, "joined once: the retry only records"
    async with engine.connect() as conn:
        assert [room.room_id for room in await rooms.moderated(conn)] == [ROOM]
        joined = [e for e in await audit.entries(conn) if e.kind == "room_joined"]
    assert len(joined) == 1


async def test_a_room_left_while_its_record_failed_is_not_kept_as_unrecorded(engine) -> None:
    hs = homeserver()
    hs.add_room(ROOM, {INVITER: "join"}, {INVITER: 100, BOT: 50})
    directory = RoomDirectory(StaffRoom(STAFF))
    enrolling = membership(engine, hs, directory)

    async def removed_meanwhile(room_id: str) -> None:
        directory.stop_moderating(room_id)  # the bot removed as its record was being made
        raise HomeserverUnavailable("room_state_events")

    hs.room_state_events = removed_meanwhile  # type: ignore[method-assign]
    with pytest.raises(HomeserverUnavailable):
        await enrolling.enrol(ROOM, INVITER, None)
    assert ROOM not in directory.moderated and ROOM not in directory.unrecorded
