"""Retention against a real Synapse, on SQLite and PostgreSQL: a closed case past its time
leaves nothing personal behind, in the database or on the homeserver, exactly once,
whatever stops it half way — and a member who writes afterwards is told where to get help.

Time is injected: `purge(..., now=)` is told it is years later; nothing sleeps that long.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from appservice.config import load_config
from appservice.database import create_engine
from appservice.digest_key import load_digest_key
from appservice.registration import load_registration
from bot.cases.retention import purge
from bot.config.settings import DEFAULT_RETENTION_DAYS
from bot.store import audit
from bot.store.schema import audit_entries, case_steps, cases, outbox, room_positions, staff_posts
from tests.support.checkins import flag_member
from tests.support.databases import BACKENDS, fresh_database
from tests.support.matrix_user import MatrixUser
from tests.support.processes import run_service_process
from tests.support.proxy import HoldingProxy
from tests.support.scene import (
    BOT,
    Scene,
    build_scene,
    export_json,
    open_group_room,
    recorded,
    running_service,
    safeguard_cli,
    service_config,
    until,
)

pytestmark = pytest.mark.synapse

FAREWELL = "this chat is closing now"


@pytest.fixture(params=BACKENDS)
async def database(request, tmp_path):
    """The service's database: SQLite always, PostgreSQL when reachable."""
    async with fresh_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def sqlite_database(tmp_path):
    """For the fault tests: what they prove (a kill, an outage) is the homeserver's side
    and the step engine's, the same on both backends; the purge's own SQL runs on both
    in test_a_closed_case_past_retention_is_purged_end_to_end and test_audit_log.py."""
    async with fresh_database("sqlite", tmp_path) as url:
        yield url


def config_for(scene: Scene, url: str, *, homeserver_url: str | None = None) -> Path:
    """Check-in one second after the flag; retention at its default (six years)."""
    return service_config(
        scene.synapse,
        scene.directory,
        database_url=url,
        staff_room=scene.staff_room,
        staff=[scene.staff.user_id],
        policy={"ready_dm_rooms": 0},
        checkin={"after": "1s", "room_name": "Checking in"},
        homeserver_url=homeserver_url,
    )


async def the_case(config: Path) -> dict[str, Any]:
    (case,) = (await export_json(config))["cases"]
    return case


async def closed_case(scene: Scene, config: Path) -> dict[str, Any]:
    """Flagged, told, removed, alerted, debriefed, checked in on; the member replied in
    their DM; then closed by staff. Returns the case as exported."""
    await open_group_room(scene)
    await flag_member(scene)
    for kind in ("step.checkin", "step.checkin_notice", "step.debrief"):
        await until(lambda kind=kind: recorded(config, kind), within=60, what=kind)
    case = await the_case(config)
    await scene.member.join(case["dm_room"])
    await scene.member.send_text(case["dm_room"], "thanks, I'm ok now")
    await until(
        lambda: scene.staff_matching(lambda body: "replied to the notice" in body),
        what="the relay",
    )
    await scene.staff.send_text(scene.staff_room, f"!case {case['number']} close resolved")
    await until(
        lambda: scene.staff_matching(lambda body: f"Case #{case['number']} closed" in body),
        what="the close reply",
    )
    return await the_case(config)


async def hand_to_purge(config: Path, *, years_later: bool = True) -> Any:
    """What the hourly housekeeping does, told it is now just past the retention period
    (or just inside it)."""
    loaded = load_config(config)
    days = loaded.retention_days
    later = dt.timedelta(days=days + 1) if years_later else dt.timedelta(days=days - 1)
    provenance = audit.Provenance(
        loaded.policy.policy_version,
        loaded.config_hash,
        load_digest_key(loaded, create=False) or b"",
    )
    engine = create_engine(loaded.database_url)
    try:
        return await purge(engine, provenance, days, now=dt.datetime.now(dt.UTC) + later)
    finally:
        await engine.dispose()


async def purged(config: Path) -> bool:
    """Erased, and the purge step's outcome recorded (in a transaction of its own, just
    after the erasure's)."""
    case = await the_case(config)
    return case["purged_at"] is not None and case["steps"].get("purge") == "done"


async def as_the_bot(scene: Scene, config: Path, path: str) -> Any:
    """A read as the bot itself (with the appservice's token)."""
    token = load_registration(load_config(config).registration_path).as_token
    bot = MatrixUser(scene.synapse.url, BOT, token)
    try:
        return await bot.request("GET", path, user_id=BOT)
    finally:
        await bot.close()


async def bot_direct(scene: Scene, config: Path) -> dict[str, list[str]]:
    """The bot's m.direct as the homeserver holds it."""
    return await as_the_bot(scene, config, f"/_matrix/client/v3/user/{BOT}/account_data/m.direct")


async def bot_rooms(scene: Scene, config: Path) -> list[str]:
    return (await as_the_bot(scene, config, "/_matrix/client/v3/joined_rooms"))["joined_rooms"]


async def staff_room_events(scene: Scene) -> list[dict[str, Any]]:
    return await scene.staff.messages(scene.staff_room, limit=300)


async def farewells(scene: Scene, room: str) -> list[str]:
    return [
        event["content"]["body"]
        for event in await scene.bot_messages(scene.member, room)
        if FAREWELL in event["content"].get("body", "")
    ]


async def assert_nothing_personal_left(
    scene: Scene, config: Path, case: dict[str, Any], case_alerts: list[str]
) -> None:
    """The case, as the database and the homeserver hold it after its purge."""
    number, dm, checkin = case["number"], case["dm_room"], case["checkin_room"]
    engine = create_engine(load_config(config).database_url)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(sa.select(cases).where(cases.c.id == number))).one()
            personal = (
                await conn.execute(
                    sa.select(audit_entries.c.personal).where(audit_entries.c.case_id == number)
                )
            ).scalars()
            steps = (
                await conn.execute(
                    sa.select(case_steps.c.progress, case_steps.c.result).where(
                        case_steps.c.case_id == number, case_steps.c.step != "purge"
                    )
                )
            ).all()
            posts = (
                await conn.execute(
                    sa.select(sa.func.count()).where(staff_posts.c.case_id == number)
                )
            ).scalar_one()
            messages = (
                await conn.execute(sa.select(sa.func.count()).where(outbox.c.case_id == number))
            ).scalar_one()
            positions = (
                await conn.execute(
                    sa.select(room_positions.c.room_id).where(
                        room_positions.c.room_id.in_([dm, checkin])
                    )
                )
            ).all()
    finally:
        await engine.dispose()
    for column in ("room_id", "member_id", "active_key", "dm_room_id", "checkin_room_id"):
        assert getattr(row, column) is None, column
    assert row.alert_event_id is None and row.debrief_room_id is None
    assert not any(personal)  # erased (the tombstone has none)
    assert all(progress is None and result is None for progress, result in steps)
    assert (posts, messages, positions) == (0, 0, [])
    # The homeserver: the bot's own staff-room messages of the case redacted...
    events = {e["event_id"]: e for e in await staff_room_events(scene)}
    for event_id in case_alerts:
        assert not events[event_id].get("content"), "redacted"
    left = [
        e["content"].get("body", "")
        for e in events.values()
        if e.get("sender") == BOT and e["type"] == "m.room.message"
    ]
    assert not [body for body in left if f"#{number}" in body or scene.member.user_id in body]
    # ... its rooms no longer DMs, and left, the member told where to get help now.
    direct = await bot_direct(scene, config)
    assert scene.member.user_id not in direct and scene.moderator.user_id not in direct
    assert not {dm, checkin} & set(await bot_rooms(scene, config)), "the bot left them"
    (farewell,) = await farewells(scene, dm)
    assert "Samaritans" in farewell and "999" in farewell and f"#{number}" not in farewell
    code, out, _ = await safeguard_cli("audit", "verify", "-c", str(config))
    assert code == 0 and "audit log OK" in out, out


async def case_messages(scene: Scene, number: int) -> list[str]:
    """The bot's staff-room messages that name the case."""
    return [
        e["event_id"]
        for e in await scene.bot_messages(scene.staff, scene.staff_room)
        if f"#{number}" in e["content"].get("body", "")
    ]


async def test_a_closed_case_past_retention_is_purged_end_to_end(synapse, tmp_path, database):
    scene = await build_scene(synapse, tmp_path)
    config = config_for(scene, database)
    async with running_service(config) as service:
        case = await closed_case(scene, config)
        number = case["number"]
        named = await case_messages(scene, number)
        assert len(named) >= 4  # the alert, the check-in notice, the relay, the close reply
        assert any({case["dm_room"]} & set(r) for r in (await bot_direct(scene, config)).values())
        # Inside the retention period (six years by default): untouched.
        assert load_config(config).retention_days == DEFAULT_RETENTION_DAYS
        inside = await hand_to_purge(config, years_later=False)
        assert (inside.cases, inside.scheduled) == (0, ())
        assert (await the_case(config))["member"] == scene.member.user_id
        # Past it: handed to the purge step, which the engine runs now.
        handed = await hand_to_purge(config)
        assert handed.scheduled == (number,) and handed.cases == 0
        service.steps.wake()
        await until(lambda: purged(config), within=60, what="the purge")
        gone = await the_case(config)
        assert gone["steps"]["purge"] == "done" and gone["entries"][-1]["kind"] == "purged"
        facts = gone["entries"][-1]["facts"]
        assert facts["staff_messages_redacted"] >= len(named) and facts["member_told"]
        assert facts["rooms_left"] == 3  # the DM, the check-in room, the moderator's debrief
        await assert_nothing_personal_left(scene, config, case, named)
        # Handing it again does nothing: it is gone.
        again = await hand_to_purge(config)
        assert (again.cases, again.scheduled) == (0, ())
        # Nor does staff's word add personal data to it that no purge would come back for.
        await scene.staff.send_text(scene.staff_room, f"!case {number} note called them")
        await until(
            lambda: scene.staff_matching(lambda m: "was purged" in m), what="the note refused"
        )
        after = await the_case(config)
        assert [e["kind"] for e in after["entries"]] == [e["kind"] for e in gone["entries"]]


async def test_killed_mid_purge_resumes_and_does_nothing_twice(synapse, tmp_path, sqlite_database):
    database = sqlite_database
    scene = await build_scene(synapse, tmp_path)
    proxy = HoldingProxy(synapse.url)
    await proxy.start()
    config = config_for(scene, database, homeserver_url=proxy.url)
    process = None
    try:
        async with running_service(config):
            case = await closed_case(scene, config)
        named = await case_messages(scene, case["number"])
        await hand_to_purge(config)
        # Redacted, the member told, the DM left...: then killed on the check-in's leave.
        checkin = case["checkin_room"]
        proxy.hold(lambda request: request.path.endswith("/leave") and checkin in request.path)
        process = await run_service_process(config)
        await asyncio.wait_for(proxy.held_event.wait(), 90)
        process.send_signal(signal.SIGKILL)
        await process.wait()
        proxy.release(drop=True)
        erased = (await the_case(config))["purged_at"]
        assert erased is None, "nothing erased before the homeserver's side is done"
        async with running_service(config):
            await until(lambda: purged(config), within=60, what="the resumed purge")
        redactions = [
            e["redacts"] if "redacts" in e else e["content"].get("redacts")
            for e in await staff_room_events(scene)
            if e["type"] == "m.room.redaction" and e["sender"] == BOT
        ]
        assert len(redactions) == len(set(redactions)), "each message redacted once"
        assert set(named) <= set(redactions)
        await assert_nothing_personal_left(scene, config, case, named)
    finally:
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
        await proxy.stop()


async def test_the_homeserver_down_defers_the_purge_and_loses_nothing(
    synapse, tmp_path, sqlite_database
):
    database = sqlite_database
    scene = await build_scene(synapse, tmp_path)
    proxy = HoldingProxy(synapse.url)
    await proxy.start()
    config = config_for(scene, database, homeserver_url=proxy.url)
    try:
        async with running_service(config) as service:
            case = await closed_case(scene, config)
            named = await case_messages(scene, case["number"])
            proxy.down = True
            await hand_to_purge(config)
            service.steps.wake()

            async def waiting() -> bool:
                steps = (await the_case(config))["steps"]
                return steps.get("purge") == "started"

            await until(waiting, within=30, what="the purge to wait for the homeserver")
            await asyncio.sleep(3)
            waited = await the_case(config)
            assert waited["purged_at"] is None and waited["member"] == scene.member.user_id
            assert waited["steps"]["purge"] == "started", "deferred, never failed"
            proxy.down = False
            await until(lambda: purged(config), within=90, what="the purge once it answers")
        await assert_nothing_personal_left(scene, config, case, named)
    finally:
        await proxy.stop()


async def test_a_former_member_who_writes_is_told_where_to_get_help(synapse, tmp_path):
    """The bot still there (its purge held up on the homeserver): whoever writes is told the
    chat is closed and where to get help; staff hear someone wrote — no name, no text."""
    scene = await build_scene(synapse, tmp_path)
    proxy = HoldingProxy(synapse.url)
    await proxy.start()
    config = config_for(
        scene, f"sqlite+aiosqlite:///{tmp_path / 'safeguard.db'}", homeserver_url=proxy.url
    )
    try:
        async with running_service(config) as service:
            case = await closed_case(scene, config)
            proxy.hold(lambda request: "/redact/" in request.path)
            await hand_to_purge(config)
            service.steps.wake()
            await asyncio.wait_for(proxy.held_event.wait(), 30)
            await scene.member.send_text(case["dm_room"], "is anyone there? my secret words")
            await until(
                lambda: farewells(scene, case["dm_room"]), what="the answer to a former member"
            )
            notice = await until(
                lambda: scene.last_staff_event(lambda body: "Someone wrote to me" in body),
                what="staff told",
            )
            body = notice["content"]["body"]
            assert "secret words" not in body and scene.member.user_id not in body
            assert f"#{case['number']}" not in body
            assert await recorded(config, "former_member_wrote") is False  # outside any case
            proxy.release()
            await until(lambda: purged(config), within=60, what="the purge")
            # Still told staff afterwards: the notice named no case, so it stays.
            assert await scene.last_staff_event(lambda body: "Someone wrote to me" in body)
    finally:
        await proxy.stop()
