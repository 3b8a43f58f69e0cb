"""The inbox: an event that keeps failing is given up on and reported; nothing else waits.

A homeserver outage (checked, not assumed) keeps the event queued and uncounted;
a failure caused by the event itself is counted and, after MAX_ATTEMPTS, the
event is recorded as failed, staff are told, and the lane moves on. Flags have
a lane of their own.
"""

from __future__ import annotations

import datetime as dt
import json
import logging

import pytest

from appservice.logs import JsonFormatter
from bot.core.metrics import Metrics
from bot.core.ports import HomeserverUnavailable
from bot.intake.accept import FLAG_LANE, OTHER_LANE, ActionFilter, Intake
from bot.intake.dispatch import MAX_ATTEMPTS, Classifier, Dispatcher, EventKind
from bot.rooms.directory import RoomDirectory
from bot.rooms.refusal_reports import RefusalReports
from bot.rooms.staff_room import StaffRoom
from bot.store import audit, ingest, outbox
from bot.texts.messages import Texts
from tests.support.databases import record_events
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.policy import BOT, GROUP, MEMBER, MOD, STAFF, deployment
from tests.support.policy import referral as build_referral

NOW = dt.datetime(2026, 11, 24, 12, tzinfo=dt.UTC)


def homeserver() -> FakeHomeserver:
    hs = FakeHomeserver()
    hs.add_room(GROUP, {MEMBER: "join", MOD: "join", hs.bot_user_id: "join"}, {MOD: 50})
    hs.add_room(STAFF, {hs.bot_user_id: "join"}, {})
    return hs


def redaction(redacts: str, *, sender: str = MOD, room: str = GROUP) -> dict:
    return {
        "event_id": "$undo",
        "room_id": room,
        "type": "m.room.redaction",
        "sender": sender,
        "content": {"redacts": redacts},
    }


def flag(event_id: str, member: str = MEMBER) -> dict:
    return {
        "event_id": event_id,
        "room_id": GROUP,
        "type": "m.room.message",
        "sender": MOD,
        "origin_server_ts": 1,
        "content": {"body": f"!safeguard {member}"},
    }


def reaction(event_id: str, to: str) -> dict:
    return {
        "event_id": event_id,
        "room_id": GROUP,
        "type": "m.reaction",
        "sender": MOD,
        "origin_server_ts": 1,
        "content": {"m.relates_to": {"rel_type": "m.annotation", "event_id": to, "key": "🚨"}},
    }


def membership(event_id: str) -> dict:
    return {
        "event_id": event_id,
        "room_id": GROUP,
        "type": "m.room.member",
        "sender": MEMBER,
        "state_key": MEMBER,
        "content": {"membership": "join"},
    }


async def queue(engine, *events: tuple[dict, int]) -> None:
    await record_events(engine, "t", [e["event_id"] for e, _ in events], list(events), NOW)


def build(engine, hs, **options) -> Dispatcher:
    settings = deployment()
    staff_room = StaffRoom(STAFF)
    metrics = Metrics()
    referral = build_referral(engine, hs, settings)
    return Dispatcher(
        engine,
        hs,
        Classifier(RoomDirectory(staff_room), settings.bot_user_id),
        {EventKind.FLAG: referral},
        deployment=settings,
        staff_room=staff_room,
        metrics=metrics,
        texts=Texts(settings),
        on_outbox=lambda: None,
        reports=RefusalReports(
            engine,
            staff_room,
            settings.policy.refusal_report_every,
            texts=Texts(settings),
            on_outbox=lambda: None,
        ),
        retry_delays=(0.0,),
        outage_delays=(0.0,),
        **options,
    )


async def drain(dispatcher: Dispatcher, lane: int, rounds: int = 10) -> None:
    for _ in range(rounds):
        await dispatcher.work_lane(lane)


@pytest.mark.parametrize("error", [ValueError, HomeserverUnavailable])
async def test_event_that_keeps_failing_is_given_up_and_the_next_one_processed(engine, error):
    hs = homeserver()
    dispatcher = build(engine, hs)
    original = hs.get_event

    async def failing_for_bad(room_id, event_id):
        # The bad flag reacts to a message whose read breaks; the homeserver itself is
        # fine (check() is None).
        if event_id == "$unreadable":
            raise error("caused by this event")
        return await original(room_id, event_id)

    hs.get_event = failing_for_bad  # type: ignore[method-assign]
    await queue(engine, (reaction("$bad", to="$unreadable"), FLAG_LANE), (flag("$good"), FLAG_LANE))
    await drain(dispatcher, FLAG_LANE)
    async with engine.connect() as conn:
        assert await ingest.pending(conn) == []
        entries = await audit.entries(conn)
        messages = await outbox.pending(conn)
    kinds = [e.kind for e in entries]
    assert kinds.count("flagged") == 1 and kinds.count("event_failed") == 1
    assert kinds.index("flagged") < kinds.index("event_failed"), "the good flag did not wait"
    failed = next(e for e in entries if e.kind == "event_failed")
    assert failed.facts["event"] == "$bad" and failed.facts["attempts"] == MAX_ATTEMPTS
    assert any("could not be processed" in m.content["body"] for m in messages)
    assert messages[0].room_id == STAFF


async def test_homeserver_outage_keeps_the_event_queued_uncounted_in_order(engine):
    hs = homeserver()
    hs.unavailable_for = {"room_state_events"}
    hs.down = True
    dispatcher = build(engine, hs)
    await queue(engine, (flag("$first"), FLAG_LANE), (flag("$second"), FLAG_LANE))
    await drain(dispatcher, FLAG_LANE, rounds=MAX_ATTEMPTS + 2)
    async with engine.connect() as conn:
        pending = await ingest.pending(conn)
        assert [i.event_id for i in pending] == ["$first", "$second"]
        assert all(item.attempts == 0 for item in pending), "an outage is not the event's fault"
        assert await audit.entries(conn) == []
    hs.unavailable_for = set()
    hs.down = False
    await drain(dispatcher, FLAG_LANE)
    async with engine.connect() as conn:
        assert await ingest.pending(conn) == []
        kinds = [e.kind for e in await audit.entries(conn)]
    assert kinds == ["flagged", "corroborated"]


async def test_flags_have_a_lane_of_their_own(engine):
    hs = homeserver()
    dispatcher = build(engine, hs)
    await queue(engine, (membership("$join"), OTHER_LANE), (flag("$flag"), FLAG_LANE))
    assert await dispatcher.work_lane(FLAG_LANE) is False
    async with engine.connect() as conn:
        left = [item.event_id for item in await ingest.pending(conn)]
        assert left == ["$join"], "the flag was handled without waiting for the other lane"
        assert [e.kind for e in await audit.entries(conn)] == ["flagged"]


def test_json_logs_carry_the_case_number_and_no_extras():
    record = logging.LogRecord(
        "bot.cases.engine", logging.INFO, __file__, 1, "case #%d: %s", (4, "x"), None
    )
    record.case = 4
    line = json.loads(JsonFormatter().format(record))
    assert line["case"] == 4 and line["message"] == "case #4: x" and line["level"] == "INFO"


class NeverDecrypts:
    """Keys that never arrive."""

    def decrypt(self, event: dict) -> dict | None:
        return None

    async def request_key(self, event: dict) -> None:
        pass


def encrypted(event_id: str) -> dict:
    return {
        "event_id": event_id,
        "room_id": GROUP,
        "type": "m.room.encrypted",
        "sender": MEMBER,
        "origin_server_ts": 1,
        "content": {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "noise"},
    }


async def test_messages_that_cannot_be_read_are_told_once_then_summed_up(engine):
    """A sender whose messages can never be read (a broken client, or noise sent on
    purpose) costs staff one message, and one summary per window: never one each."""
    dispatcher = build(engine, homeserver(), decrypter=NeverDecrypts())
    dispatcher.undecryptable_after = dt.timedelta(0)
    await queue(engine, *[(encrypted(f"$noise{n}"), FLAG_LANE) for n in range(5)])
    await drain(dispatcher, FLAG_LANE)
    async with engine.connect() as conn:
        assert await ingest.pending(conn) == []
        kinds = [e.kind for e in await audit.entries(conn)]
        told = [m.content["body"] for m in await outbox.pending(conn)]
    assert kinds.count("undecryptable") == 5, "every one recorded"
    assert len(told) == 1 and "could not be read" in told[0]
    summary = Texts(deployment()).refusals_summary(
        kind="undecryptable", actor=MEMBER, room=GROUP, count=4, since=NOW
    )["body"]
    assert summary.startswith("4 more message(s) from") and "could not be read" in summary


class DecryptsTo:
    """Decrypts each event to the content given for its id."""

    def __init__(self, plaintexts: dict[str, dict]) -> None:
        self.plaintexts = plaintexts

    def decrypt(self, event: dict) -> dict | None:
        content = self.plaintexts.get(event["event_id"])
        return None if content is None else {**event, "type": "m.room.message", "content": content}

    async def request_key(self, event: dict) -> None:
        return None


async def test_encrypted_chat_is_decrypted_apart_and_only_a_flag_moves_to_the_flag_lane(engine):
    from bot.intake.accept import DECRYPT_LANE

    chat = {f"$chat{n}": {"msgtype": "m.text", "body": f"hello {n}"} for n in range(30)}
    command = {"$command": {"msgtype": "m.text", "body": f"!safeguard {MEMBER}"}}
    moved: list[int] = []

    def lane_of(event: dict, kind: str, room: str) -> int | None:
        return FLAG_LANE if "!safeguard" in event["content"].get("body", "") else None

    dispatcher = build(
        engine,
        homeserver(),
        decrypter=DecryptsTo(chat | command),
        lane_of=lane_of,
        on_moved=moved.append,
    )
    from_moderator = encrypted("$command") | {"sender": MOD}
    await queue(
        engine,
        *[(encrypted(event_id), DECRYPT_LANE) for event_id in chat],
        (from_moderator, DECRYPT_LANE),
    )
    await drain(dispatcher, DECRYPT_LANE, rounds=2)
    async with engine.connect() as conn:
        pending = await ingest.pending(conn)
    assert [(item.event_id, item.lane) for item in pending] == [("$command", FLAG_LANE)]
    assert pending[0].payload["content"]["ciphertext"] == "noise", "plaintext is never stored"
    assert moved == [FLAG_LANE]
    await drain(dispatcher, FLAG_LANE)
    async with engine.connect() as conn:
        assert await ingest.pending(conn) == []
        assert [e.kind for e in await audit.entries(conn)] == ["flagged"], "acted on as a flag"


async def test_a_flag_removed_before_it_was_reached_is_not_acted_on(engine):
    dispatcher = build(engine, homeserver())
    await queue(
        engine,
        (flag("$flag"), FLAG_LANE),
        (redaction("$flag"), FLAG_LANE),
        (flag("$kept"), FLAG_LANE),
    )
    await drain(dispatcher, FLAG_LANE)
    async with engine.connect() as conn:
        entries = await audit.entries(conn)
        assert await ingest.pending(conn) == []
    kinds = [e.kind for e in entries]
    assert kinds == ["flag_withdrawn", "flagged"], "the other flag is acted on"
    assert entries[0].facts["event"] == "$flag"


@pytest.mark.parametrize(
    ("sender", "room"), [("@someone:elsewhere", GROUP), (MOD, "!another:localhost")]
)
async def test_only_its_own_sender_in_its_room_takes_a_flag_back(engine, sender, room):
    """A redaction names any event it likes (one from another server is not checked
    against power when sent): someone else's, or one sent elsewhere, cancels no flag."""
    dispatcher = build(engine, homeserver())
    await queue(
        engine,
        (redaction("$flag", sender=sender, room=room), FLAG_LANE),
        (flag("$flag"), FLAG_LANE),
    )
    await drain(dispatcher, FLAG_LANE)
    async with engine.connect() as conn:
        kinds = [e.kind for e in await audit.entries(conn)]
    assert kinds == ["flagged"], "acted on"


OTHER, THIRD = "@other:localhost", "@third:localhost"


def intake_for(engine, dispatcher: Dispatcher) -> Intake:
    """The intake as the service wires it: flags handed to their lane as they are recorded."""
    rooms = RoomDirectory(StaffRoom(STAFF))
    rooms.moderate(GROUP)
    check = ActionFilter(deployment().policy, rooms, bot_user_id=BOT)
    return Intake(
        engine, check, Metrics(), on_queued=lambda lane: None, hand_over=dispatcher.hand_over
    )


def counting_reads(monkeypatch) -> list[int]:
    """How many times the lanes read the inbox."""
    import bot.intake.dispatch as dispatch_module

    reads: list[int] = []
    whole = dispatch_module.read

    async def counted(db, work, *args, **kwargs):
        reads.append(1)
        return await whole(db, work, *args, **kwargs)

    monkeypatch.setattr(dispatch_module, "read", counted)
    return reads


def handing_over(engine, monkeypatch) -> tuple[FakeHomeserver, Dispatcher, Intake, list[int]]:
    """A flag lane that takes what the intake hands over, the reads of the inbox counted,
    and three members in the group room."""
    hs = homeserver()
    hs.rooms[GROUP].members |= {OTHER: "join", THIRD: "join"}
    dispatcher = build(engine, hs, hand_over_lanes=frozenset({FLAG_LANE}))
    return hs, dispatcher, intake_for(engine, dispatcher), counting_reads(monkeypatch)


async def kinds_of(engine) -> list[str]:
    async with engine.connect() as conn:
        return [e.kind for e in await audit.entries(conn)]


async def test_a_flag_is_handed_to_its_lane_as_it_is_recorded_and_acted_on_once(
    engine, monkeypatch
):
    _, dispatcher, intake, reads = handing_over(engine, monkeypatch)
    try:
        await intake.accept("t1", [flag("$first")])
        # Until a round has seen the lane whole, it reads the inbox (which has the flag).
        await dispatcher.work_lane(FLAG_LANE)
        assert len(reads) == 1 and await kinds_of(engine) == ["flagged"]
        await dispatcher.work_lane(FLAG_LANE)  # a poll: nothing handed over, so a read
        assert len(reads) == 2 and await kinds_of(engine) == ["flagged"], "not twice"
        await intake.accept("t2", [flag("$second", member=OTHER)])
        await dispatcher.work_lane(FLAG_LANE)
        assert len(reads) == 2, "the second flag came from memory, not a read"
        assert await kinds_of(engine) == ["flagged", "flagged"]
        await drain(dispatcher, FLAG_LANE, rounds=3)
        assert await kinds_of(engine) == ["flagged", "flagged"], "each acted on once"
        async with engine.connect() as conn:
            assert await ingest.pending(conn) == []
    finally:
        await intake.close()


async def test_a_flag_both_handed_over_and_read_is_acted_on_once(engine):
    hs = homeserver()
    dispatcher = build(engine, hs, hand_over_lanes=frozenset({FLAG_LANE}))
    await queue(engine, (flag("$flag"), FLAG_LANE))
    async with engine.connect() as conn:
        (item,) = await ingest.pending(conn)
    dispatcher.hand_over([item])  # as if its commit and the lane's read had crossed
    await drain(dispatcher, FLAG_LANE, rounds=4)
    assert await kinds_of(engine) == ["flagged"]


async def test_a_flag_handed_over_only_after_a_read_took_it_is_acted_on_once(engine):
    """Its commit and its hand-over straddling a read of the lane (a poll): the read
    takes it, and the late hand-over is not taken again."""
    hs = homeserver()
    dispatcher = build(engine, hs, hand_over_lanes=frozenset({FLAG_LANE}))
    await queue(engine, (flag("$flag"), FLAG_LANE))
    async with engine.connect() as conn:
        (item,) = await ingest.pending(conn)
    await dispatcher.work_lane(FLAG_LANE)  # the read takes it, and the lane is clear
    dispatcher.hand_over([item])  # the intake's hand-over, late
    await drain(dispatcher, FLAG_LANE, rounds=4)
    assert await kinds_of(engine) == ["flagged"]


async def test_a_lane_with_a_flag_to_retry_reads_the_inbox_so_flags_keep_their_order(
    engine, monkeypatch
):
    hs, dispatcher, intake, reads = handing_over(engine, monkeypatch)
    original = hs.get_event
    failures = ["once"]

    async def failing_once(room_id, event_id):
        if event_id == "$said" and failures:
            failures.pop()
            raise ValueError("caused by this event")
        return await original(room_id, event_id)

    hs.get_event = failing_once  # type: ignore[method-assign]
    try:
        await intake.accept("t0", [flag("$warm-up", member=THIRD)])
        await dispatcher.work_lane(FLAG_LANE)  # the lane seen whole: clear
        await intake.accept("t1", [reaction("$first", to="$said")])
        await dispatcher.work_lane(FLAG_LANE)  # from memory; it fails, to be retried
        assert await kinds_of(engine) == ["flagged"]
        read_before = len(reads)
        await intake.accept("t2", [flag("$second", member=OTHER)])
        await dispatcher.work_lane(FLAG_LANE)
        assert len(reads) == read_before + 1, "with a flag waiting, the lane reads the inbox"
        async with engine.connect() as conn:
            flagged = [e.personal.get("flag_event") for e in await audit.entries(conn)]
        assert flagged[1:] == ["$first", "$second"], "the retried flag first, as it came"
    finally:
        await intake.close()


async def test_the_member_a_flag_names_is_looked_ahead_at_as_it_arrives(engine):
    """Before the flag is even recorded, the referral is shown it, and asks for what the
    member's notice will need (their devices): only for a flag, in a room it moderates,
    naming someone it knows without a read, and never in a dry run."""
    from bot.intake.recent_senders import RecentSenders

    looked_up: list[str] = []
    senders = RecentSenders()
    senders.note(["$said"], [{"room_id": GROUP, "sender": MEMBER}])
    referral = build_referral(engine, homeserver(), senders=senders, before_notice=looked_up.append)
    chat = flag("$chat") | {"content": {"body": "hello"}}
    elsewhere = reaction("$elsewhere", to="$said") | {"room_id": "!other:localhost"}
    for event in (chat, reaction("$unknown", to="$never-seen"), elsewhere):
        referral.foresee(event)
    assert looked_up == []
    referral.foresee(reaction("$flag", to="$said"))
    referral.foresee(flag("$command", member=OTHER))
    assert looked_up == [MEMBER, OTHER]
    dry = build_referral(
        engine,
        homeserver(),
        deployment(dry_run=True),
        senders=senders,
        before_notice=looked_up.append,
    )
    dry.foresee(reaction("$flag", to="$said"))
    assert looked_up == [MEMBER, OTHER], "a dry run sends no one anything"


async def test_the_intake_shows_the_referral_each_possible_flag_as_it_arrives(engine):
    shown: list[str] = []

    async def pending_count() -> int:
        async with engine.connect() as conn:
            return len(await ingest.pending(conn))

    rooms = RoomDirectory(StaffRoom(STAFF))
    rooms.moderate(GROUP)
    intake = Intake(
        engine,
        ActionFilter(deployment().policy, rooms, bot_user_id=BOT),
        Metrics(),
        on_queued=lambda lane: None,
        foresee=lambda event: shown.append(event["event_id"]),
    )
    try:
        chat = flag("$chat") | {"content": {"body": "hello"}}
        await intake.accept("t1", [chat, membership("$join"), reaction("$flag", to="$said")])
    finally:
        await intake.close()
    assert shown == ["$flag"], "possible flags only"
    assert await pending_count() == 1
