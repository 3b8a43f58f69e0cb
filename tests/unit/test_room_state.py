"""What is known of a room ahead of a flag: only what the bot read, stale the moment a
state event arrives, and a plain non-moderator refused without a homeserver call."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from appservice.database import create_engine, upgrade
from bot.dispatch import Handling
from bot.room_state import RoomStateCache
from bot.store import audit, ingest
from bot.triggers import Flag
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


async def test_a_read_that_began_before_a_change_is_not_kept_as_current():
    hs = homeserver()
    cache = RoomStateCache(hs)
    gate, started = asyncio.Event(), asyncio.Event()
    original = hs.room_state

    async def slow(room_id):
        state = await original(room_id)
        started.set()
        await gate.wait()
        return state

    hs.room_state = slow  # type: ignore[method-assign]
    reading = asyncio.create_task(cache.state(GROUP))
    await started.wait()
    cache.state_changed(GROUP, "m.room.power_levels", "")
    hs.room_state = original  # type: ignore[method-assign]
    gate.set()
    await reading
    # The first read predated the change: it was read again before being kept.
    assert cache.current(GROUP) is not None
    assert hs.calls.count("room_state") >= 2
    await cache.close()


def test_pushed_events_never_enter_the_cache():
    cache = RoomStateCache(homeserver())
    cache.state_changed(GROUP, "m.room.power_levels", "")  # nothing known: nothing to do
    assert cache.current(GROUP) is None


@pytest.fixture
async def engine(tmp_path):
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}")
    await upgrade(engine)
    yield engine
    await engine.dispose()


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
    async with engine.begin() as conn:
        await ingest.record_transaction(conn, "t", ["$r"], [(event, 0)], NOW)
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
