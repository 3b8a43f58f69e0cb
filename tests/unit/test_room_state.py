"""What is known of a room ahead of a flag: only what the bot read, stale the moment a
state event arrives, and a plain non-moderator refused without a homeserver call."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Any

import pytest

from bot.intake.dispatch import Handling
from bot.intake.recent_senders import RecentSenders
from bot.moderation.room_state import RoomStateCache
from bot.referral.triggers import Flag
from bot.store import audit, ingest, outbox
from tests.support.databases import record_events
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.policy import GROUP, MEMBER, MOD, STAFF
from tests.support.policy import referral as build_referral

NOW = dt.datetime(2026, 11, 24, 12, tzinfo=dt.UTC)


def homeserver() -> FakeHomeserver:
    hs = FakeHomeserver()
    hs.add_room(GROUP, {MEMBER: "join", MOD: "join", hs.bot_user_id: "join"}, {MOD: 50})
    hs.add_room(STAFF, {hs.bot_user_id: "join"}, {})
    return hs


async def test_known_state_is_used_until_a_state_event_arrives():
    hs = homeserver()
    cache = RoomStateCache(hs)
    assert cache.current(GROUP) is None
    await cache.state(GROUP)
    calls = len(hs.calls)
    assert cache.current(GROUP) is not None
    await cache.state(GROUP)
    assert len(hs.calls) == calls, "known: no read"
    hs.rooms[GROUP].state[("m.room.power_levels", "")] = {"users": {MOD: 0}}
    cache.state_changed(GROUP, "m.room.power_levels", "")
    assert cache.current(GROUP) is None, "stale from the moment the event arrived"
    state = await cache.state(GROUP)
    assert state.power_levels == {"users": {MOD: 0}}
    await cache.close()


def held_reads(hs) -> tuple[asyncio.Event, asyncio.Event, Any]:
    """The room's state reads answer, then wait at `gate` (set `started` when they do);
    also the unheld read, to put back."""
    gate, started = asyncio.Event(), asyncio.Event()
    original = hs.room_state_events

    async def slow(room_id):
        state = await original(room_id)
        started.set()
        await gate.wait()
        return state

    hs.room_state_events = slow
    return gate, started, original


async def test_a_read_that_began_before_a_change_is_not_kept_as_current():
    hs = homeserver()
    cache = RoomStateCache(hs)
    gate, started, original = held_reads(hs)
    reading = asyncio.create_task(cache.state(GROUP))
    await started.wait()
    cache.state_changed(GROUP, "m.room.power_levels", "")
    hs.room_state_events = original  # type: ignore[method-assign]
    gate.set()
    await reading
    # The first read predated the change: it was read again before being kept.
    assert cache.current(GROUP) is not None
    assert hs.calls.count("room_state_events") >= 2
    await cache.close()


def test_pushed_events_never_enter_the_cache():
    cache = RoomStateCache(homeserver())
    cache.state_changed(GROUP, "m.room.power_levels", "")  # nothing known: nothing to do
    assert cache.current(GROUP) is None


async def test_a_plain_non_moderator_is_refused_with_no_homeserver_call(engine):
    hs = homeserver()
    referral = build_referral(engine, hs)
    cache = referral._room_state
    await cache.state(GROUP)
    event = {
        "event_id": "$r",
        "room_id": GROUP,
        "type": "m.reaction",
        "sender": MEMBER,
        "content": {},
    }
    await record_events(engine, "t", ["$r"], [(event, 0)], NOW)
    async with engine.connect() as conn:
        (item,) = await ingest.pending(conn)
    calls = len(hs.calls)
    flag = Flag("reaction", GROUP, MEMBER, "$r", "$msg", None, None)
    await referral.handle(Handling(engine, item), flag)
    assert len(hs.calls) == calls, "decided on what was known: no call"
    async with engine.connect() as conn:
        (entry,) = await audit.entries(conn)
    assert entry.kind == "refused" and entry.facts["code"] == "not_moderator"
    await cache.close()


# ---- a flag needs no reads; the cache stays provably fresh ----------------------------------


def reaction(event_id: str, flagger: str, to: str) -> dict:
    return {
        "event_id": event_id,
        "room_id": GROUP,
        "type": "m.reaction",
        "sender": flagger,
        "origin_server_ts": 1,
        "content": {"m.relates_to": {"rel_type": "m.annotation", "event_id": to, "key": "🚨"}},
    }


async def flag_on(engine, referral, flagger: str, message: str, event_id: str) -> None:
    """The flagger reacts 🚨 to `message`: recorded as the intake does, then decided."""
    event = reaction(event_id, flagger, message)
    await record_events(engine, event_id, [event_id], [(event, 0)], NOW)
    async with engine.connect() as conn:
        item = next(i for i in await ingest.pending(conn) if i.event_id == event_id)
    await referral.handle(
        Handling(engine, item), Flag("reaction", GROUP, flagger, event_id, message, None, None)
    )


async def kinds(engine) -> list[str]:
    async with engine.connect() as conn:
        return [e.kind for e in await audit.entries(conn)]


async def test_a_flag_on_what_is_known_makes_no_homeserver_call(engine):
    hs = homeserver()
    senders = RecentSenders()
    referral = build_referral(engine, hs, senders=senders)
    cache = referral._room_state
    await asyncio.gather(cache.state(GROUP), cache.state(STAFF))
    senders.note(["$said"], [{"room_id": GROUP, "sender": MEMBER}])  # at intake
    calls = len(hs.calls)
    await flag_on(engine, referral, MOD, "$said", "$flag")
    assert hs.calls[calls:] == [], "power levels, create event, memberships, sender: all known"
    assert await kinds(engine) == ["flagged"]
    await cache.close()


async def test_a_moderator_demoted_just_before_flagging_cannot_flag(engine):
    hs = homeserver()
    senders = RecentSenders()
    referral = build_referral(engine, hs, senders=senders)
    cache = referral._room_state
    await asyncio.gather(cache.state(GROUP), cache.state(STAFF))
    senders.note(["$said"], [{"room_id": GROUP, "sender": MEMBER}])
    # The demotion is pushed in a transaction before the flag's: stale from that moment.
    hs.rooms[GROUP].state[("m.room.power_levels", "")] = {"users": {MOD: 0}}
    cache.state_changed(GROUP, "m.room.power_levels", "")
    await flag_on(engine, referral, MOD, "$said", "$flag")
    assert await kinds(engine) == ["refused"]
    assert "room_state_events" in hs.calls
    await cache.close()


async def test_a_member_event_makes_that_member_unknown_and_is_read_off_the_flag_path():
    hs = homeserver()
    cache = RoomStateCache(hs)
    await cache.state(GROUP)
    assert cache.known_member(GROUP, MEMBER)[0]
    assert cache.known_member(GROUP, "@stranger:localhost") == (True, None), "never a member"
    hs.rooms[GROUP].members[MEMBER] = "leave"
    cache.state_changed(GROUP, "m.room.member", MEMBER)
    assert cache.known_member(GROUP, MEMBER) == (False, None)
    assert cache.current(GROUP) is not None, "the rest of the room is still known"
    await asyncio.sleep(0)  # the read started at once runs
    await asyncio.sleep(0)
    known, event = cache.known_member(GROUP, MEMBER)
    assert known and event is not None and event["content"]["membership"] == "leave"
    await cache.close()


async def test_a_member_event_during_a_read_leaves_that_member_unknown():
    hs = homeserver()
    cache = RoomStateCache(hs)
    gate, started, _ = held_reads(hs)
    hs.member_event = lambda *_: asyncio.Event().wait()  # type: ignore[method-assign,assignment]
    reading = asyncio.create_task(cache.state(GROUP))
    await started.wait()
    cache.state_changed(GROUP, "m.room.member", MEMBER)  # the read may show them as they were
    gate.set()
    await reading
    assert cache.current(GROUP) is not None
    assert cache.known_member(GROUP, MEMBER) == (False, None)
    assert cache.known_member(GROUP, MOD)[0]
    await cache.close()


async def test_after_a_gap_nothing_is_known_not_even_a_read_in_flight():
    hs = homeserver()
    cache = RoomStateCache(hs)
    await cache.state(GROUP)
    cache.forget_everything()
    assert cache.current(GROUP) is None
    gate, started, original = held_reads(hs)
    reading = asyncio.create_task(cache.state(GROUP))
    await started.wait()
    cache.forget_everything()
    hs.room_state_events = original  # type: ignore[method-assign]
    gate.set()
    await reading
    assert hs.calls.count("room_state_events") >= 3, "the read begun before the gap was redone"
    await cache.close()


def _state_with(hs: FakeHomeserver, change) -> None:
    original = hs.room_state_events

    async def changed(room_id):
        events = await original(room_id)
        return change(events)

    hs.room_state_events = changed  # type: ignore[method-assign]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda events: [*events, events[0]], id="the same state twice"),
        pytest.param(
            lambda events: [
                {**e, "sender": None} if e["type"] == "m.room.create" else e for e in events
            ],
            id="a create event without a sender",
        ),
        pytest.param(
            lambda events: [{**e, "room_id": "!other:localhost"} for e in events],
            id="another room's state",
        ),
        pytest.param(
            lambda events: [
                {**e, "content": []} if e["type"] == "m.room.power_levels" else e for e in events
            ],
            id="power levels that are not an object",
        ),
    ],
)
async def test_malformed_or_forged_looking_state_never_enters_the_cache(change):
    hs = homeserver()
    _state_with(hs, change)
    cache = RoomStateCache(hs)
    state = await cache.state(GROUP)
    assert state.room_id == GROUP, "answered, from the events read one by one"
    assert cache.current(GROUP) is None
    assert cache.known_member(GROUP, MEMBER) == (False, None)
    await cache.close()


async def test_a_malformed_member_event_is_never_known():
    hs = homeserver()

    def odd(events):
        return [
            {**e, "content": {"membership": "joined"}} if e.get("state_key") == MEMBER else e
            for e in events
        ]

    _state_with(hs, odd)
    cache = RoomStateCache(hs)
    await cache.state(GROUP)
    assert cache.current(GROUP) is not None
    assert cache.known_member(GROUP, MEMBER) == (False, None), "read when needed, never kept"
    assert cache.known_member(GROUP, MOD)[0]
    await cache.close()


def body(*events: dict) -> bytes:
    return json.dumps({"events": list(events)}).encode()


def said(event_id: str, sender: str, room: str = GROUP) -> dict:
    content = {"msgtype": "m.text", "body": "hi"}
    return {"event_id": event_id, "room_id": room, "sender": sender, "type": "m.room.message"} | {
        "content": content
    }


def test_recent_senders_find_a_message_in_the_body_it_came_in():
    senders = RecentSenders()
    senders.note_body(body(said("$said", MEMBER), said("$other", MOD)))
    # A newer body names it (the 🚨 on it) without being it: the search goes on past it.
    relation = {"rel_type": "m.annotation", "event_id": "$said", "key": "🚨"}
    reaction = said("$flag", MOD) | {"type": "m.reaction", "content": {"m.relates_to": relation}}
    senders.note_body(body(reaction))
    assert senders.sender_of(GROUP, "$said") == MEMBER
    assert senders.sender_of(GROUP, "$other") == MOD
    assert senders.sender_of(STAFF, "$said") is None, "an event of another room is not this one"
    assert senders.sender_of(GROUP, "$unknown") is None
    # What is not a transaction, or an event not of the shape kept, is no answer.
    senders.note_body(b"not json")
    senders.note_body(body({"event_id": "$odd", "room_id": GROUP, "sender": 5}))
    assert senders.sender_of(GROUP, "$odd") is None
    assert senders.sender_of(GROUP, "$said") == MEMBER
    # A lone surrogate in a body (orjson refuses it): read as the intake reads it.
    senders.note_body(
        b'{"events":[{"event_id":"$s","room_id":"%s","sender":"@x:l",' % GROUP.encode()
        + b'"content":{"body":"\\ud800"}}]}'
    )
    assert senders.sender_of(GROUP, "$s") == "@x:l"


def test_recent_senders_forget_the_oldest_first_by_size():
    one = len(body(said("$0", "@u0:l")))
    senders = RecentSenders(size_bytes=2 * one)
    for n in range(10):
        senders.note_body(body(said(f"${n}", f"@u{n}:l")))
        remembered = [k for k in range(n + 1) if senders.sender_of(GROUP, f"${k}")]
        assert remembered == list(range(max(0, n - 1), n + 1)), "the newest size's worth"
    # Events that came without a body (caught up from history) count too.
    senders.note(["$caught"], [{"room_id": GROUP, "sender": MEMBER}])
    assert senders.sender_of(GROUP, "$caught") == MEMBER
    assert senders.sender_of(GROUP, "$8") is None, "its weight pushes the oldest out"
    assert senders.sender_of(STAFF, "$caught") is None
    senders.note([], [])  # nothing to keep
    assert senders.sender_of(GROUP, "$unknown") is None


async def test_a_flag_from_a_room_the_bot_does_not_moderate_is_refused_quietly(engine):
    """A forged body, or a room nobody enrolled: recorded, logged, never a case, and no
    staff message (nobody there can be helped, and a flood must not reach staff)."""
    hs = homeserver()
    referral = build_referral(engine, hs, is_moderated=lambda room_id: False)
    await flag_on(engine, referral, MOD, "$msg", "$r")
    async with engine.connect() as conn:
        (entry,) = await audit.entries(conn)
        assert await outbox.pending(conn) == []
    assert entry.kind == "refused" and entry.facts["code"] == "room_not_moderated"
    assert hs.kicks == []


async def test_a_flag_caught_up_after_the_lookback_is_told_to_staff_not_acted_on(engine):
    import dataclasses

    hs = homeserver()
    hs.rooms[GROUP].events.append({"event_id": "$msg", "type": "m.room.message", "sender": MEMBER})
    hs.rooms[GROUP].state[("m.room.name", "")] = {"name": "Peer support"}
    hs.display_names[MEMBER] = "Sam"
    referral = build_referral(engine, hs)
    event = reaction("$old", MOD, "$msg") | {"origin_server_ts": 1_000}
    await record_events(engine, "t", ["$old"], [(event, 0)], NOW)
    async with engine.connect() as conn:
        (item,) = await ingest.pending(conn)
    item = dataclasses.replace(item, caught_up=True)
    flag = Flag("reaction", GROUP, MOD, "$old", "$msg", None, None)
    await referral.handle(Handling(engine, item), flag)
    async with engine.connect() as conn:
        (entry,) = await audit.entries(conn)
        (told,) = [m.content["body"] for m in await outbox.pending(conn)]
    assert entry.facts["code"] == "found_too_late"
    assert told.startswith("A flag from Thu 01 Jan 1970") and "found late" in told
    assert f"Sam ({MEMBER})" in told, "who it was about: staff must check on them"
    assert f"in Peer support ({GROUP})" in told and "(Europe/London)" in told
    assert hs.kicks == [] and "create_room" not in hs.calls
