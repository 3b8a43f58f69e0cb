"""Catch-up: events the homeserver never delivered are found, fed through the intake once."""

from __future__ import annotations

import datetime as dt

import pytest

from appservice.database import create_engine, upgrade
from bot.intake import ActionFilter, Intake
from bot.metrics import Metrics
from bot.recent_senders import RecentSenders
from bot.reconcile import Reconciler
from bot.rooms import RoomDirectory
from bot.settings import PolicySettings, ReconcileSettings
from bot.staff_room import StaffRoom
from bot.store import ingest
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.policy import GROUP, MEMBER, MOD, STAFF

NOW = dt.datetime.now(dt.UTC)


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


def build(engine, hs, since: dt.datetime | None = None):
    intake = new_intake(engine)

    async def rooms():
        return [(GROUP, since)]

    return Reconciler(engine, hs, intake, rooms, ReconcileSettings()), intake


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
