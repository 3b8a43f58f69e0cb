"""Catch-up: events the homeserver never delivered are found, fed through the intake once."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from appservice.database import create_engine, upgrade
from bot.config.settings import PolicySettings, ReconcileSettings
from bot.core.metrics import Metrics
from bot.intake.accept import ActionFilter, Intake
from bot.intake.recent_senders import RecentSenders
from bot.intake.reconcile import Reconciler
from bot.rooms.directory import RoomDirectory
from bot.rooms.staff_room import StaffRoom
from bot.store import ingest
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.policy import GROUP, MEMBER, MOD, STAFF

# Events of a minute ago: settled (the homeserver's push would have come by now).
NOW = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)


@pytest.fixture
async def engine(tmp_path):
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}")
    await upgrade(engine)
    yield engine
    while _intakes:
        await _intakes.pop().close()
    await engine.dispose()


# Each test's intakes hold a recording connection: closed before the engine is disposed.
_intakes: list[Intake] = []


def flag(event_id: str, at: dt.datetime) -> dict:
    return {
        "type": "m.reaction",
        "event_id": event_id,
        "sender": MOD,
        "origin_server_ts": int(at.timestamp() * 1000),
        "content": {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$m", "key": "🚨"}},
    }


def chat(event_id: str, at: dt.datetime) -> dict:
    return {
        "type": "m.room.message",
        "event_id": event_id,
        "sender": MEMBER,
        "origin_server_ts": int(at.timestamp() * 1000),
        "content": {"body": "hi"},
    }


def new_intake(engine, senders: RecentSenders | None = None) -> Intake:
    intake = Intake(
        engine,
        ActionFilter(
            PolicySettings(staff_room=STAFF),
            RoomDirectory(StaffRoom(STAFF)),
            bot_user_id="@safeguard:localhost",
        ),
        Metrics(),
        on_queued=lambda lane: None,
        senders=senders,
    )
    _intakes.append(intake)
    return intake


def build(engine, hs, since: dt.datetime | None = None, **settings):
    intake = new_intake(engine)

    async def rooms():
        return [(GROUP, since)]

    return Reconciler(engine, hs, intake, rooms, ReconcileSettings(**settings)), intake


async def queued(engine) -> list[tuple[str, bool]]:
    async with engine.connect() as conn:
        return [(i.event_id, i.caught_up) for i in await ingest.pending(conn)]


async def test_first_read_goes_back_to_when_the_bot_arrived_then_forward(engine):
    hs = FakeHomeserver()
    room = hs.add_room(GROUP, {}, {})
    joined = NOW - dt.timedelta(hours=1)
    room.events += [flag("$before-the-bot", NOW - dt.timedelta(hours=2)), flag("$after", NOW)]
    reconciler, _ = build(engine, hs, since=joined)
    assert await reconciler.catch_up_all() == 0  # a first read: no alarm
    assert await queued(engine) == [("$after", True)], "nothing from before the bot was there"
    room.events += [chat("$chat", NOW), flag("$lost", NOW)]
    assert await reconciler.catch_up_all() == 2
    assert await queued(engine) == [("$after", True), ("$lost", True)]
    assert await reconciler.catch_up_all() == 0, "nothing twice"


async def test_an_event_already_delivered_is_not_queued_again(engine):
    hs = FakeHomeserver()
    room = hs.add_room(GROUP, {}, {})
    reconciler, intake = build(engine, hs)
    await reconciler.catch_up_all()  # position: now
    delivered = flag("$delivered", NOW) | {"room_id": GROUP}
    await intake.accept("txn-1", [delivered])
    room.events += [flag("$delivered", NOW), flag("$missed", NOW)]
    assert await reconciler.catch_up_all() == 1
    assert await queued(engine) == [("$delivered", False), ("$missed", True)]


async def test_the_intake_notes_who_sent_each_event_it_records(engine):
    """What lets a flag on a recent message be decided without reading the message."""
    senders = RecentSenders()
    intake = new_intake(engine, senders)
    message = chat("$said", dt.datetime.now(dt.UTC)) | {"room_id": GROUP}
    await intake.accept("txn-1", [message])
    assert senders.sender_of(GROUP, "$said") == MEMBER
    assert senders.sender_of(GROUP, "$never") is None


async def test_an_event_just_sent_is_left_to_the_push_on_its_way(engine):
    """Read before Synapse's push of it lands, it would be recorded as caught up (and
    logged as never delivered) though it was delivered moments later."""
    hs = FakeHomeserver()
    room = hs.add_room(GROUP, {}, {})
    reconciler, intake = build(engine, hs, settle=dt.timedelta(seconds=10))
    await reconciler.catch_up_all()  # position: now
    just_now = dt.datetime.now(dt.UTC)
    room.events += [chat("$earlier", NOW), flag("$on-its-way", just_now), chat("$after", just_now)]
    assert await reconciler.catch_up_all() == 1, "only the settled event"
    assert await queued(engine) == []
    await intake.accept("txn-1", [flag("$on-its-way", just_now) | {"room_id": GROUP}])
    # Settled now (as if 10 s had passed): the rest of the page is read again, once.
    reconciler._settings = ReconcileSettings(settle=dt.timedelta(0))
    assert await reconciler.catch_up_all() == 1, "$after; $earlier is not counted twice"
    assert await queued(engine) == [("$on-its-way", False)], "delivered, so not caught up"


async def test_a_young_event_never_delivered_is_caught_up_once_settled(engine):
    hs = FakeHomeserver()
    room = hs.add_room(GROUP, {}, {})
    settle = dt.timedelta(seconds=0.3)
    reconciler, _ = build(engine, hs, settle=settle, interval=dt.timedelta(hours=1))
    await reconciler.catch_up_all()
    room.events.append(flag("$dropped", dt.datetime.now(dt.UTC)))
    reconciler.start()
    try:
        # The round that left it comes back once it has settled, not an interval later.
        for _ in range(100):
            if await queued(engine):
                break
            await asyncio.sleep(0.05)
    finally:
        await reconciler.stop()
    assert await queued(engine) == [("$dropped", True)]
    assert reconciler.rounds >= 2


async def test_a_timestamp_far_in_the_future_holds_nothing_back(engine):
    """origin_server_ts is the sending server's word: a forged one must not stall catch-up."""
    hs = FakeHomeserver()
    room = hs.add_room(GROUP, {}, {})
    reconciler, _ = build(engine, hs, settle=dt.timedelta(seconds=10))
    await reconciler.catch_up_all()
    room.events += [flag("$future", NOW + dt.timedelta(days=2)), flag("$next", NOW)]
    assert await reconciler.catch_up_all() == 2
    assert [event_id for event_id, _ in await queued(engine)] == ["$future", "$next"]


async def test_only_the_rooms_left_to_settle_are_read_again_before_the_next_full_round(engine):
    """A busy room always has a message younger than `settle`: the others are not read
    every `settle` for it (a full round stays every `interval`)."""
    hs = FakeHomeserver()
    busy, quiet = hs.add_room(GROUP, {}, {}), hs.add_room("!quiet:localhost", {}, {})
    intake = new_intake(engine)

    async def rooms():
        return [(GROUP, None), ("!quiet:localhost", None)]

    settings = ReconcileSettings(settle=dt.timedelta(seconds=0.3), interval=dt.timedelta(hours=1))
    reconciler = Reconciler(engine, hs, intake, rooms, settings)
    await reconciler.catch_up_all()  # positions: now
    busy.events.append(chat("$young", dt.datetime.now(dt.UTC)))
    quiet.events.append(chat("$old", NOW))
    read: list[tuple[int, str]] = []  # (round, room)
    read_forward = hs.read_forward
    first = reconciler.rounds

    async def counted(room_id, token, *, limit):
        read.append((reconciler.rounds - first, room_id))
        return await read_forward(room_id, token, limit=limit)

    hs.read_forward = counted
    reconciler.start()
    try:
        for _ in range(100):
            if reconciler.rounds - first >= 2 and not reconciler._unsettled:
                break  # read again once settled, and nothing left
            await asyncio.sleep(0.05)
    finally:
        await reconciler.stop()
    assert {room for round_, room in read if round_ == 0} == {GROUP, "!quiet:localhost"}
    later = {room for round_, room in read if round_ > 0}
    assert later == {GROUP}, "only the room left to settle is read again"


def staff_command(event_id: str, at: dt.datetime) -> dict:
    return {
        "type": "m.room.message",
        "event_id": event_id,
        "sender": "@staffer:localhost",
        "origin_server_ts": int(at.timestamp() * 1000),
        "content": {"body": "!case 1 close mistaken"},
    }


async def test_a_fresh_database_never_runs_the_staff_rooms_last_commands_again(engine):
    """Seen with a fresh (or restored) database: the first read of the staff room fed the
    last day's `!case` commands, acting on whatever cases bear those numbers now."""
    hs = FakeHomeserver()
    staff = hs.add_room(STAFF, {}, {})
    staff.events.append(staff_command("$yesterday", NOW - dt.timedelta(hours=3)))
    intake = new_intake(engine)

    async def rooms():
        return [(STAFF, None)]

    reconciler = Reconciler(
        engine,
        hs,
        intake,
        rooms,
        ReconcileSettings(),
        is_staff_room=lambda room_id: room_id == STAFF,
    )
    await reconciler.catch_up_all()
    assert await queued(engine) == [], "nothing from before the service saw the staff room"
    staff.events.append(staff_command("$missed", NOW))
    await reconciler.catch_up_all()
    assert await queued(engine) == [("$missed", True)], "a command lost in a restart: caught up"


async def test_nothing_from_before_the_database_first_started_is_fed(engine):
    hs = FakeHomeserver()
    room = hs.add_room(GROUP, {}, {})
    reconciler, _ = build(engine, hs)
    reconciler.first_started = NOW - dt.timedelta(minutes=30)
    room.events += [flag("$before", NOW - dt.timedelta(hours=1)), flag("$after", NOW)]
    await reconciler.catch_up_all()
    assert await queued(engine) == [("$after", True)]


async def test_a_flag_older_than_the_lookback_is_fed_to_be_told_not_dropped(engine):
    """After an outage longer than the look-back: old chat is not fed, but a flag is (the
    referral refuses it as found too late, and staff are told)."""
    hs = FakeHomeserver()
    room = hs.add_room(GROUP, {}, {})
    intake = new_intake(engine)

    async def rooms():
        return [(GROUP, None)]

    reconciler = Reconciler(
        engine,
        hs,
        intake,
        rooms,
        ReconcileSettings(lookback=dt.timedelta(hours=1)),
        is_flag=lambda event: event["type"] == "m.reaction",
    )
    await reconciler.catch_up_all()  # position: now
    two_hours_ago = NOW - dt.timedelta(hours=2)
    room.events += [chat("$old-chat", two_hours_ago), flag("$old-flag", two_hours_ago)]
    await reconciler.catch_up_all()
    assert [event_id for event_id, _ in await queued(engine)] == ["$old-flag"]
