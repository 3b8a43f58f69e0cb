"""Delivery bookkeeping and cases on both backends: nothing twice, one active case."""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import replace

import pytest
import sqlalchemy as sa

from bot.store import audit, cases, ingest
from bot.store.schema import seen_events
from tests.support.databases import record_events

PROVENANCE = audit.Provenance("test-policy", "0" * 64, b"5" * 64)
NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def engine(migrated_engine):
    return migrated_engine


def event(event_id: str) -> dict:
    return {
        "event_id": event_id,
        "room_id": "!r:localhost",
        "type": "m.reaction",
        "sender": "@mod:localhost",
        "content": {},
    }


async def record(engine, txn: str, ids: list[str], act: list[str]):
    return await record_events(engine, txn, ids, [(event(i), 1) for i in act], NOW)


async def test_retried_transaction_queues_nothing_twice(engine):
    first = await record(engine, "t1", ["$a", "$b"], ["$a"])
    again = await record(engine, "t1", ["$a", "$b"], ["$a"])
    assert not first.duplicate_transaction and (first.new_events, first.queued) == (2, 1)
    assert again.duplicate_transaction and (again.new_events, again.queued) == (0, 0)
    async with engine.connect() as conn:
        assert [item.event_id for item in await ingest.pending(conn)] == ["$a"]


async def test_reused_txn_id_with_new_events_is_processed(engine):
    await record(engine, "1", ["$a"], ["$a"])
    # Synapse restored from a backup starts its txn ids again, with new events.
    second = await record(engine, "1", ["$a", "$c"], ["$a", "$c"])
    assert not second.duplicate_transaction, "it brought something new: not a retry"
    assert (second.new_events, second.queued) == (1, 1)
    async with engine.connect() as conn:
        assert [item.event_id for item in await ingest.pending(conn)] == ["$a", "$c"]


async def test_event_carried_twice_in_one_transaction_is_queued_once(engine):
    twice = await record(engine, "1", ["$a", "$a", "$b"], ["$a", "$a"])
    assert (twice.new_events, twice.queued) == (2, 1)
    async with engine.connect() as conn:
        assert [item.event_id for item in await ingest.pending(conn)] == ["$a"]


async def test_the_recorder_tells_the_queue_numbers_of_one_lane_to_hand_it_over(engine):
    """What a lane is handed in memory is what the inbox holds: the new events of that lane
    only, each once, with its queue number; a retry hands over nothing."""
    from bot.store.ingest import TransactionRecorder

    recorder = TransactionRecorder(engine)
    try:
        to_act_on = [(event("$flag"), 0), (event("$join"), 1), (event("$flag"), 0)]
        to_act_on.append((event("$again"), 0))
        first = await recorder.record("t1", ["$flag", "$join", "$again"], to_act_on, NOW)
        retried = await recorder.record(
            "t1", ["$flag", "$join", "$again"], to_act_on, NOW, hand_over_lane=0
        )
        assert first.handed == {}, "none asked for"
        assert retried.handed == {} and retried.queued == 0
        fresh = [(event("$new"), 0), (event("$other"), 1), (event("$new"), 0)]
        second = await recorder.record("t2", ["$new", "$other"], fresh, NOW, hand_over_lane=0)
    finally:
        await recorder.close()
    assert second.queued == 2
    async with engine.connect() as conn:
        queued = {item.event_id: item.seq for item in await ingest.pending(conn, lane=0)}
    assert second.handed == {"$new": queued["$new"]}


async def test_event_seen_without_action_is_not_queued_when_delivered_again(engine):
    """Dedupe is by every id recorded, not only by the inbox: a chat event delivered
    again (a catch-up, a restored Synapse) is never queued late."""
    await record(engine, "1", ["$a"], [])
    later = await record(engine, "2", ["$a"], ["$a"])
    assert (later.new_events, later.queued) == (0, 0)
    async with engine.connect() as conn:
        assert await ingest.pending(conn) == []


async def test_event_redelivered_in_new_transaction_is_not_queued(engine):
    await record(engine, "1", ["$a"], ["$a"])
    later = await record(engine, "2", ["$a"], ["$a"])
    assert (later.new_events, later.queued) == (0, 0)
    async with engine.connect() as conn:
        assert len(await ingest.pending(conn)) == 1


async def test_finished_items_lose_their_content(engine):
    await record(engine, "1", ["$a"], ["$a"])
    async with engine.begin() as conn:
        (item,) = await ingest.pending(conn)
        await ingest.finish(conn, item.seq, NOW)
        assert await ingest.pending(conn) == []
        assert await ingest.backlog(conn) == 0


async def test_prune_forgets_old_ids_only(engine):
    await record(engine, "old", ["$old"], [])
    async with engine.begin() as conn:
        await ingest.prune(conn, NOW + dt.timedelta(seconds=1))
    again = await record(engine, "new", ["$old"], [])
    assert again.new_events == 1


@pytest.mark.parametrize("rows", [1, 2, 7, 40])
async def test_prune_cuts_exactly_at_the_window(engine, rows):
    """SQLite prunes by rowid bisection (no index on the time): every row older than
    the window goes, every newer one stays, whatever the count and wherever the cut."""
    for cut in range(rows + 1):
        # Each round later than the last, as time goes: its prune also takes the last's.
        start = NOW + dt.timedelta(days=cut)
        for minute in range(rows):
            at = start + dt.timedelta(minutes=minute)
            await record_events(engine, f"t{cut}-{minute}", [f"$e{cut}-{minute}"], [], at)
        async with engine.begin() as conn:
            await ingest.prune(conn, start + dt.timedelta(minutes=cut, seconds=-30))
            left = await conn.execute(sa.select(seen_events.c.event_id))
            kept = sorted(int(event_id.split("-")[1]) for (event_id,) in left)
        assert kept == list(range(cut, rows)), f"cut at {cut}"


def flag(
    member: str = "@member:localhost",
    flagger: str = "@mod:localhost",
    room: str = "!group:localhost",
) -> cases.NewFlag:
    return cases.NewFlag(
        room_id=room,
        member_id=member,
        flagger=flagger,
        method="reaction",
        flag_event_id=f"$flag-{flagger}",
        target_event_id="$msg",
        reason=None,
        flagged_at=NOW,
        received_at=NOW,
    )


async def open_case(engine, new_flag):
    async with engine.begin() as conn:
        return await cases.open_or_corroborate(
            conn, PROVENANCE, new_flag, steps=["notify", "remove"], dry_run=False, due_at=NOW
        )


async def test_second_flag_corroborates_the_active_case(engine):
    first = await open_case(engine, flag())
    second = await open_case(engine, flag(flagger="@mod2:localhost"))
    assert first.created and not second.created and first.case_id == second.case_id
    async with engine.connect() as conn:
        kinds = [e.kind for e in await audit.entries(conn, case_id=first.case_id)]
        steps = await cases.steps_of(conn, first.case_id)
    assert kinds == ["flagged", "corroborated"]
    assert [s.step for s in steps] == ["notify", "remove"]


async def test_two_flags_at_once_open_one_case_and_corroborate_it(engine):
    """Two moderators flag the same member at the same moment, in transactions of their
    own: one opens the case, the other corroborates it. (On SQLite the write lock runs
    them one after the other; on PostgreSQL the second insert waits for the first to
    commit, then inserts nothing.)"""
    opened = await asyncio.gather(
        open_case(engine, flag()), open_case(engine, flag(flagger="@mod2:localhost"))
    )
    assert sorted(o.created for o in opened) == [False, True]
    assert opened[0].case_id == opened[1].case_id
    async with engine.connect() as conn:
        kinds = [e.kind for e in await audit.entries(conn, case_id=opened[0].case_id)]
        assert len(await cases.listing(conn)) == 1
    assert sorted(kinds) == ["corroborated", "flagged"]


async def test_a_corroborating_flag_uses_up_no_case_number(engine):
    """Staff know cases by number: a second flag on a member's case must leave no gap
    before the next case (PostgreSQL takes a number before an insert meets its conflict)."""
    first = await open_case(engine, flag())
    await open_case(engine, flag(flagger="@mod2:localhost"))
    other = await open_case(engine, flag(member="@other:localhost"))
    assert other.created and other.case_id == first.case_id + 1


async def test_a_case_opened_is_told_as_a_read_of_it_would_return_it(engine):
    """The step engine begins a new case from what its opening wrote, without reading it
    back (bot/cases/engine.py): that must be what a read returns, whatever columns a case
    gains. Flagged with microseconds, as a real flag is."""
    at = NOW + dt.timedelta(microseconds=123456)
    opened = await open_case(engine, replace(flag(), flagged_at=at, received_at=at))
    async with engine.connect() as conn:
        case = await cases.get(conn, opened.case_id)
        steps = tuple(await cases.steps_of(conn, opened.case_id))
    assert opened.case == case
    assert opened.steps == steps


async def test_a_step_and_an_event_keep_their_times_in_utc(engine):
    """The statements built once (bot/store/cases.py, ingest.py) bind their times as
    every other write does: an aware UTC datetime in, the same out, on either backend."""
    opened = await open_case(engine, flag())
    later = NOW + dt.timedelta(minutes=5)
    async with engine.begin() as conn:
        await cases.start_steps(conn, opened.case_id, ["notify"], NOW)
        await cases.start_steps(conn, opened.case_id, ["notify"], later)  # the first stays
        await cases.finish_step(
            conn, opened.case_id, "notify", status="done", result={}, error=None, now=later
        )
        await cases.set_fields(conn, opened.case_id, next_attempt_at=later)
        with pytest.raises(ValueError):
            await cases.set_fields(conn, opened.case_id, no_such_field=1)
    await record(engine, "1", ["$a"], ["$a"])
    async with engine.begin() as conn:
        (item,) = await ingest.pending(conn)
        await ingest.finish(conn, item.seq, later)
    async with engine.connect() as conn:
        (notify,) = [s for s in await cases.steps_of(conn, opened.case_id) if s.step == "notify"]
        case = await cases.get(conn, opened.case_id)
        processed = (
            await conn.execute(
                sa.text("SELECT processed_at FROM inbox WHERE seq = :seq"), {"seq": item.seq}
            )
        ).scalar_one()
    assert (notify.status, notify.attempts) == ("done", 2)
    assert notify.started_at == NOW and notify.finished_at == later
    assert case is not None and case.next_attempt_at == later
    assert processed is not None


async def test_simultaneous_flags_open_one_case(engine):
    results = await asyncio.gather(
        *(open_case(engine, flag(flagger=f"@mod{n}:localhost")) for n in range(6))
    )
    assert len({r.case_id for r in results}) == 1
    assert sum(r.created for r in results) == 1


async def test_rejoin_ends_the_active_case(engine):
    first = await open_case(engine, flag())
    async with engine.begin() as conn:
        assert await cases.end_active(conn, "!group:localhost", "@member:localhost", NOW) == (
            first.case_id
        )
    second = await open_case(engine, flag())
    assert second.created and second.case_id != first.case_id


async def test_an_upgrade_moves_the_rooms_active_cases_to_the_replacement(engine):
    """Later flags and returns in the replacement find the case; the record keeps its room,
    and a room whose id merely begins the same way is not touched."""
    moved = await open_case(engine, flag())
    ended = await open_case(engine, flag("@gone:localhost"))
    lookalike = await open_case(engine, flag(room="!group:localhost.evil"))
    async with engine.begin() as conn:
        await cases.end_active(conn, "!group:localhost", "@gone:localhost", NOW)
        assert await cases.active_members(conn, "!group:localhost") == ["@member:localhost"]
        members = await cases.follow_upgrade(conn, "!group:localhost", "!new:localhost")
    assert members == ["@member:localhost"]
    async with engine.connect() as conn:
        case = await cases.active_case(conn, "!new:localhost", "@member:localhost")
        assert case is not None and case.id == moved.case_id
        assert case.room_id == "!group:localhost"
        assert await cases.active_case(conn, "!group:localhost", "@member:localhost") is None
        ended_case = await cases.get(conn, ended.case_id)
        assert ended_case is not None and ended_case.rejoined_at is not None
        watched = (await cases.rooms_of_cases(conn)).watched
    assert watched == {
        ("!new:localhost", "@member:localhost"),
        ("!group:localhost.evil", "@member:localhost"),
    }
    assert lookalike.created


async def test_checkin_counts_follow_the_checkin_not_the_case(engine):
    """/health's check-in figures: a check-in cancelled with its case is not counted; one
    staff kept through a withdrawal (the case closed) is, pending, overdue or unclaimed."""
    from bot.store.schema import case_steps
    from bot.store.schema import cases as cases_table

    checkin_steps = ["checkin", "checkin_reminder"]

    async def case_with_checkin(member: str, due: dt.datetime) -> int:
        async with engine.begin() as conn:
            opened = await cases.open_or_corroborate(
                conn, PROVENANCE, flag(member), steps=checkin_steps, dry_run=False, due_at=due
            )
        return opened.case_id

    async def update(case_id: int, **values) -> None:
        async with engine.begin() as conn:
            await conn.execute(
                cases_table.update().where(cases_table.c.id == case_id).values(**values)
            )

    async def step_done(case_id: int, step: str) -> None:
        async with engine.begin() as conn:
            await conn.execute(
                case_steps.update()
                .where(case_steps.c.case_id == case_id, case_steps.c.step == step)
                .values(status="done")
            )

    async def counts() -> cases.CheckinCounts:
        async with engine.connect() as conn:
            return await cases.checkin_counts(conn, NOW, dt.timedelta(minutes=5))

    later, earlier = NOW + dt.timedelta(hours=1), NOW - dt.timedelta(hours=1)
    await case_with_checkin("@open-pending:l", later)
    overdue = await case_with_checkin("@open-overdue:l", earlier)
    assert await counts() == cases.CheckinCounts(pending=1, overdue=1, unclaimed=0)
    # Closed and cancelled: no longer counted.
    cancelled = await case_with_checkin("@cancelled:l", earlier)
    await update(cancelled, state="closed", active_key=None)
    async with engine.begin() as conn:
        await cases.skip_pending(conn, cancelled, checkin_steps, "closed", NOW)
    # Withdrawn but kept: still counted.
    kept = await case_with_checkin("@kept:l", earlier)
    await update(kept, state="closed", active_key=None)
    assert await counts() == cases.CheckinCounts(pending=1, overdue=2, unclaimed=0)
    # Opened and unclaimed: the kept one counts, the open one counts, a cancelled one not.
    for case_id in (overdue, kept, cancelled):
        if case_id != cancelled:
            await step_done(case_id, "checkin")
        await update(case_id, checkin_opened_at=NOW)
    assert await counts() == cases.CheckinCounts(pending=1, overdue=0, unclaimed=2)


async def test_rooms_of_cases_is_what_the_intake_must_know_at_start(engine):
    """Active cases' members are watched; every DM, debrief and check-in room the bot
    opened is known, the closed cases' too (their members' messages still reach staff)."""
    from bot.store.schema import cases as cases_table

    active = (await open_case(engine, flag("@active:l"))).case_id
    closed = (await open_case(engine, flag("@closed:l"))).case_id
    quiet = (await open_case(engine, flag("@quiet:l"))).case_id
    async with engine.begin() as conn:
        for case_id, values in (
            (active, {"dm_room_id": "!dm-a:l", "checkin_room_id": "!ci-a:l"}),
            (closed, {"dm_room_id": "!dm-c:l", "debrief_room_id": "!db-c:l", "active_key": None}),
            (quiet, {"active_key": None}),
        ):
            await conn.execute(
                cases_table.update().where(cases_table.c.id == case_id).values(**values)
            )
        known = await cases.rooms_of_cases(conn)
    assert known == cases.RoomsOfCases(
        watched={("!group:localhost", "@active:l")},
        dms={"!dm-a:l", "!dm-c:l", "!db-c:l"},
        checkins={"!ci-a:l"},
    )


async def test_a_step_armed_again_keeps_what_it_did_when_asked_to(engine):
    """A corroborating flag arms `redact_flag` again: the flags it redacted already stay
    recorded (it redacts the new one, and asks about none of the old)."""
    opened = await open_case(engine, flag())
    async with engine.begin() as conn:
        await cases.save_progress(conn, opened.case_id, "notify", {"redacted": ["$a"]})
        await cases.rearm_step(conn, opened.case_id, "notify", 0, lambda was: was)
        await cases.rearm_step(conn, opened.case_id, "remove", 1, {"fresh": True})
        await cases.rearm_step(
            conn, opened.case_id, "added", 5, lambda was: was | {"count": was.get("count", 0) + 1}
        )
        steps = {s.step: s for s in await cases.steps_of(conn, opened.case_id)}
    assert steps["notify"].progress == {"redacted": ["$a"]} and steps["notify"].status == "pending"
    assert steps["remove"].progress == {"fresh": True}
    assert steps["added"].progress == {"count": 1} and steps["added"].status == "pending"


async def test_a_recording_cancelled_while_waiting_for_sqlites_lock_leaves_no_lock_held(tmp_path):
    """A BEGIN whose caller was cancelled still runs in the driver's thread: it must be
    rolled back after, or the recorder's connection keeps SQLite's write lock (every
    other writer stalls) and its next transaction fails."""
    import sqlite3

    from appservice.database import create_engine, upgrade

    path = tmp_path / "cancelled.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    await upgrade(engine)
    recorder = ingest.TransactionRecorder(engine)
    other = sqlite3.connect(path, isolation_level=None)  # a writer in another process
    try:
        await recorder.record("t0", ["$a"], [], NOW)  # the recorder has its connection
        other.execute("BEGIN IMMEDIATE")
        waiting = asyncio.create_task(recorder.record("t1", ["$b"], [], NOW))
        await asyncio.sleep(0.3)  # its BEGIN now waits for the lock, in the driver's thread
        waiting.cancel()
        await asyncio.sleep(0.1)
        other.execute("COMMIT")  # the cancelled BEGIN goes through now
        with pytest.raises(asyncio.CancelledError):
            await waiting
        recorded = await recorder.record("t2", ["$c"], [], NOW)
        assert recorded.new_events == 1, "the next transaction records as usual"
        other.execute("BEGIN IMMEDIATE")  # and no lock is left behind for anyone
        other.execute("COMMIT")
    finally:
        other.close()
        await recorder.close()
        await engine.dispose()


async def test_an_intake_connection_closed_under_it_is_an_outage_then_reopened(tmp_path):
    """Not "this data cannot be stored" (which would skip the events and answer 200)."""
    from appservice.database import create_engine, upgrade

    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'closed.db'}")
    await upgrade(engine)
    recorder = ingest.TransactionRecorder(engine)
    try:
        await recorder.record("t0", ["$a"], [], NOW)
        await recorder._thread.run(recorder._sqlite.close)  # on the thread that opened it
        with pytest.raises(ingest.WriteUnavailable):
            await recorder.record("t1", ["$b"], [], NOW)
        assert (await recorder.record("t1", ["$b"], [], NOW)).new_events == 1
    finally:
        await recorder.close()
        await engine.dispose()


async def test_a_community_reads_its_own_cases_and_no_one_elses(engine):
    """Two communities' cases in one database: each reads as if the other's did not
    exist (its number, its alert, its check-in notice, its count, its pages, its
    entries), while a read with no community sees every case."""
    from dataclasses import replace as with_

    from bot.cases import records

    ours = await open_case(engine, flag(room="!ours:localhost"))
    theirs = await open_case(engine, with_(flag(room="!theirs:localhost"), community="wales"))
    async with engine.begin() as conn:
        await cases.set_fields(
            conn, theirs.case_id, alert_event_id="$alert", checkin_notice_event_id="$notice"
        )
        for community in ("wales", "default"):  # a refusal told to each community's staff
            await audit.append(
                conn, PROVENANCE, "refused", facts={"code": "x", "community": community}, at=NOW
            )
        await audit.append(conn, PROVENANCE, "refused", facts={"code": "older"}, at=NOW)
    async with engine.connect() as conn:
        assert (await cases.get(conn, theirs.case_id)).community == "wales"
        assert await cases.get(conn, theirs.case_id, community="default") is None
        assert (await cases.get(conn, ours.case_id, community="default")).id == ours.case_id
        assert await cases.by_alert(conn, "$alert", community="default") is None
        assert (await cases.by_alert(conn, "$alert", community="wales")).id == theirs.case_id
        assert await cases.by_checkin_notice(conn, "$notice", community="default") is None
        assert await cases.count(conn, "open", community="default") == 1
        assert await cases.count(conn, "open") == 2
        listed = await cases.page(conn, "all", offset=0, limit=10, community="wales")
        assert [c.id for c in listed] == [theirs.case_id]
        assert [c.id for c in await cases.listing(conn, community="nobody")] == []
        entries = await audit.entries(conn, community="default")
        assert {e.case_id for e in entries} == {ours.case_id}
        welsh = await records.export(conn, community="wales")
        everyone = await records.export(conn)
    assert [c["number"] for c in welsh["cases"]] == [theirs.case_id]
    assert welsh["cases"][0]["community"] == "wales"
    assert [r["facts"]["code"] for r in welsh["refusals"]] == ["x"]
    assert len(everyone["cases"]) == 2 and len(everyone["refusals"]) == 3
    # Recorded before communities: the one community's.
    async with engine.connect() as conn:
        default = await records.export(conn, community="default")
    assert sorted(r["facts"]["code"] for r in default["refusals"]) == ["older", "x"]


async def test_a_purged_cases_room_the_bot_stayed_in_is_still_its_communitys(engine):
    """A purged case's DM the bot could not leave has no case to name its community: the
    room keeps it, so a former member who writes there is answered in that community's
    words and its staff are told (bot/staff/relay.py); a room of a case not purged is its
    case's, and a room of no case is no one's."""
    from dataclasses import replace as with_

    from bot.rooms.directory import RoomDirectory
    from bot.rooms.staff_room import StaffRoom
    from bot.store import retention

    welsh = await open_case(engine, with_(flag(room="!cymru:localhost"), community="wales"))
    english = await open_case(engine, flag(room="!england:localhost", member="@other:localhost"))
    async with engine.begin() as conn:
        await cases.set_fields(conn, welsh.case_id, dm_room_id="!dm-cymru:localhost")
        await cases.set_fields(conn, english.case_id, dm_room_id="!dm-england:localhost")
        await retention.erase(conn, welsh.case_id, NOW, stayed=["!dm-cymru:localhost"])
    rooms = RoomDirectory(StaffRoom("!staff:localhost"))
    for dm in ("!dm-cymru:localhost", "!dm-england:localhost", "!dm-nobody:localhost"):
        rooms.add_dm(dm)
    async with engine.connect() as conn:
        assert (await cases.get(conn, welsh.case_id)).dm_room_id is None, "erased"
        assert await retention.is_former_room(conn, "!dm-cymru:localhost")
    assert await rooms.community_of_any("!dm-cymru:localhost", engine.connect) == "wales"
    assert await rooms.community_of_any("!dm-england:localhost", engine.connect) == "default"
    assert await rooms.community_of_any("!dm-nobody:localhost", engine.connect) is None


async def test_refusal_windows_are_summarised_to_their_own_communitys_staff(engine):
    """One table of refusal windows for every community: each community's summary reads
    its own windows alone (who was refused where is not another community's business)."""
    from bot.store import refusal_reports

    every = dt.timedelta(minutes=5)
    async with engine.begin() as conn:
        for _ in range(3):  # the first told at once, two more counted
            await refusal_reports.note(
                conn,
                kind="flag",
                actor="@someone:localhost",
                room_id="!cymru:localhost",
                now=NOW,
                every=every,
                community="wales",
            )
    later = NOW + 2 * every
    async with engine.connect() as conn:
        assert await refusal_reports.due(conn, later, every, "default") == []
        (pending,) = await refusal_reports.due(conn, later, every, "wales")
    assert (pending.room_id, pending.suppressed) == ("!cymru:localhost", 2)
