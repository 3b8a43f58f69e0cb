"""Which tombstones the bot looks at (bot/moderation/upgrades.py, bot/intake/dispatch.py)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from bot.intake.dispatch import Classifier, EventKind
from bot.moderation.upgrades import replacement_of
from bot.rooms.directory import RoomDirectory
from bot.rooms.staff_room import StaffRoom
from bot.store.ingest import InboxItem

BOT = "@safeguard:localhost"


def tombstone(room: str = "!old:localhost", **changes: Any) -> dict[str, Any]:
    event = {
        "event_id": "$t",
        "room_id": room,
        "type": "m.room.tombstone",
        "state_key": "",
        "sender": "@owner:localhost",
        "content": {"body": "replaced", "replacement_room": "!new:localhost"},
    }
    return event | changes


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, "!new:localhost"),
        ({"state_key": "x"}, None),  # a tombstone is the room's, with the empty key
        ({"content": {"body": "replaced"}}, None),
        ({"content": {"replacement_room": 7}}, None),
        ({"content": {"replacement_room": "#alias:localhost"}}, None),
        ({"content": {"replacement_room": "!opaqueRoomIdOfVersion12"}}, "!opaqueRoomIdOfVersion12"),
        ({"content": {"replacement_room": "!"}}, None),
        ({"content": {"replacement_room": "!" + "a" * 300 + ":localhost"}}, None),
        ({"content": "not an object"}, None),
    ],
)
def test_the_replacement_a_tombstone_names(changes: dict[str, Any], expected: str | None) -> None:
    assert replacement_of(tombstone(**changes)) == expected


def test_only_a_group_rooms_tombstone_goes_to_the_upgrade_handler() -> None:
    rooms = RoomDirectory(StaffRoom("!staff:localhost"))
    rooms.add_dm("!dm:localhost")
    classify = Classifier(rooms, BOT)

    def kind(room: str) -> EventKind:
        event = tombstone(room)
        item = InboxItem(1, "$t", room, "m.room.tombstone", event, dt.datetime.now(dt.UTC), 0)
        return classify(item)

    assert kind("!old:localhost") is EventKind.TOMBSTONE
    assert kind("!dm:localhost") is EventKind.IGNORED
    assert kind("!staff:localhost") is EventKind.IGNORED


def test_policy_requests_and_what_is_written_in_policy_dms_have_their_handlers() -> None:
    rooms = RoomDirectory(StaffRoom("!staff:localhost"))
    rooms.add_policy_room("!policy-dm:localhost")
    classify = Classifier(rooms, BOT)

    def kind(room: str, body: str, event_type: str = "m.room.message") -> EventKind:
        event = {"type": event_type, "sender": "@m:localhost", "content": {"body": body}}
        return classify(InboxItem(1, "$e", room, event_type, event, dt.datetime.now(dt.UTC), 0))

    assert kind("!group:localhost", " !policy ") is EventKind.POLICY_REQUEST
    assert kind("!group:localhost", "!safeguard") is EventKind.FLAG
    assert kind("!policy-dm:localhost", "hello") is EventKind.POLICY_ROOM_MESSAGE
    assert kind("!policy-dm:localhost", "", "m.room.encrypted") is EventKind.POLICY_ROOM_MESSAGE
    assert kind("!policy-dm:localhost", "", "m.reaction") is EventKind.IGNORED
