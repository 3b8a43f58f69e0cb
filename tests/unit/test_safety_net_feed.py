"""The bot's sync as the safety net: what it brings is fed once, by catch-up's rules."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Collection

import pytest

from bot.config.settings import ReconcileSettings
from bot.core.ports import (
    HomeserverUnavailable,
    Receipt,
    Refused,
    SyncBatch,
    SyncedRoom,
    SyncWithdrawn,
)
from bot.intake import safety_net as safety_net_module
from bot.intake.safety_net import SYNC_POSITION, SafetyNet
from bot.store import positions
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.policy import GROUP, STAFF
from tests.unit.test_reconcile import NOW, _intakes, build, chat, flag, queued

BOT = "@safeguard:localhost"


@pytest.fixture
async def engine(engine):
    """The unit tests' database; the intakes' recording connections closed before it."""
    yield engine
    while _intakes:
        await _intakes.pop().close()


class FakeSync:
    """Answers queued by the test, one a sync; records the tokens asked from."""

    def __init__(self) -> None:
        self.answers: list[SyncBatch | Refused] = []
        self.asked: list[str | None] = []
        self.receipts_in: list[list[str]] = []

    async def sync(
        self, since: str | None, *, wait: float, receipts_in: Collection[str] = ()
    ) -> SyncBatch | Refused:
        self.asked.append(since)
        self.receipts_in.append(list(receipts_in))
        if since is None:
            return SyncBatch("s0", [], [])
        return self.answers.pop(0)

    def withdraw(self) -> bool:
        return False


def net(engine, hs, sync, *, joined: dict | None = None, notice_reads=None, **settings):
    if GROUP not in hs.rooms:
        hs.add_room(GROUP, {}, {})
    reconciler, intake = build(engine, hs, **settings)

    async def joined_at():
        return joined or {}

    settings = ReconcileSettings(**settings)
    safety = SafetyNet(
        engine,
        sync,
        reconciler,
        settings,
        bot_user_id=BOT,
        joined_at=joined_at,
        notice_reads=notice_reads,
    )
    return safety, intake


def room(events, **kwargs) -> SyncedRoom:
    return SyncedRoom(GROUP, [e | {"room_id": GROUP} for e in events], **kwargs)


async def stored_token(engine) -> str | None:
    async with engine.connect() as conn:
        return await positions.get(conn, SYNC_POSITION)


async def test_a_start_takes_a_token_then_feeds_what_follows_once(engine):
    hs = FakeHomeserver()
    sync = FakeSync()
    safety, _ = net(engine, hs, sync)
    assert await safety.catch_up() == 0
    assert await stored_token(engine) == "s0"
    sync.answers = [
        SyncBatch("s1", [room([chat("$chat", NOW), flag("$lost", NOW)])], []),
        SyncBatch("s2", [room([flag("$lost", NOW)])], []),
    ]
    assert await safety.catch_up() == 2
    assert await stored_token(engine) == "s1"
    assert await safety.catch_up() == 0, "nothing twice"
    assert sync.asked == [None, "s0", "s1"]
    assert await queued(engine) == [("$lost", True)]


def stripped_invite(room_id: str) -> dict:
    """As a sync shows it: no event id, no timestamp."""
    return {
        "type": "m.room.member",
        "room_id": room_id,
        "sender": STAFF,
        "state_key": BOT,
        "content": {"membership": "invite"},
    }


async def test_an_invite_never_pushed_is_fed_like_a_pushed_one_once(engine):
    hs = FakeHomeserver()
    sync = FakeSync()
    safety, _ = net(engine, hs, sync)
    await safety.catch_up()
    answer = SyncBatch("s1", [], [stripped_invite("!new:localhost")])
    sync.answers = [answer, answer]  # the same answer asked for again
    assert await safety.catch_up() == 1
    await safety.catch_up()
    ((event_id, caught_up),) = await queued(engine)
    assert event_id.startswith("$") and caught_up


async def test_an_invite_the_push_brought_is_left_to_it(engine):
    hs = FakeHomeserver()
    sync = FakeSync()
    safety, intake = net(engine, hs, sync)
    await safety.catch_up()
    pushed = stripped_invite("!new:localhost") | {"event_id": "$pushed"}
    await intake.accept("txn-1", [pushed])
    sync.answers = [SyncBatch("s1", [], [stripped_invite("!new:localhost")])]
    assert await safety.catch_up() == 0
    assert await queued(engine) == [("$pushed", False)]


async def test_nothing_from_before_the_bot_came_in(engine):
    hs = FakeHomeserver()
    sync = FakeSync()
    safety, _ = net(engine, hs, sync)
    await safety.catch_up()
    joined = {
        "type": "m.room.member",
        "event_id": "$bot-joined",
        "sender": BOT,
        "state_key": BOT,
        "origin_server_ts": int(NOW.timestamp() * 1000),
        "content": {"membership": "join"},
    }
    before, after = NOW - dt.timedelta(minutes=5), NOW + dt.timedelta(seconds=1)
    events = [flag("$old", before), joined, flag("$new", after)]
    sync.answers = [SyncBatch("s1", [room(events)], [])]
    await safety.catch_up()
    flags = [event_id for event_id, _ in await queued(engine) if event_id != "$bot-joined"]
    assert flags == ["$new"]


async def test_a_limited_timeline_is_read_back_to_the_last_sync(engine):
    hs = FakeHomeserver()
    fake_room = hs.add_room(GROUP, {}, {})
    sync = FakeSync()
    safety, _ = net(engine, hs, sync)
    await safety.catch_up()
    fake_room.events += [flag("$gap", NOW), chat("$chat", NOW), flag("$in-answer", NOW)]
    answer = room([flag("$in-answer", NOW)], limited=True, prev_batch="2")
    sync.answers = [SyncBatch("s1", [answer], [])]
    assert await safety.catch_up() == 3, "the gap's two events, and the answer's"
    assert [event_id for event_id, _ in await queued(engine)] == ["$gap", "$in-answer"]


async def test_a_young_answer_is_fed_once_it_has_settled(engine):
    hs = FakeHomeserver()
    sync = FakeSync()
    safety, _ = net(engine, hs, sync, settle=dt.timedelta(seconds=0.5))
    await safety.catch_up()
    loop_time = dt.datetime.now(dt.UTC)
    sync.answers = [SyncBatch("s1", [room([flag("$young", loop_time)])], [])]
    assert await safety.catch_up() == 1
    assert dt.datetime.now(dt.UTC) - loop_time >= dt.timedelta(seconds=0.5)


async def test_a_refused_token_starts_the_sync_again(engine):
    hs = FakeHomeserver()
    sync = FakeSync()
    safety, _ = net(engine, hs, sync)
    await safety.catch_up()
    sync.answers = [Refused("M_UNKNOWN_POS", "unknown position")]
    await safety.catch_up()
    assert await stored_token(engine) is None
    await safety.catch_up()
    assert await stored_token(engine) == "s0"


async def test_an_answer_not_recorded_is_fed_again_not_asked_for_again(engine):
    """With encryption on, the answer's to-device messages were taken by the device: a
    second request from the same token would show them to it twice."""
    hs = FakeHomeserver()
    fake_room = hs.add_room(GROUP, {}, {})
    sync = FakeSync()
    safety, _ = net(engine, hs, sync)
    await safety.catch_up()
    fake_room.events += [flag("$gap", NOW), flag("$in-answer", NOW)]
    recorded: list[str] = []
    answer = room([flag("$in-answer", NOW)], limited=True, prev_batch="1")
    sync.answers = [SyncBatch("s1", [answer], [], recorded=lambda: recorded.append("s1"))]
    read_back = hs.read_back

    async def away(*args, **kwargs):
        raise HomeserverUnavailable("read_back")

    hs.read_back = away  # the gap cannot be read back now
    with pytest.raises(HomeserverUnavailable):
        await safety.catch_up()
    assert await stored_token(engine) == "s0" and not recorded
    hs.read_back = read_back
    assert await safety.catch_up() == 2
    assert sync.asked == [None, "s0"], "fed again, not asked for again"
    assert await stored_token(engine) == "s1" and recorded == ["s1"]


class RecordingReads:
    """The notices' read receipts, as the safety net uses them."""

    def __init__(self, rooms: list[str]) -> None:
        self.rooms = rooms
        self.taken: list[list[Receipt]] = []

    async def watched(self) -> list[str]:
        return self.rooms

    async def take(self, receipts: list[Receipt]) -> int:
        self.taken.append(list(receipts))
        return len(receipts)


async def test_receipts_are_asked_of_the_unread_notices_dms_alone_and_handed_on(engine):
    hs = FakeHomeserver()
    sync = FakeSync()
    reads = RecordingReads([])
    safety, _ = net(engine, hs, sync, notice_reads=reads)
    await safety.catch_up()  # the start: no receipts asked
    read = Receipt("!dm:localhost", "$notice", "@member:localhost", "m.read", NOW)
    sync.answers = [SyncBatch("s1", [], [], [read]), SyncBatch("s2", [], [])]
    reads.rooms = ["!dm:localhost"]
    await safety.catch_up()
    reads.rooms = []
    await safety.catch_up()
    assert sync.receipts_in == [[], ["!dm:localhost"], []]
    assert reads.taken == [[read]], "handed on once; an answer without receipts hands none"


class TimedSync(FakeSync):
    """FakeSync that notes when each sync was asked for, and waits once out of answers."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self.idle = asyncio.Event()

    async def sync(
        self, since: str | None, *, wait: float, receipts_in: Collection[str] = ()
    ) -> SyncBatch | Refused:
        self.times.append(asyncio.get_running_loop().time())
        if since is not None and not self.answers:
            self.idle.set()
            await asyncio.sleep(3600)
        return await super().sync(since, wait=wait, receipts_in=receipts_in)


async def test_after_an_answer_with_events_the_sync_waits_gather_unless_more_is_waiting(engine):
    """A flag's burst is gathered into one answer; a backlog (after an outage, a restore)
    is read on at once."""
    hs = FakeHomeserver()
    sync = TimedSync()
    safety, _ = net(engine, hs, sync, gather="1s")
    sync.answers = [
        SyncBatch("s1", [room([chat("$a", NOW)])], [], backlog=True),  # more waiting
        SyncBatch("s2", [room([chat("$b", NOW)])], []),  # then the pause
        SyncBatch("s3", [], []),
    ]
    safety.start()
    try:
        await asyncio.wait_for(sync.idle.wait(), 10)
    finally:
        await safety.stop()
    # The start (no token yet), then the answers s1 (a backlog), s2 (events), s3 (empty).
    _start, first, after_backlog, after_events, after_empty = sync.times[:5]
    assert after_backlog - first < 0.5, "a backlog is read on at once"
    assert after_events - after_backlog >= 0.95, "events: the next sync waits `gather`"
    assert after_empty - after_events < 0.5, "an empty answer: at once"


class LongPoll(FakeSync):
    """FakeSync that waits, as a long poll does, while it has no answer; `withdraw` drops
    the waiting request as BotSync does."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self.waiting: asyncio.Future[None] | None = None
        self.polling = asyncio.Event()

    async def sync(
        self, since: str | None, *, wait: float, receipts_in: Collection[str] = ()
    ) -> SyncBatch | Refused:
        self.times.append(asyncio.get_running_loop().time())
        if since is not None and not self.answers:
            self.waiting = asyncio.get_running_loop().create_future()
            self.polling.set()
            withdrawn = self.waiting
            try:
                await asyncio.wait({withdrawn})  # our own cancellation stays one
            finally:
                if not withdrawn.done():
                    withdrawn.cancel()
            self.asked.append(since)
            raise SyncWithdrawn()
        return await super().sync(since, wait=wait, receipts_in=receipts_in)

    def withdraw(self) -> bool:
        if self.waiting is None or self.waiting.done():
            return False
        self.waiting.cancel()
        return True


async def test_a_pushed_flag_withdraws_the_long_poll_and_holds_the_next_back(engine):
    """The answer a flag's reaction wakes is not computed while the flag's calls run: the
    waiting sync is dropped, asked again `gather` later from the same token, and what
    happened meanwhile comes in that one answer."""
    hs = FakeHomeserver()
    sync = LongPoll()
    safety, _ = net(engine, hs, sync, gather="1s")
    safety.start()
    try:
        await asyncio.wait_for(sync.polling.wait(), 10)
        await asyncio.sleep(safety_net_module.WITHDRAW_AFTER_SECONDS)  # waiting, idle
        sync.polling.clear()
        sync.answers = [SyncBatch("s1", [room([flag("$lost", NOW)])], [])]
        safety.hold()
        held_at = asyncio.get_running_loop().time()
        assert safety.withdrawn == 1
        safety.hold()  # a second flag of the same burst: nothing more to withdraw
        assert safety.withdrawn == 1
        await asyncio.wait_for(sync.polling.wait(), 10)  # s1 taken, polling again
    finally:
        await safety.stop()
    assert sync.times[-2] - held_at >= 0.95, "the next sync waited for the hold"
    assert sync.asked[1:] == ["s0", "s0"], "withdrawn, then asked again from its token"
    assert await stored_token(engine) == "s1"
    assert await queued(engine) == [("$lost", True)]


async def test_a_stream_of_flags_never_keeps_the_sync_from_answering(engine):
    """Only a sync that has waited a moment is withdrawn: one asked again just now is
    left to bring what was waiting (a room key, say), however many flags come."""
    hs = FakeHomeserver()
    sync = LongPoll()
    safety, _ = net(engine, hs, sync, gather="1s")
    safety.start()
    try:
        await asyncio.wait_for(sync.polling.wait(), 10)
        safety.hold()  # asked a moment ago: left to answer
        assert safety.withdrawn == 0 and not sync.waiting.done()
        await asyncio.sleep(safety_net_module.WITHDRAW_AFTER_SECONDS)
        sync.polling.clear()
        safety.hold()  # waited long enough: withdrawn
        assert safety.withdrawn == 1
        await asyncio.wait_for(sync.polling.wait(), 10)  # asked again after the hold
        sync.answers = [SyncBatch("s1", [room([flag("$lost", NOW)])], [])]
        safety.hold()  # the next one, just asked: not withdrawn
        assert safety.withdrawn == 1
    finally:
        await safety.stop()


async def test_without_a_pause_a_flag_withdraws_nothing(engine):
    hs = FakeHomeserver()
    sync = LongPoll()
    safety, _ = net(engine, hs, sync, gather=0)
    safety.start()
    try:
        await asyncio.wait_for(sync.polling.wait(), 10)
        safety.hold()
        assert safety.withdrawn == 0 and not sync.waiting.done()
    finally:
        await safety.stop()
