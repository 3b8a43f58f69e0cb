"""The intake's hot path: which events are queued, in which lane, and what is skipped."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.config.settings import PolicySettings
from bot.core.metrics import Metrics
from bot.intake.accept import (
    DECRYPT_LANE,
    FLAG_LANE,
    OTHER_LANE,
    REFUSAL_LANE,
    ActionFilter,
    Intake,
    is_policy_request,
    well_formed,
)
from bot.intake.recent_senders import RecentSenders
from bot.rooms.directory import RoomDirectory
from bot.rooms.staff_room import StaffRoom
from bot.store import ingest
from tests.support.policy import GROUP, MEMBER, MOD, STAFF

BOT = "@safeguard:localhost"
DM = "!dm:localhost"


def action_filter(command: str = "!safeguard") -> tuple[ActionFilter, RoomDirectory]:
    rooms = RoomDirectory(StaffRoom(STAFF))
    rooms.add_dm(DM)
    rooms.moderate(GROUP)
    policy = PolicySettings(staff_room=STAFF, command=command)
    return ActionFilter(policy, rooms, bot_user_id=BOT), rooms


def membership(
    room: str, member: object, value: str = "join", sender: str | None = None
) -> dict[str, Any]:
    return {
        "type": "m.room.member",
        "event_id": f"$m-{member}-{value}",
        "room_id": room,
        "sender": sender or (member if isinstance(member, str) else MOD),
        "state_key": member,
        "content": {"membership": value},
    }


def test_group_memberships_are_queued_only_for_the_bot_and_members_with_a_case():
    check, rooms = action_filter()
    assert check.lane(membership(GROUP, MEMBER)) is None, "an ordinary join is chat"
    assert check.lane(membership(GROUP, BOT, "invite", sender=MOD)) == OTHER_LANE
    assert check.lane(membership(GROUP, BOT, "leave", sender=MOD)) == OTHER_LANE, "kicked"
    # What the bot does itself needs no second look (a room it made, a room it left).
    assert check.lane(membership("!new:localhost", BOT)) is None
    assert check.lane(membership(GROUP, BOT, "leave")) is None
    rooms.watch_member(GROUP, MEMBER)
    assert check.lane(membership(GROUP, MEMBER)) == OTHER_LANE, "a removed member's return"
    assert check.lane(membership(GROUP, MEMBER, "leave")) == OTHER_LANE
    assert check.lane(membership("!other:localhost", MEMBER)) is None, "watched per room"
    # The bot's own rooms: every membership matters.
    assert check.lane(membership(DM, MEMBER)) == OTHER_LANE
    assert check.lane(membership(STAFF, "@staffer:localhost")) == OTHER_LANE
    # A state key that is not a string is never watched, and never an error.
    assert check.lane(membership(GROUP, ["@a:l"])) is None
    assert check.lane(membership(GROUP, None)) is None


def test_other_room_state_is_queued_unless_the_bot_set_it():
    check, _ = action_filter()
    for kind in ("m.room.power_levels", "m.room.create", "m.room.tombstone"):
        event = {"type": kind, "event_id": "$s", "room_id": GROUP, "sender": MOD}
        assert check.lane(event | {"state_key": "", "content": {}}) == OTHER_LANE
        # A room the bot made: its first state is its own, before the room is known.
        mine = event | {"room_id": "!new:localhost", "sender": BOT}
        assert check.lane(mine | {"state_key": "", "content": {}}) is None


def message(body: object) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "event_id": "$msg",
        "room_id": GROUP,
        "sender": MOD,
        "content": {"msgtype": "m.text", "body": body},
    }


@given(
    command=st.sampled_from(["!safeguard", "safeguard!", "Ksafe", "ſos", "#flag", "!ß"]),
    body=st.text(alphabet=st.characters(codec="utf-8"), max_size=60),
    insert=st.booleans(),
    case=st.sampled_from([str.lower, str.upper, str.title, lambda text: text]),
)
def test_command_pretest_never_changes_the_answer(command, body, insert, case):
    """The quick scan for the command's first character only ever rules out bodies the
    case-insensitive search would rule out too."""
    check, _ = action_filter(command)
    if insert:
        body = body[: len(body) // 2] + case(command) + body[len(body) // 2 :]
    expected = re.search(re.escape(command), body, re.IGNORECASE) is not None
    assert (check.lane(message(body)) == FLAG_LANE) is expected


def test_command_and_flag_reactions_take_the_flag_lane():
    check, _ = action_filter()
    assert check.lane(message("please !SAFEGUARD this")) == FLAG_LANE
    assert check.lane(message("just chatting")) is None
    assert check.lane(message(["!safeguard"])) is None
    reaction = {
        "type": "m.reaction",
        "event_id": "$r",
        "room_id": GROUP,
        "sender": MOD,
        "content": {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$m", "key": ""}},
    }
    for key, lane in (("🚨", FLAG_LANE), ("🚨\ufe0f", FLAG_LANE), ("👍", None), ("✅", OTHER_LANE)):
        reaction["content"]["m.relates_to"]["key"] = key
        assert check.lane(reaction) == lane, key


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
event_like = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["m.room.member", "m.room.message", "m.reaction"]) | json_values,
        "event_id": st.text(min_size=1, max_size=300) | json_values,
        "room_id": st.sampled_from([GROUP, DM, STAFF]) | json_values,
        "sender": st.just(MOD) | json_values,
        "state_key": st.just(MEMBER) | json_values,
        "content": st.dictionaries(st.sampled_from(["body", "m.relates_to"]), json_values)
        | json_values,
    },
)


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[tuple[dict[str, Any], int]]]] = []

    async def record(
        self, txn_id, event_ids, to_act_on, now, *, caught_up=False, hand_over_lane=None, ahead=None
    ):
        self.calls.append((list(event_ids), list(to_act_on)))
        return ingest.Recorded(len(event_ids), len(to_act_on), len(event_ids))

    async def close(self) -> None:
        pass


@given(events=st.lists(event_like | json_values, max_size=8))
async def test_accept_records_exactly_the_well_formed_and_never_raises(events):
    check, _ = action_filter()
    states: list[tuple[str, str, object]] = []
    intake = Intake(
        None,  # type: ignore[arg-type]
        check,
        Metrics(),
        on_queued=lambda lane: None,
        on_state=lambda room, kind, key: states.append((room, kind, key)),
        recorder=(recorder := _Recorder()),  # type: ignore[arg-type]
    )
    await intake.accept("t", events)
    ((ids, queued),) = recorder.calls
    kept = [event for event in events if well_formed(event)]
    assert ids == [event["event_id"] for event in kept]
    assert [event for event, _lane in queued] == [e for e in kept if check.lane(e) is not None]
    # The room-state cache hears of every state change, queued or not.
    assert [kind for _room, kind, _key in states] == [
        e["type"] for e in kept if e["type"] == "m.room.member"
    ]


@pytest.mark.parametrize(
    "event",
    [
        {"event_id": "$a", "room_id": GROUP, "type": "m.room.message"},  # no sender
        {"event_id": "", "room_id": GROUP, "type": "x", "sender": MOD},
        {"event_id": "$" + "x" * 255, "room_id": GROUP, "type": "x", "sender": MOD},
        {"event_id": "$\ud800", "room_id": GROUP, "type": "x", "sender": MOD},
        {"event_id": "$a", "room_id": GROUP, "type": "x", "sender": MOD, "content": []},
        ["not", "an", "event"],
    ],
)
def test_malformed_events_are_recognised(event):
    assert not well_formed(event)


@given(events=st.lists(event_like | json_values, max_size=8))
async def test_who_sent_an_accepted_event_is_known_from_its_body_and_never_wrong(events):
    senders = RecentSenders()
    intake = Intake(
        None,  # type: ignore[arg-type]
        action_filter()[0],
        Metrics(),
        on_queued=lambda lane: None,
        on_state=lambda room, kind, key: None,
        recorder=_Recorder(),  # type: ignore[arg-type]
        senders=senders,
    )
    body = json.dumps({"events": events}, ensure_ascii=False).encode("utf-8", "surrogatepass")
    await intake.accept("t", events, body=body)
    ids = [event.get("event_id") if isinstance(event, dict) else None for event in events]
    for event in (event for event in events if well_formed(event)):
        if ids.count(event["event_id"]) != 1:
            continue  # an id twice in one transaction: which one is not ours to say
        found = senders.sender_of(event["room_id"], event["event_id"])
        # As the body spells it: an id JSON must escape is not found (then it is read).
        plain = json.dumps(event["event_id"], ensure_ascii=False)[1:-1] == event["event_id"]
        assert found == event["sender"] if plain else found in (None, event["sender"])
        assert senders.sender_of("!elsewhere:l", event["event_id"]) is None


async def test_each_writer_in_a_moderated_room_is_told_once_for_their_devices_to_be_read():
    """Whoever writes in a room the bot moderates may be flagged: the service is told of
    them once, as the message arrives, so their devices are read before any flag."""
    met: list[str] = []
    ready = True

    def writer_met(writer: str) -> bool:
        met.append(writer)
        return ready  # False: the device could not take it now

    intake = Intake(
        None,  # type: ignore[arg-type]
        action_filter()[0],
        Metrics(),
        on_queued=lambda lane: None,
        recorder=_Recorder(),  # type: ignore[arg-type]
        writer_met=writer_met,
    )

    def message(n: int, room: str, sender: str, kind: str = "m.room.message") -> dict[str, Any]:
        content = {"body": "hi"} if kind == "m.room.message" else {}
        return {
            "type": kind,
            "event_id": f"$e{n}",
            "room_id": room,
            "sender": sender,
            "content": content,
        }

    await intake.accept("t1", [message(1, GROUP, MEMBER), message(2, GROUP, MEMBER)])
    await intake.accept("t2", [message(3, GROUP, MEMBER), message(4, DM, "@other:l")])
    await intake.accept("t3", [message(5, "!elsewhere:l", "@stranger:l")])
    await intake.accept("t4", [message(6, GROUP, MOD, "m.reaction")])
    assert met == [MEMBER], "once each, only writers of messages in a moderated room"
    await intake.accept("t5", [message(7, GROUP, "@new:l")])
    assert met == [MEMBER, "@new:l"]
    # Not taken (the device not ready yet): told again at their next message.
    ready = False
    await intake.accept("t6", [message(8, GROUP, "@later:l")])
    ready = True
    await intake.accept("t7", [message(9, GROUP, "@later:l"), message(10, GROUP, "@later:l")])
    assert met == [MEMBER, "@new:l", "@later:l", "@later:l"]


def test_rooms_known_at_start_are_known_as_if_added_one_by_one():
    """`RoomDirectory.know` (the cases read at start) and the one-by-one adds agree."""
    from bot.rooms.directory import RoomKind

    at_once, one_by_one = RoomDirectory(StaffRoom(STAFF)), RoomDirectory(StaffRoom(STAFF))
    at_once.know(watched={(GROUP, MEMBER)}, dms={"!dm:l", "!debrief:l"}, checkins={"!ci:l"})
    one_by_one.watch_member(GROUP, MEMBER)
    for room in ("!dm:l", "!debrief:l"):
        one_by_one.add_dm(room)
    one_by_one.add_checkin("!ci:l")
    for rooms in (at_once, one_by_one):
        assert rooms.conversations == {"!dm:l", "!debrief:l", "!ci:l"}
        assert rooms.is_watched(GROUP, MEMBER) and not rooms.is_watched(GROUP, MOD)
        assert [rooms.kind(r) for r in ("!dm:l", "!ci:l", GROUP)] == [
            RoomKind.DM,
            RoomKind.CHECKIN,
            RoomKind.GROUP,
        ]


def test_a_flag_takes_the_flag_lane_only_where_it_could_be_acted_on():
    """Junk never queues ahead of a real flag: a flag from a room the bot does not moderate,
    or from someone pushed state shows to be below a moderator, waits in the refusal lane."""
    rooms = RoomDirectory(StaffRoom(STAFF))
    rooms.moderate(GROUP)
    powers = {(GROUP, MOD): 50.0, (GROUP, MEMBER): 0.0}
    check = ActionFilter(
        PolicySettings(staff_room=STAFF),
        rooms,
        bot_user_id=BOT,
        can_decrypt=True,
        power_of=lambda room, user: powers.get((room, user)),
    )
    command = message("!safeguard")
    assert check.lane(command) == FLAG_LANE
    assert check.lane(command | {"room_id": "!elsewhere:localhost"}) == REFUSAL_LANE
    assert check.lane(command | {"sender": MEMBER}) == REFUSAL_LANE, "known to be no moderator"
    unknown = "@unknown:localhost"
    assert check.lane(command | {"sender": unknown}) == FLAG_LANE, "not known: decided on a read"
    relation = {"rel_type": "m.annotation", "event_id": "$m", "key": "🚨"}
    reaction = {
        "type": "m.reaction",
        "event_id": "$r",
        "room_id": "!elsewhere:localhost",
        "sender": MOD,
        "content": {"m.relates_to": relation},
    }
    assert check.lane(reaction) == REFUSAL_LANE
    assert check.lane(reaction | {"room_id": GROUP}) == FLAG_LANE
    chat = {"type": "m.room.encrypted", "event_id": "$e", "room_id": GROUP, "sender": MEMBER}
    assert check.lane(chat | {"content": {"ciphertext": "…"}}) == DECRYPT_LANE
    rooms.stop_moderating(GROUP)
    assert check.lane(command) == REFUSAL_LANE, "a room the bot left"


@pytest.mark.parametrize(
    ("body", "asks"),
    [
        ("!policy", True),
        ("  !Policy\n", True),
        ("!POLICY", True),
        ("!policy please", False),  # the command alone: chat that mentions it is chat
        ("what is the !policy here", False),
        ("policy", False),
        ("!policies", False),
    ],
)
def test_a_policy_request_is_the_command_alone(body: str, asks: bool) -> None:
    assert is_policy_request(body) is asks
    check, rooms = action_filter()
    assert check.lane(message(body)) == (OTHER_LANE if asks else None)
    # Only where the bot moderates: elsewhere it is nobody's business of ours.
    rooms.stop_moderating(GROUP)
    assert check.lane(message(body)) is None


@given(body=st.text(max_size=40))
def test_no_text_is_taken_both_for_a_flag_and_a_policy_request(body: str) -> None:
    check, _ = action_filter()
    if is_policy_request(body):
        assert check.lane(message(body)) == OTHER_LANE
