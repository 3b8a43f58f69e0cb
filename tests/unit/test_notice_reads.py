"""Whether the member has read their notice: which receipts count, what is recorded, and
the one reply staff get when it stays unread."""

from __future__ import annotations

import datetime as dt
import json
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from appservice.sync import _filter, receipts_of
from bot.core.ports import Receipt
from bot.intake.notice_reads import NoticeReads, after_notice, may_count
from bot.staff.replies import case_timeline
from bot.steps.unread_notice import unread_deadline
from bot.store import audit, cases
from bot.store.notices import Unread
from bot.store.schema import case_steps
from tests.support.policy import (
    MEMBER,
    PROVENANCE,
    STAFF,
    deployment,
    homeserver,
    new_case,
    notices,
    step_engine,
    steps,
)

DM, NOTICE = "!dm:localhost", "$notice"
AT = dt.datetime(2026, 12, 6, 14, 2, 30, tzinfo=dt.UTC)
UNREAD = Unread(7, DM, MEMBER, NOTICE)


def receipt(**changes) -> Receipt:
    values = {
        "room_id": DM,
        "event_id": NOTICE,
        "user_id": MEMBER,
        "receipt_type": "m.read",
        "at": AT,
        "thread_id": None,
    } | changes
    return Receipt(**values)


# ---- the rules ------------------------------------------------------------------------


def test_the_members_own_public_receipt_on_the_main_timeline_of_their_dm_counts():
    assert may_count(receipt(), UNREAD)
    assert may_count(receipt(thread_id="main"), UNREAD)


@pytest.mark.parametrize(
    "changes",
    [
        {"receipt_type": "m.read.private"},  # never reaches the bot anyway; never counted
        {"receipt_type": "m.fully_read"},
        {"user_id": "@someone-else:localhost"},
        {"room_id": "!group:localhost"},
        {"thread_id": "$some-thread-root"},
    ],
)
def test_no_other_receipt_counts(changes):
    assert not may_count(receipt(**changes), UNREAD)


def test_an_event_counts_when_sent_no_earlier_than_the_notice():
    notice = {"origin_server_ts": 1000}
    assert after_notice({"origin_server_ts": 1000}, notice)
    assert after_notice({"origin_server_ts": 2000}, notice)
    assert not after_notice({"origin_server_ts": 999}, notice)
    assert not after_notice({}, notice)


def test_unread_deadline_is_after_the_notice_was_sent_and_none_when_off_or_unsent():
    sent = cases.Step(1, "notify", 0, "done", 1, AT, AT, {}, {}, None)
    assert unread_deadline(sent, dt.timedelta(minutes=10)) == AT + dt.timedelta(minutes=10)
    assert unread_deadline(sent, None) is None
    failed = cases.Step(1, "notify", 0, "failed", 1, AT, AT, {}, {}, "M_FORBIDDEN")
    assert unread_deadline(failed, dt.timedelta(minutes=10)) is None


@pytest.mark.parametrize("off", ["0", "off", 0, False])
def test_the_reply_can_be_switched_off(off):
    assert deployment(unread_notice_after=off).policy.unread_notice_after is None
    assert deployment().policy.unread_notice_after == dt.timedelta(minutes=10)


# ---- the sync: receipts asked of the named DMs only -------------------------------------


def test_the_filter_asks_receipts_of_the_named_rooms_only_else_no_ephemeral_at_all():
    assert json.loads(_filter(50))["room"]["ephemeral"] == {"not_types": ["*"]}
    ephemeral = json.loads(_filter(50, receipts_in={"!b:x", "!a:x"}))["room"]["ephemeral"]
    assert ephemeral == {"types": ["m.receipt"], "rooms": ["!a:x", "!b:x"]}


def test_receipts_are_read_from_the_rooms_ephemeral_events():
    ephemeral = {
        "events": [
            {"type": "m.typing", "content": {"user_ids": [MEMBER]}},
            {
                "type": "m.receipt",
                "content": {
                    NOTICE: {
                        "m.read": {MEMBER: {"ts": int(AT.timestamp() * 1000), "thread_id": "main"}},
                        "m.read.private": {"@bot:x": {"ts": 5}},
                    },
                    "$later": {"m.read": {"@other:x": {"ts": "not a number"}}},
                },
            },
            "junk",
        ]
    }
    found = receipts_of(DM, ephemeral)
    assert found == [
        Receipt(DM, NOTICE, MEMBER, "m.read", AT, "main"),
        Receipt(DM, NOTICE, "@bot:x", "m.read.private", dt.datetime.fromtimestamp(0.005, dt.UTC)),
        Receipt(DM, "$later", "@other:x", "m.read", None),
    ]
    assert receipts_of(DM, None) == [] and receipts_of(DM, {"events": {}}) == []


# ---- recorded once, audited, shown -------------------------------------------------------


async def notified_case(engine, hs, **policy):
    """A case whose notice has been sent (and the alert posted)."""
    case_id = await new_case(engine)
    await step_engine(engine, hs, deployment(**policy)).run_case(case_id)
    async with engine.connect() as conn:
        case = await cases.get(conn, case_id)
    assert case is not None and case.notice_event_id and case.dm_room_id
    return case


async def case_of(engine, case_id: int) -> cases.Case:
    async with engine.connect() as conn:
        case = await cases.get(conn, case_id)
    assert case is not None
    return case


async def test_a_receipt_on_the_notice_is_recorded_once_audited_and_shown(engine):
    hs = homeserver()
    case = await notified_case(engine, hs)
    reads = NoticeReads(engine, hs, PROVENANCE)
    assert await reads.watched() == [case.dm_room_id]
    timeline = case_timeline(case, [])
    assert "has not opened the notice yet" in timeline
    on_notice = receipt(room_id=case.dm_room_id, event_id=case.notice_event_id)
    assert await reads.take([on_notice, on_notice]) == 1
    assert await reads.take([on_notice]) == 0
    assert await reads.watched() == [], "a read notice's DM is not asked about again"
    case = await case_of(engine, case.id)
    assert case.notice_read_at == AT
    async with engine.connect() as conn:
        entries = [e for e in await audit.entries(conn, case_id=case.id) if e.kind == "notice_read"]
    (entry,) = entries
    assert entry.facts == {"read_at": AT.isoformat(), "receipt_on": "notice"}
    shown = case_timeline(case, entries, zone=ZoneInfo("America/Toronto"))
    assert "(times: America/Toronto)" in shown, "the zone is named once"
    assert "The member read the notice at Sun 06 Dec 2026, 09:02." in shown
    assert "member read the notice — read at Sun 06 Dec 2026, 09:02" in shown


async def test_a_receipt_on_a_later_event_counts_and_one_on_an_earlier_one_does_not(engine):
    hs = homeserver()
    case = await notified_case(engine, hs)
    room = hs.rooms[case.dm_room_id]
    (notice,) = [e for e in room.events if e["event_id"] == case.notice_event_id]
    notice["origin_server_ts"] = 2000
    room.events += [
        {"event_id": "$before", "type": "m.room.message", "origin_server_ts": 1000},
        {"event_id": "$after", "type": "m.room.message", "origin_server_ts": 3000},
    ]
    reads = NoticeReads(engine, hs, PROVENANCE)
    await reads.watched()
    assert await reads.take([receipt(room_id=case.dm_room_id, event_id="$before")]) == 0
    assert await reads.take([receipt(room_id=case.dm_room_id, event_id="$missing")]) == 0
    assert (await case_of(engine, case.id)).notice_read_at is None
    assert await reads.take([receipt(room_id=case.dm_room_id, event_id="$after")]) == 1
    assert (await case_of(engine, case.id)).notice_read_at == AT


async def test_someone_elses_or_a_private_receipt_records_nothing(engine):
    hs = homeserver()
    case = await notified_case(engine, hs)
    reads = NoticeReads(engine, hs, PROVENANCE)
    await reads.watched()
    on = {"room_id": case.dm_room_id, "event_id": case.notice_event_id}
    assert await reads.take([receipt(**on, user_id="@staffer:localhost")]) == 0
    assert await reads.take([receipt(**on, receipt_type="m.read.private")]) == 0
    assert await reads.take([receipt(**on, thread_id="$thread")]) == 0
    assert (await case_of(engine, case.id)).notice_read_at is None


async def test_a_closed_cases_dm_is_not_watched(engine):
    hs = homeserver()
    case = await notified_case(engine, hs)
    async with engine.begin() as conn:
        await cases.set_fields(conn, case.id, state="closed")
    assert await NoticeReads(engine, hs, PROVENANCE).watched() == []


# ---- the reply to staff when it stays unread ---------------------------------------------


async def notice_sent_ago(engine, case_id: int, ago: dt.timedelta) -> None:
    """As if the notice went `ago` (the engine's timer would then bring the step due)."""
    async with engine.begin() as conn:
        await conn.execute(
            sa.update(case_steps)
            .where(case_steps.c.case_id == case_id, case_steps.c.step == "notify")
            .values(finished_at=dt.datetime.now(dt.UTC) - ago)
        )


async def test_unread_after_the_setting_staff_get_one_reply_to_the_alert(engine):
    hs = homeserver()
    case = await notified_case(engine, hs)
    assert (await steps(engine, case.id))["unread_notice"].status == "pending"
    assert notices(hs, "unread_notice") == [], "not before its time"
    runner = step_engine(engine, hs)
    await notice_sent_ago(engine, case.id, dt.timedelta(minutes=11))
    await runner.run_case(case.id)
    await runner.run_case(case.id)
    (reply,) = notices(hs, "unread_notice")
    assert reply in hs.rooms[STAFF].events
    content = reply["content"]
    assert content["m.relates_to"]["m.in_reply_to"]["event_id"] == case.alert_event_id
    assert content["body"].startswith(f"Case #{case.id}: ")
    assert "has not opened the message yet" in content["body"]
    assert ", 11 minutes ago." in content["body"], "how long it has been, in words"
    assert (await steps(engine, case.id))["unread_notice"].status == "done"


@pytest.mark.parametrize("how", ["read", "closed", "off"])
async def test_no_reply_when_read_in_time_closed_or_off(engine, how):
    hs = homeserver()
    policy = {"unread_notice_after": "off"} if how == "off" else {}
    case = await notified_case(engine, hs, **policy)
    async with engine.begin() as conn:
        if how == "read":
            await cases.set_fields(conn, case.id, notice_read_at=AT)
        if how == "closed":
            await cases.set_fields(conn, case.id, state="closed", outcome="withdrawn: wrong")
    await notice_sent_ago(engine, case.id, dt.timedelta(minutes=11))
    await step_engine(engine, hs, deployment(**policy)).run_case(case.id)
    assert notices(hs, "unread_notice") == []
    step = (await steps(engine, case.id))["unread_notice"]
    assert step.status == "skipped"
    if how == "read":
        assert step.result == {"why": "the member read the notice", "read_at": AT.isoformat()}
