"""/health tells the truth: a full, read-only or locked database, a rejected token, an
alert that could not be delivered — each is a 503 naming the cause, within seconds.

The disk faults are real: the database lives on a small tmpfs that the test fills
or remounts read-only; the lock is held by another process.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from tests.support.appservice_api import put, reaction
from tests.support.disk import fill, small_disk
from tests.support.scene import (
    ADMIN_TOKEN,
    build_scene,
    export_json,
    fetch,
    health,
    open_group_room,
    running_service,
    scene_config,
    until,
)
from tests.support.synapse import free_port

pytestmark = pytest.mark.synapse


def many_reactions(prefix: str, count: int = 100) -> dict:
    padding = "p" * 2000
    return {
        "events": [reaction(f"${prefix}{n}") | {"unsigned": {"pad": padding}} for n in range(count)]
    }


async def test_full_disk_is_503_on_health_and_transactions_then_recovers(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    with small_disk(tmp_path) as disk:
        config = scene_config(
            scene,
            staff=[],
            database=disk / "safeguard.db",
        )
        async with running_service(config) as service:
            assert (await health(service))[0] == 200
            filler = fill(disk)
            status, _ = await put(service, "while-full", many_reactions("full"))
            assert status == 503, "not recorded: Synapse must retry it"
            status, body = await health(service)
            assert status == 503 and body["checks"]["database"]["ok"] is False
            assert "full" in body["checks"]["database"]["error"].lower()
            filler.unlink()
            status, _ = await put(service, "while-full", many_reactions("full"))
            assert status == 200
            status, body = await health(service)
            assert body["checks"]["database"]["ok"] is True, body


async def test_read_only_database_is_503(synapse, tmp_path):
    """SQLite's own read-only answer (SQLITE_READONLY), on every new connection from now on.

    (A filesystem cannot be remounted read-only under a process writing to it.)
    """
    from sqlalchemy import event

    scene = await build_scene(synapse, tmp_path)
    config = scene_config(
        scene,
        staff=[],
    )
    async with running_service(config) as service:
        for engine in (service.engine, service._health_engine):

            @event.listens_for(engine.sync_engine, "connect")
            def read_only(dbapi_connection, _record):
                dbapi_connection.execute("PRAGMA query_only=ON")

            await engine.dispose()
        # The intake writes on a plain connection of its own (bot/store/ingest.py): let it
        # go, and open the next one read-only too.
        opened_plain = service.engine.plain_connection

        def plain_read_only():
            conn = opened_plain()
            conn.execute("PRAGMA query_only=ON")
            return conn

        service.engine.plain_connection = plain_read_only
        await service.intake.close()
        assert (await put(service, "ro", {"events": [reaction("$ro")]}))[0] == 503
        status, body = await health(service)
        assert status == 503 and body["checks"]["database"]["ok"] is False
        assert "readonly" in body["checks"]["database"]["error"].lower()


LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA busy_timeout=1000")
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


async def test_locked_database_gets_a_prompt_503(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    database = tmp_path / "locked.db"
    config = scene_config(
        scene,
        staff=[],
        database=database,
    )
    async with running_service(config) as service:
        locker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            LOCKER,
            str(database),
            "25",
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert locker.stdout is not None
            assert (await locker.stdout.readline()).strip() == b"locked"
            # Not a speed test: /health must answer at all while the lock is held.
            status, body = await asyncio.wait_for(health(service), 12)
            assert status == 503 and body["checks"]["database"]["ok"] is False
        finally:
            locker.kill()
            await locker.wait()
        status, body = await health(service)
        assert body["checks"]["database"]["ok"] is True


async def test_rejected_as_token_is_an_outage_named_on_health_never_a_failure(synapse, tmp_path):
    """A rotated as_token: every call gets 401 M_UNKNOWN_TOKEN; the flag waits, then happens."""
    scene = await build_scene(synapse, tmp_path)
    good = scene_config(
        scene,
    )
    async with running_service(good):
        await open_group_room(scene)
    registration = yaml.safe_load(synapse.registration_path.read_text())
    rotated = tmp_path / "rotated-registration.yaml"
    rotated.write_text(yaml.safe_dump(registration | {"as_token": "rotated-" + "x" * 40}))
    data = yaml.safe_load(good.read_text())
    data["appservice"]["registration"] = str(rotated)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    from appservice.config import load_config
    from appservice.service import Service

    service = Service(load_config(bad), connect_retry_seconds=0.2)
    await service.start()
    try:
        said = await scene.member.send_text(scene.group, "it's too much")
        await scene.moderator.react(scene.group, said, "🚨")

        async def named() -> bool:
            status, body = await health(service)
            return status == 503 and "as_token" in body["checks"]["homeserver"].get("problem", "")

        await until(named, what="/health to name the rejected token")
        await asyncio.sleep(2)
        assert await scene.membership(scene.group, scene.member) == "join"
    finally:
        await service.stop()
    async with running_service(good):
        await until(
            lambda: scene.membership(scene.group, scene.member),
            what="the member's membership",
        )
        await until(
            lambda: _membership_is(scene, "leave"), within=30, what="the removal once fixed"
        )
        await until(lambda: _alert_done(good), within=30, what="the alert")
    (case,) = (await export_json(good))["cases"]
    assert "failed" not in case["steps"].values(), case["steps"]


async def _membership_is(scene, value: str) -> bool:
    return await scene.membership(scene.group, scene.member) == value


async def _alert_done(config) -> bool:
    document = await export_json(config)
    return bool(document["cases"]) and document["cases"][0]["steps"]["alert"] == "done"


async def test_alert_the_staff_room_refuses_is_paged_and_named_on_health(synapse, tmp_path):
    """Synapse refuses an alert too large to send (413): failed, paged, and on /health."""
    received: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/page", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        scene = await build_scene(synapse, tmp_path)
        config = scene_config(
            scene,
            policy={"alert_webhook": f"http://127.0.0.1:{port}/page"},
            messages={"alert": "Case #{case}\n" + "x" * 70_000},
        )
        async with running_service(config) as service:
            await open_group_room(scene)
            said = await scene.member.send_text(scene.group, "help")
            await scene.moderator.react(scene.group, said, "🚨")

            async def unhealthy() -> dict | None:
                status, body = await health(service)
                return body if status == 503 and not body["checks"]["alerts"]["ok"] else None

            body = await until(unhealthy, within=60, what="the undelivered alert on /health")
            assert body["checks"]["alerts"]["undelivered_alerts"] == [1]
            assert "#1" in body["checks"]["alerts"]["problem"]
            await until(lambda: received, what="the page")
            assert received[0]["event"] == "safeguard.alert_failed" and received[0]["case"] == 1
            assert await scene.membership(scene.group, scene.member) == "leave", "member safe"
    finally:
        await runner.cleanup()


async def test_encryption_asked_for_but_impossible_is_on_health(synapse, tmp_path):
    """An older registration makes the bot the sender, which Synapse will not let sync:
    encrypted commands would go unread, so /health is not ok, and says what to do."""
    scene = await build_scene(synapse, tmp_path)
    config = scene_config(
        scene,
        staff=[],
    )
    data = yaml.safe_load(config.read_text())
    older = yaml.safe_load(Path(data["appservice"]["registration"]).read_text())
    older["sender_localpart"] = "safeguard"  # the bot itself, as registrations once had it
    (tmp_path / "older-registration.yaml").write_text(yaml.safe_dump(older))
    data["appservice"]["registration"] = str(tmp_path / "older-registration.yaml")
    config.write_text(yaml.safe_dump(data))
    async with running_service(config) as service:
        assert service.crypto is None
        status, body = await health(service)
        encryption = body["checks"]["encryption"]
        assert status == 503 and encryption["ok"] is False
        assert "safeguard registration" in encryption["problem"]
    # Turned off by the operator, it is not a problem.
    data["encryption"] = {"enabled": False}
    config.write_text(yaml.safe_dump(data))
    async with running_service(config) as service:
        _status, body = await health(service)
        assert body["checks"]["encryption"] == {"ok": True, "enabled": False}


async def test_health_names_nothing_without_the_admin_token(synapse, tmp_path):
    """Anyone who can reach /health learns only whether each check is ok: the detail
    (the staff room, case numbers, error text) is for whoever holds
    appservice.admin_token; /metrics names no room or person either."""
    scene = await build_scene(synapse, tmp_path)
    config = scene_config(scene, staff=[])
    async with running_service(config) as service:
        detail_status, detail = await health(service)
        assert detail["checks"]["staff_room"]["room"] == scene.staff_room
        status, text = await fetch(service, "/health")
        assert status == detail_status
        assert json.loads(text)["checks"] == {
            name: {"ok": check["ok"]} for name, check in detail["checks"].items()
        }
        assert ":localhost" not in text
        refused = [
            await fetch(service, "/health?detail=1"),
            await fetch(service, "/health?detail=1", {"Authorization": "Bearer wrong-0123456789"}),
            # The hs_token's old query form is no way in for the admin token.
            await fetch(service, f"/health?detail=1&access_token={ADMIN_TOKEN}"),
        ]
        for status, text in refused:
            assert status == 403 and ":localhost" not in text, text
        _status, metrics = await fetch(service, "/metrics")
        assert ":localhost" not in metrics
    data = yaml.safe_load(config.read_text())
    del data["appservice"]["admin_token"]
    config.write_text(yaml.safe_dump(data))
    async with running_service(config) as service:
        status, text = await fetch(
            service, "/health?detail=1", {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert status == 403 and "appservice.admin_token" in text
