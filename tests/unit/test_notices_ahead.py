"""The member's notice sent ahead of their case (bot/steps/notify_ahead.py), on both
database backends, against the fake homeserver, which forgets transaction ids when
"Synapse restarts" (so only our own looking-first keeps a notice from going twice).

The reservation is written by the intake's own record of the push (bot/store/ingest.py):
only for a flag recorded for the first time, and only if its room made ahead is still
there to take; the case's notice step takes it over and joins the calls made, or, after
a crash, finds what they did.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from appservice.database import create_engine, upgrade
from bot.core.ports import Refused
from bot.intake.accept import FLAG_LANE
from bot.rooms.directory import RoomDirectory
from bot.rooms.ready_rooms import ReadyRooms
from bot.rooms.staff_room import StaffRoom
from bot.steps import CASE_STEPS
from bot.steps.notify_ahead import NoticeAhead, NoticesAhead, notice_marker
from bot.store import cases
from bot.store import ready_rooms as store
from bot.store.ingest import Recorded, TransactionRecorder
from tests.support.databases import BACKENDS, fresh_database
from tests.support.policy import (
    GROUP,
    MEMBER,
    MOD,
    PROVENANCE,
    REFERRAL_STEPS,
    STAFF,
    homeserver,
    notices,
    run_until_waiting,
    step_engine,
    steps,
    toolbox,
)

HOUR = dt.timedelta(hours=1)
FLAG = {
    "event_id": "$flag",
    "room_id": GROUP,
    "type": "m.reaction",
    "sender": MOD,
    "content": {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$msg", "key": "🚨"}},
}


class Service:
    """What the service holds across a run: the pool, the notices ahead, the engine."""

    def __init__(self, engine: Any, hs: Any) -> None:
        self.rooms = RoomDirectory(StaffRoom(STAFF))
        self.ready = ReadyRooms(engine, hs, self.rooms, wanted=1, encrypted=False)
        self.ahead = NoticesAhead(engine, self.ready, self.rooms)
        self.tools = toolbox(engine, hs, ready_rooms=self.ready, ahead=self.ahead)
        self.runner = step_engine(engine, hs, ready_rooms=self.ready, ahead=self.ahead)

    async def start(self) -> None:
        await self.ready.load()
        await self.ahead.load()
        while await self.ready.work_once():
            pass


async def record_push(engine: Any, notice: NoticeAhead | None, txn: str = "t1") -> Recorded:
    recorder = TransactionRecorder(engine)
    try:
        return await recorder.record(
            txn,
            [FLAG["event_id"]],
            [(FLAG, FLAG_LANE)],
            dt.datetime.now(dt.UTC),
            hand_over_lane=FLAG_LANE,
            ahead=None if notice is None else notice.reservation,
        )
    finally:
        await recorder.close()


def plan(service: Service) -> NoticeAhead:
    notice = service.ahead.plan(
        service.tools,
        flag_event_id=FLAG["event_id"],
        group_room_id=GROUP,
        member_id=MEMBER,
        due_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
    )
    assert notice is not None
    return notice


async def open_case(
    engine: Any, service: Service, nonce: str | None, *, late: dt.timedelta = dt.timedelta(0)
) -> int:
    """As the flag's lane does (Referral._record_flag): the case opened with the nonce
    reserved, the notice taken over, its first step begun. `late`: received that long ago
    (past the alert's deadline, the alert is the step begun first)."""
    now = dt.datetime.now(dt.UTC)
    at = now - late
    flag = cases.NewFlag(GROUP, MEMBER, MOD, "reaction", "$flag", "$msg", None, at, at)
    flag = cases.NewFlag(**{**flag.__dict__, "nonce": nonce})
    async with engine.begin() as conn:
        opened = await cases.open_or_corroborate(
            conn, PROVENANCE, flag, steps=CASE_STEPS, dry_run=False, due_at=now + HOUR
        )
        opened = await service.ahead.take_over(conn, opened, flag)
        begun = await service.runner.begin(conn, opened)
    service.ahead.taken_over(flag)
    await service.runner.run_case(opened.case_id, begun)
    await run_until_waiting(service.runner, engine, opened.case_id)
    return opened.case_id


def told(hs: Any) -> list[tuple[str, dict[str, Any]]]:
    """Every notice, with the room it is in."""
    return [
        (room.room_id, event)
        for room in hs.rooms.values()
        for event in room.events
        if event in notices(hs, "notify")
    ]


async def reservations(engine: Any) -> list[store.Reservation]:
    async with engine.connect() as conn:
        return await store.reservations(conn)


@pytest.fixture(params=BACKENDS)
async def db(request, tmp_path):
    async with fresh_database(request.param, tmp_path) as url:
        engine = create_engine(url)
        try:
            await upgrade(engine)
            yield engine
        finally:
            await engine.dispose()


async def test_the_push_reserves_the_room_and_the_case_joins_the_calls_made(db):
    hs = homeserver()
    service = Service(db, hs)
    await service.start()
    notice = plan(service)
    recorded = await record_push(db, notice)
    assert recorded.reserved and recorded.handed == {"$flag": 1}
    service.ahead.recorded(notice, True)
    assert await reservations(db) == [notice.reservation]
    async with db.connect() as conn:
        assert await store.all_rooms(conn) == [], "the room left the pool with the push"
    case_id = await open_case(db, service, notice.reservation.nonce)
    done = await steps(db, case_id)
    assert [done[s].status for s in REFERRAL_STEPS] == ["done"] * 5
    ((room_id, event),) = told(hs)
    assert room_id == notice.reservation.room_id
    assert hs.invites == [(notice.reservation.room_id, MEMBER, True)]
    assert done["notify"].result["event"] == event["event_id"]
    assert done["notify"].attempts == 1, "joined, not resumed"
    assert await reservations(db) == []


async def test_a_flag_recorded_before_reserves_nothing(db):
    """Synapse resending a push (its answer lost): the flag is not new, so no reservation
    and nothing sent; the room stays in the pool."""
    service = Service(db, homeserver())
    await service.start()
    first = await record_push(db, None)
    assert first.handed == {"$flag": 1}
    notice = plan(service)
    again = await record_push(db, notice, txn="t1")
    assert not again.reserved
    service.ahead.recorded(notice, False)
    assert notice.sending is not None and await notice.sending == (None, None), "nothing sent"
    assert await reservations(db) == []
    assert service.ahead.of_flag("$flag") is None
    await service.ready.work_once()  # the pool read again
    assert service.ready.claim_free() == notice.reservation.room_id, "still in the pool"


async def test_a_room_taken_by_a_case_meanwhile_is_not_reserved(db):
    """The pool's row decides: a case that took the room first keeps it, and the notice
    goes the usual way."""
    service = Service(db, homeserver())
    await service.start()
    notice = plan(service)
    async with db.begin() as conn:
        assert await store.take(conn, encrypted=False) == notice.reservation.room_id
    assert not (await record_push(db, notice)).reserved
    assert await reservations(db) == []


@pytest.mark.parametrize("late", [False, True], ids=["at-once", "past-the-alert-deadline"])
@pytest.mark.parametrize("sent", [True, False], ids=["calls-took-effect", "nothing-sent"])
async def test_killed_between_the_push_and_the_case_tells_once(db, sent, late):
    """Killed after the reservation (and, or not, after its calls went through), before the
    case was opened; Synapse restarted too (transaction ids forgotten). The next run opens
    the case and sends nothing twice."""
    hs = homeserver()
    before = Service(db, hs)
    await before.start()
    notice = plan(before)
    assert (await record_push(db, notice)).reserved
    assert notice.sending is not None
    if sent:
        before.ahead.recorded(notice, True)
        await notice.sending
        assert len(notices(hs, "notify")) == 1 and len(hs.invites) == 1
    else:
        notice.sending.cancel()  # killed before the record's end was known
    hs.txn_ids.clear()  # Synapse restarted
    after = Service(db, hs)
    await after.start()
    assert after.ahead.of_flag("$flag") is not None, "found at start"
    if late:
        # The case opens after the alert's deadline: the alert is its first step begun.
        case_id = await open_case(db, after, notice.reservation.nonce, late=2 * HOUR)
    else:
        case_id = await open_case(db, after, notice.reservation.nonce)
    done = await steps(db, case_id)
    assert [done[s].status for s in REFERRAL_STEPS] == ["done"] * 5
    ((room_id, event),) = told(hs)
    assert room_id == notice.reservation.room_id
    assert event["content"]["org.matrix.safeguard"]["marker"] == notice_marker(
        notice.reservation.nonce
    )
    assert [i[:2] for i in hs.invites] == [(notice.reservation.room_id, MEMBER)]
    assert done["notify"].result["event"] == event["event_id"]
    assert await reservations(db) == []


async def test_an_invite_refused_into_the_room_ahead_makes_a_room_instead(db):
    hs = homeserver()
    service = Service(db, hs)
    await service.start()
    notice = plan(service)
    assert (await record_push(db, notice)).reserved
    hs.refuse["invite"] = Refused("M_FORBIDDEN", "not here")
    service.ahead.recorded(notice, True)
    assert notice.sending is not None
    await notice.sending
    del hs.refuse["invite"]
    case_id = await open_case(db, service, notice.reservation.nonce)
    done = await steps(db, case_id)
    assert done["notify"].status == "done"
    dm = done["notify"].result["dm_room"]
    assert dm != notice.reservation.room_id, "a room of its own"
    by_room = dict(told(hs))
    assert set(by_room) == {dm, notice.reservation.room_id}
    assert (notice.reservation.room_id, by_room[notice.reservation.room_id]["event_id"]) in [
        r[:2] for r in hs.redactions
    ], "the one sent into the room ahead, redacted (nobody is in it)"


# ---- deciding ahead: only what the lane would accept, from what is known now ----------------


class Planning:
    """A referral that may plan ahead, with everything it needs known (the room's and
    the staff room's state read, the flagged message's sender seen, no case, no DM)."""

    def __init__(self, engine: Any, hs: Any, **settings: Any) -> None:
        from bot.intake.recent_senders import RecentSenders
        from tests.support.policy import deployment, referral

        self.service = Service(engine, hs)
        self.watched: set[tuple[str, str]] = set()
        self.senders = RecentSenders()
        self.senders.note(["$msg"], [{"room_id": GROUP, "sender": MEMBER, "event_id": "$msg"}])
        self.referral = referral(
            engine,
            hs,
            deployment(**settings),
            senders=self.senders,
            watch_member=lambda room, member: self.watched.add((room, member)),
            is_watched=lambda room, member: (room, member) in self.watched,
            ahead=(self.service.ahead, self.service.tools),
        )

    async def ready(self) -> None:
        await self.service.start()
        state = self.referral._room_state
        await state.state(GROUP)
        await state.state(STAFF)
        await state.member_event(GROUP, MEMBER)

    def plan(self, event: dict[str, Any] = FLAG) -> NoticeAhead | None:
        return self.referral.plan_ahead(event, dt.datetime.now(dt.UTC))


async def test_a_flag_known_to_be_accepted_is_planned_and_its_member_watched(engine):
    planning = Planning(engine, homeserver())
    await planning.ready()
    notice = planning.plan()
    assert notice is not None and notice.member == (GROUP, MEMBER)
    assert (GROUP, MEMBER) in planning.watched, "their membership queued from now"
    assert planning.plan() is None, "one notice ahead per member"


def _by_a_member(planning: Planning, hs: Any) -> dict[str, Any]:
    return {**FLAG, "sender": "@someone:localhost"}


SPOILERS = {
    # Each: what makes the flag unknown or refused, and the flag then (None: FLAG).
    "flagger below moderator": lambda p, hs: (
        hs.rooms[GROUP].members.update({"@someone:localhost": "join"})
        or {**FLAG, "sender": "@someone:localhost"}
    ),
    "sender not known": lambda p, hs: {
        **FLAG,
        "content": {"m.relates_to": {**FLAG["content"]["m.relates_to"], "event_id": "$other"}},
    },
    "member already watched": lambda p, hs: p.watched.add((GROUP, MEMBER)),
    "member has a DM with the bot": lambda p, hs: hs.direct.update({MEMBER: ["!dm:localhost"]}),
    "room state not current": lambda p, hs: p.referral._room_state.state_changed(
        GROUP, "m.room.power_levels", ""
    ),
    "staff room state not current": lambda p, hs: p.referral._room_state.state_changed(
        STAFF, "m.room.power_levels", ""
    ),
    "member's membership not known": lambda p, hs: p.referral._room_state.state_changed(
        GROUP, "m.room.member", MEMBER
    ),
    "room not moderated": lambda p, hs: {**FLAG, "room_id": "!elsewhere:localhost"},
    "no room made ahead free": lambda p, hs: p.service.ready.claim_free(),
    "not a flag": lambda p, hs: {**FLAG, "content": {}},
}


@pytest.mark.parametrize("spoiler", SPOILERS)
async def test_nothing_is_planned_unless_all_is_known_and_accepted(engine, spoiler):
    hs = homeserver()
    planning = Planning(engine, hs)
    await planning.ready()
    flag = SPOILERS[spoiler](planning, hs)
    assert planning.plan(flag if isinstance(flag, dict) else FLAG) is None
    assert planning.watched == ({(GROUP, MEMBER)} if spoiler == "member already watched" else set())


async def test_nothing_is_planned_in_a_dry_run(engine):
    planning = Planning(engine, homeserver(), dry_run=True)
    await planning.ready()
    assert planning.plan() is None


async def test_no_notice_goes_ahead_to_a_member_whose_case_is_active(db):
    """Their case reopened by staff, say (not known to the intake's memory): the record of
    the push checks, and their flag corroborates that case in its lane."""
    from tests.support.policy import new_case

    service = Service(db, homeserver())
    await service.start()
    await new_case(db)
    notice = plan(service)
    assert not (await record_push(db, notice)).reserved
    assert await reservations(db) == []


async def test_a_case_closed_before_its_notice_step_records_the_notice_that_went_ahead(db):
    """Killed after the notice went; the case opened, then closed (withdrawn) before its
    notice step ran: nothing is sent now, and what went is on record (so its apology
    follows), not "closed before the member was told"."""
    hs = homeserver()
    before = Service(db, hs)
    await before.start()
    notice = plan(before)
    assert (await record_push(db, notice)).reserved
    before.ahead.recorded(notice, True)
    assert notice.sending is not None
    await notice.sending
    hs.txn_ids.clear()
    after = Service(db, hs)
    await after.start()
    now = dt.datetime.now(dt.UTC)
    flag = cases.NewFlag(GROUP, MEMBER, MOD, "reaction", "$flag", "$msg", None, now, now)
    flag = cases.NewFlag(**{**flag.__dict__, "nonce": notice.reservation.nonce})
    async with db.begin() as conn:
        opened = await cases.open_or_corroborate(
            conn, PROVENANCE, flag, steps=CASE_STEPS, dry_run=False, due_at=now + HOUR
        )
        await after.ahead.take_over(conn, opened, flag)
        await cases.set_fields(conn, opened.case_id, state="closed", closed_at=now)
    after.ahead.taken_over(flag)
    await run_until_waiting(after.runner, db, opened.case_id)
    done = await steps(db, opened.case_id)
    assert done["notify"].status == "done", done["notify"].result
    ((_, event),) = told(hs)
    assert done["notify"].result["event"] == event["event_id"]
    assert done["remove"].status == "skipped", "never removed after the case closed"
