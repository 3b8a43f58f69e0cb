"""The case workflow resumes after a crash at any call, and every effect happens once.

A fake homeserver "kills the process" at the N-th call (before or just after
the homeserver acted); a fresh workflow on the same database then finishes the
case, after Synapse "restarted" and forgot its transaction ids. For every N:
one DM room, one notice, one kick (after the notice), one alert.
"""

from __future__ import annotations

import contextlib
import datetime as dt

import pytest

from appservice.database import create_engine, upgrade
from bot.audit_chain import verify_chain
from bot.context import PolicyContext
from bot.ports import MESSAGE_MARKER_KEY, Refused
from bot.referral import CASE_STEPS
from bot.settings import CheckinSettings, MessageTemplates, PolicySettings, default_resources
from bot.store import audit, cases
from bot.workflow import CaseWorkflow
from tests.support.fake_homeserver import Crash, FakeHomeserver

GROUP, STAFF = "!group:localhost", "!staff:localhost"
MEMBER, MOD = "@member:localhost", "@mod:localhost"
NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)


def context(**policy) -> PolicyContext:
    ctx = PolicyContext(
        policy=PolicySettings(staff_room=STAFF, **policy),
        checkin=CheckinSettings(after=dt.timedelta(hours=1)),
        messages=MessageTemplates(),
        resources=default_resources(),
        bot_user_id="@safeguard:localhost",
        provenance=audit.Provenance("test", "0" * 64),
        may_invite=lambda user: True,
        staff_room_id=STAFF,
    )
    ctx.watch(STAFF)
    return ctx


def homeserver() -> FakeHomeserver:
    hs = FakeHomeserver()
    hs.add_room(
        GROUP, {MEMBER: "join", MOD: "join", hs.bot_user_id: "join"}, {MOD: 50, hs.bot_user_id: 100}
    )
    hs.add_room(STAFF, {hs.bot_user_id: "join"}, {})
    return hs


@pytest.fixture
async def engine(tmp_path):
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'cases.db'}")
    await upgrade(engine)
    yield engine
    await engine.dispose()


async def new_case(engine, dry_run: bool = False) -> int:
    flag = cases.NewFlag(GROUP, MEMBER, MOD, "reaction", "$flag", "$msg", None, NOW, NOW)
    async with engine.begin() as conn:
        opened = await cases.open_or_corroborate(
            conn,
            audit.Provenance("test", "0" * 64),
            flag,
            steps=CASE_STEPS,
            dry_run=dry_run,
            due_at=NOW + dt.timedelta(hours=1),
        )
    return opened.case_id


def notices(hs: FakeHomeserver, step: str) -> list[dict]:
    return [
        event
        for room in hs.rooms.values()
        for event in room.events
        if event.get("content", {}).get(MESSAGE_MARKER_KEY, {}).get("step") == step
    ]


async def steps(engine, case_id: int) -> dict[str, cases.Step]:
    async with engine.connect() as conn:
        return {s.step: s for s in await cases.steps_of(conn, case_id)}


async def test_clean_run_order_and_record(engine):
    hs = homeserver()
    case_id = await new_case(engine)
    await CaseWorkflow(engine, hs, context()).run_case(case_id)
    done = await steps(engine, case_id)
    assert [done[s].status for s in CASE_STEPS[:-1]] == ["done"] * 5
    assert done["checkin"].status == "pending"  # waits for its due time
    (notice,) = notices(hs, "notify")
    assert hs.kicks == [(GROUP, MEMBER)]
    kick_event = next(e for e in hs.rooms[GROUP].events if e["type"] == "m.room.member")
    assert notice["order"] < kick_event["order"], "the member is told before removal"
    (alert,) = notices(hs, "alert")
    assert alert["content"]["body"].startswith(f"Case #{case_id}")
    assert len(notices(hs, "room_notice")) == 1
    async with engine.connect() as conn:
        kinds = [e.kind for e in await audit.entries(conn, case_id=case_id)]
    assert kinds == ["flagged"] + [f"step.{s}" for s in CASE_STEPS[:-1]]


def _crash_points() -> list[int]:
    # Enough to cover every call of a clean run, before (N) and just after (-N) it acts.
    return [*range(1, 20), *range(-1, -20, -1)]


@pytest.mark.parametrize("crash_at", _crash_points())
async def test_crash_anywhere_then_resume_does_everything_once(engine, crash_at):
    hs = homeserver()
    case_id = await new_case(engine)
    hs.crash_at = crash_at
    with contextlib.suppress(Crash):
        await CaseWorkflow(engine, hs, context()).run_case(case_id)
    hs.crash_at = None
    hs.txn_ids.clear()  # Synapse restarted too: its txn-id dedupe cannot save us
    await CaseWorkflow(engine, hs, context()).run_case(case_id)

    done = await steps(engine, case_id)
    assert all(done[s].status == "done" for s in CASE_STEPS[:-1]), done
    dm_rooms = [r for r in hs.rooms.values() if r.members.get(MEMBER) == "invite"]
    assert len(dm_rooms) == 1, "exactly one DM room"
    assert len(notices(hs, "notify")) == 1
    assert hs.kicks == [(GROUP, MEMBER)]
    assert len(notices(hs, "alert")) == 1
    assert len(notices(hs, "room_notice")) == 1
    async with engine.connect() as conn:
        rows = [row async for row in audit.chain_rows(conn)]
    assert verify_chain(rows).ok


async def test_undeliverable_notice_still_removes_and_says_so_first(engine):
    hs = homeserver()
    hs.refuse["create_room"] = Refused("M_FORBIDDEN", "user is deactivated", 403)
    case_id = await new_case(engine)
    await CaseWorkflow(engine, hs, context()).run_case(case_id)
    done = await steps(engine, case_id)
    assert done["notify"].status == "failed" and done["remove"].status == "done"
    kick = next(e for e in hs.rooms[GROUP].events if e["type"] == "m.room.member")
    assert "999" in kick["reason"]
    (alert,) = notices(hs, "alert")
    assert "NOT" in alert["content"]["body"].splitlines()[0]


async def test_member_already_gone_is_recorded_not_retried(engine):
    hs = homeserver()
    hs.rooms[GROUP].members[MEMBER] = "leave"
    case_id = await new_case(engine)
    await CaseWorkflow(engine, hs, context()).run_case(case_id)
    done = await steps(engine, case_id)
    assert done["remove"].status == "done" and done["remove"].result["already_gone"] is True
    assert hs.kicks == [] and done["room_notice"].status == "skipped"


async def test_refused_kick_is_a_recorded_failure_and_the_case_goes_on(engine):
    hs = homeserver()
    hs.refuse["kick"] = Refused("M_FORBIDDEN", "not enough power", 403)
    case_id = await new_case(engine)
    await CaseWorkflow(engine, hs, context()).run_case(case_id)
    done = await steps(engine, case_id)
    assert done["remove"].status == "failed" and "not enough power" in done["remove"].error
    assert done["alert"].status == "done"


async def test_dry_run_alerts_but_touches_no_one(engine):
    hs = homeserver()
    case_id = await new_case(engine, dry_run=True)
    await CaseWorkflow(engine, hs, context(dry_run=True)).run_case(case_id)
    done = await steps(engine, case_id)
    assert done["notify"].status == done["remove"].status == "skipped"
    assert hs.kicks == [] and notices(hs, "notify") == []
    assert len(notices(hs, "alert")) == 1


async def test_existing_dm_is_reused(engine):
    hs = homeserver()
    hs.add_room("!olddm:localhost", {MEMBER: "join", hs.bot_user_id: "join"}, {})
    hs.direct[MEMBER] = ["!olddm:localhost"]
    case_id = await new_case(engine)
    await CaseWorkflow(engine, hs, context()).run_case(case_id)
    (notice,) = notices(hs, "notify")
    assert notice in hs.rooms["!olddm:localhost"].events
