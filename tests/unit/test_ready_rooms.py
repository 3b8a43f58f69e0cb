"""DM rooms made ahead of any flag: made once each, handed to one case each, and a notice
that needs one is never lost for want of it (bot/rooms/ready_rooms.py)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from appservice.database import create_engine, upgrade
from bot.core.ports import Refused
from bot.rooms.directory import RoomDirectory, RoomKind
from bot.rooms.ready_rooms import MARKER_PREFIX, ReadyRooms
from bot.rooms.staff_room import StaffRoom
from bot.store import cases
from bot.store import ready_rooms as store
from tests.support.databases import BACKENDS, fresh_database
from tests.support.fake_homeserver import Crash
from tests.support.policy import (
    MEMBER,
    REFERRAL_STEPS,
    STAFF,
    homeserver,
    new_case,
    notices,
    open_and_begin,
    step_engine,
    steps,
)


def ready_rooms(engine, hs, *, wanted: int = 2, encrypted: bool = False) -> ReadyRooms:
    return ReadyRooms(
        engine, hs, RoomDirectory(StaffRoom(STAFF)), wanted=wanted, encrypted=encrypted
    )


async def fill(pool: ReadyRooms) -> None:
    for _ in range(20):
        if not await pool.work_once():
            return
    raise AssertionError("the pool never settled")


async def rows(engine) -> list[store.ReadyRoom]:
    async with engine.connect() as conn:
        return await store.all_rooms(conn)


def made_ahead(hs) -> list[str]:
    return [
        room.room_id
        for room in hs.rooms.values()
        if room.state.get(("m.room.create", ""), {})
        .get("org.matrix.safeguard.marker", "")
        .startswith(MARKER_PREFIX)
    ]


async def test_the_pool_is_made_once_and_known_as_the_bots_own_rooms(engine):
    hs = homeserver()
    pool = ready_rooms(engine, hs)
    await fill(pool)
    made = made_ahead(hs)
    assert len(made) == 2 and pool.ready == 2
    assert sorted(r.room_id for r in await rows(engine)) == sorted(made)
    assert all(hs.rooms[room].members == {hs.bot_user_id: "join"} for room in made)
    assert all(pool._rooms.kind(room) is RoomKind.DM for room in made), "never moderated"
    await fill(pool)
    assert len(made_ahead(hs)) == 2, "a full pool makes no more"
    # A restart knows them before the first transaction.
    again = ready_rooms(engine, hs)
    await again.load()
    assert again.ready == 2 and all(again._rooms.kind(room) is RoomKind.DM for room in made)


async def test_a_notice_goes_into_a_room_made_ahead_with_a_dm_invite(engine):
    hs = homeserver()
    pool = ready_rooms(engine, hs)
    await fill(pool)
    taken_before = set(made_ahead(hs))
    hs.calls.clear()
    case_id = await new_case(engine)
    await step_engine(engine, hs, ready_rooms=pool).run_case(case_id)

    done = await steps(engine, case_id)
    assert all(done[s].status == "done" for s in REFERRAL_STEPS)
    assert done["notify"].result["room_made_ahead"] is True
    dm = done["notify"].progress["dm_room"]
    assert dm in taken_before
    assert (dm, MEMBER, True) in hs.invites, "invited as a DM"
    (notice,) = notices(hs, "notify")
    assert notice in hs.rooms[dm].events
    assert "create_room" not in hs.calls[: hs.calls.index("kick")], "no room made on the way"
    async with engine.connect() as conn:
        case = await cases.get(conn, case_id)
    assert case is not None and case.dm_room_id == dm
    assert [r.room_id for r in await rows(engine)] == sorted(taken_before - {dm})
    assert hs.direct[MEMBER] == [dm], "the bot's m.direct knows it as their DM"


async def test_in_the_clear_the_notice_goes_alongside_the_invite_not_after_it(engine):
    hs = homeserver()
    pool = ready_rooms(engine, hs)
    await fill(pool)
    invite, send, sending = hs.invite, hs.send, asyncio.Event()

    async def send_seen(*args, **kwargs):
        sending.set()
        return await send(*args, **kwargs)

    async def invite_once_sending(*args, **kwargs):
        await sending.wait()  # answered only once the notice is on its way
        return await invite(*args, **kwargs)

    hs.send, hs.invite = send_seen, invite_once_sending
    case_id = await new_case(engine)
    # Bounded only so the old order (the notice after the invite's answer) fails, not hangs.
    await asyncio.wait_for(step_engine(engine, hs, ready_rooms=pool).run_case(case_id), 30)

    done = await steps(engine, case_id)
    assert all(done[s].status == "done" for s in REFERRAL_STEPS)
    assert done["notify"].result["room_made_ahead"] is True
    dm = done["notify"].progress["dm_room"]
    (notice,) = notices(hs, "notify")
    assert notice in hs.rooms[dm].events and hs.rooms[dm].members[MEMBER] == "invite"


@pytest.mark.parametrize("crash_at", [*range(1, 8), *range(-1, -8, -1)])
async def test_crash_anywhere_around_a_taken_room_then_resume_tells_them_once(engine, crash_at):
    hs = homeserver()
    pool = ready_rooms(engine, hs)
    await fill(pool)
    case_id = await new_case(engine)
    hs.calls.clear()
    hs.crash_at = crash_at
    with contextlib.suppress(Crash):
        await step_engine(engine, hs, ready_rooms=pool).run_case(case_id)
    hs.crash_at = None
    hs.txn_ids.clear()
    await step_engine(engine, hs, ready_rooms=pool).run_case(case_id)

    done = await steps(engine, case_id)
    assert all(done[s].status == "done" for s in REFERRAL_STEPS), done
    their_rooms = [r for r in hs.rooms.values() if r.members.get(MEMBER) == "invite"]
    assert len(their_rooms) == 1, "exactly one DM room"
    (notice,) = notices(hs, "notify")
    assert notice in their_rooms[0].events
    assert hs.kicks[0][1] == MEMBER and len(hs.kicks) == 1
    assert hs.direct[MEMBER] == [their_rooms[0].room_id], "m.direct marks it, resumed or not"
    assert done["notify"].result["room_made_ahead"] is True, "the record says where it came from"
    left = {r.room_id for r in await rows(engine)}
    assert their_rooms[0].room_id not in left, "a taken room is never handed out again"
    assert len(left) == 1, "one room taken, however the attempt ended"


async def test_a_room_made_ahead_that_refuses_the_invite_gives_way_to_a_new_one(engine):
    hs = homeserver()
    pool = ready_rooms(engine, hs)
    await fill(pool)
    hs.refuse["invite"] = Refused("M_FORBIDDEN", "the bot is not in the room", 403)
    case_id = await new_case(engine)
    await step_engine(engine, hs, ready_rooms=pool).run_case(case_id)

    done = await steps(engine, case_id)
    assert done["notify"].status == "done"
    assert "room_made_ahead" not in done["notify"].result
    dm = done["notify"].progress["dm_room"]
    assert dm not in made_ahead(hs), "a room created for the notice"
    assert hs.rooms[dm].members[MEMBER] == "invite"
    # The notice went into the room made ahead alongside the invite (a room in the
    # clear): that one reaches no one, and is redacted; the member has one, in theirs.
    seen = [n for n in notices(hs, "notify") if n in hs.rooms[dm].events]
    unread = [n for n in notices(hs, "notify") if n not in seen]
    assert len(seen) == 1
    assert all(hs.rooms[room].members.get(MEMBER) is None for room in made_ahead(hs))
    redacted = {event_id for _, event_id, _ in hs.redactions}
    assert {n["event_id"] for n in unread} <= redacted
    assert hs.direct[MEMBER] == [dm], "m.direct marks their room only"
    async with engine.connect() as conn:
        case = await cases.get(conn, case_id)
    assert case is not None and case.dm_room_id == dm, "the case names their room, not the other"


async def test_an_empty_pool_or_none_at_all_creates_the_room_as_before(engine):
    hs = homeserver()
    pool = ready_rooms(engine, hs)  # never filled
    case_id = await new_case(engine)
    await step_engine(engine, hs, ready_rooms=pool).run_case(case_id)
    done = await steps(engine, case_id)
    assert done["notify"].status == "done"
    assert "room_made_ahead" not in done["notify"].result
    assert made_ahead(hs) == []


async def test_a_creation_cut_short_is_finished_not_repeated(engine):
    hs = homeserver()
    pool = ready_rooms(engine, hs, wanted=1)
    # The homeserver made the room (its second call, after reading m.direct); we died
    # before recording it.
    hs.crash_at = -2
    with pytest.raises(Crash):
        await pool.work_once()
    hs.crash_at = None
    (planned,) = await rows(engine)
    assert planned.room_id is None
    assert len(made_ahead(hs)) == 1
    await fill(pool)
    (room,) = await rows(engine)
    assert made_ahead(hs) == [room.room_id], "the same room, found by its marker"


async def test_a_homeserver_away_makes_none_and_says_why(engine):
    hs = homeserver()
    hs.unavailable_for.add("create_room")
    pool = ready_rooms(engine, hs)
    assert await pool.work_once() is False
    assert pool.problem and "not reachable" in pool.problem
    hs.unavailable_for.clear()
    await fill(pool)
    assert pool.problem is None and len(made_ahead(hs)) == 2


async def test_a_refused_creation_leaves_no_plan_behind_and_says_why(engine):
    hs = homeserver()
    hs.refuse["create_room"] = Refused("M_FORBIDDEN", "not allowed", 403)
    pool = ready_rooms(engine, hs)
    assert await pool.work_once() is False
    assert pool.problem and "refused" in pool.problem
    assert pool.status() == {"ok": True, "ready": 0, "wanted": 2, "problem": pool.problem}
    assert await rows(engine) == [], "nothing half-made is kept"
    del hs.refuse["create_room"]
    await fill(pool)
    assert len(made_ahead(hs)) == 2 and pool.problem is None


async def test_rooms_of_the_other_kind_are_left_when_the_setting_changes(engine):
    hs = homeserver()
    await fill(ready_rooms(engine, hs, encrypted=True))
    encrypted = made_ahead(hs)
    pool = ready_rooms(engine, hs, encrypted=False)
    await fill(pool)
    assert all(hs.rooms[room].members[hs.bot_user_id] == "leave" for room in encrypted)
    kept = await rows(engine)
    assert len(kept) == 2 and not any(r.encrypted for r in kept)
    assert not {r.room_id for r in kept} & set(encrypted)
    # Set to none: the rooms kept are left too.
    await fill(ready_rooms(engine, hs, wanted=0))
    assert await rows(engine) == []


@pytest.mark.parametrize("backend", BACKENDS)
async def test_two_takers_at_once_never_get_the_same_room(backend, tmp_path):
    async with fresh_database(backend, tmp_path) as url:
        engine = create_engine(url)
        try:
            await upgrade(engine)
            hs = homeserver()
            await fill(ready_rooms(engine, hs, wanted=3))

            async def take() -> str | None:
                async with engine.begin() as conn:
                    return await store.take(conn, encrypted=False)

            taken = await asyncio.gather(*(take() for _ in range(5)))
            rooms = [room for room in taken if room is not None]
            assert sorted(rooms) == sorted(made_ahead(hs)), "each room to exactly one taker"
            assert taken.count(None) == 2
        finally:
            await engine.dispose()


async def _case_begun_with_pool(engine, hs, pool):
    runner = step_engine(engine, hs, ready_rooms=pool)
    return runner, *await open_and_begin(engine, runner)


async def test_a_new_case_takes_its_room_made_ahead_in_the_transaction_that_opens_it(engine):
    hs = homeserver()
    pool = ready_rooms(engine, hs)
    await fill(pool)
    assert "direct_rooms" in hs.calls, "m.direct is read ahead too"
    before = {r.room_id for r in await rows(engine)}
    woken: list[bool] = []
    pool.on_taken = lambda: woken.append(True)
    hs.calls.clear()
    runner, case_id, begun = await _case_begun_with_pool(engine, hs, pool)

    # Committed with the case: the room is the case's and the step's, and no one else's.
    (left,) = {r.room_id for r in await rows(engine)}
    (room,) = before - {left}
    assert begun.step is not None and begun.step.progress["dm_room"] == room
    async with engine.connect() as conn:
        case = await cases.get(conn, case_id)
        (notify,) = [s for s in await cases.steps_of(conn, case_id) if s.step == "notify"]
    assert case is not None and case.dm_room_id == room
    assert notify.progress == {"dm_room": room, "dm_made_ahead": True}
    assert hs.calls == [], "nothing asked of the homeserver inside the transaction"

    await runner.run_case(case_id, begun)
    assert hs.calls[:2] in (["send", "invite"], ["invite", "send"]), "nothing before them"
    assert woken == [True], "another room is made once this one is handed over"
    done = await steps(engine, case_id)
    assert done["notify"].status == "done" and done["notify"].result["room_made_ahead"]
    (notice,) = notices(hs, "notify")
    assert notice in hs.rooms[room].events and hs.rooms[room].members[MEMBER] == "invite"
    assert hs.direct[MEMBER] == [room]


async def test_a_member_the_bot_has_a_dm_with_is_not_given_a_room_made_ahead(engine):
    hs = homeserver()
    hs.add_room("!theirs:localhost", {MEMBER: "join", hs.bot_user_id: "join"}, {})
    hs.direct[MEMBER] = ["!theirs:localhost"]
    pool = ready_rooms(engine, hs)
    await fill(pool)
    before = await rows(engine)
    runner, case_id, begun = await _case_begun_with_pool(engine, hs, pool)
    assert begun.step is not None and "dm_room" not in begun.step.progress
    await runner.run_case(case_id, begun)
    (notice,) = notices(hs, "notify")
    assert notice in hs.rooms["!theirs:localhost"].events, "the DM they share wins"
    assert await rows(engine) == before, "no room made ahead used up"


@pytest.mark.parametrize("crash_at", [1, -1, 2, -2, 3, -3])
async def test_killed_after_a_case_began_with_a_room_made_ahead_tells_them_once(engine, crash_at):
    """The room taken with the case, then the process killed at any of the notice's first
    calls, before or just after it acted: the resumed attempt uses that room, once."""
    hs = homeserver()
    pool = ready_rooms(engine, hs)
    await fill(pool)
    runner, case_id, begun = await _case_begun_with_pool(engine, hs, pool)
    assert begun.step is not None
    room = begun.step.progress["dm_room"]
    hs.crash_at = crash_at
    with contextlib.suppress(Crash):
        await runner.run_case(case_id, begun)
    hs.crash_at = None
    hs.txn_ids.clear()
    await step_engine(engine, hs, ready_rooms=pool).run_case(case_id)
    done = await steps(engine, case_id)
    assert all(done[s].status == "done" for s in REFERRAL_STEPS), done
    their_rooms = [r.room_id for r in hs.rooms.values() if r.members.get(MEMBER) == "invite"]
    assert their_rooms == [room], "the room taken with the case, and only that one"
    (notice,) = notices(hs, "notify")
    assert notice in hs.rooms[room].events
    assert len(await rows(engine)) == 1, "one room taken, however the attempt ended"
