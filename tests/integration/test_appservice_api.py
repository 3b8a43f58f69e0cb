"""The Application Service API contract: statuses, bodies, durability, one instance."""

from __future__ import annotations

import json

import aiohttp
import pytest
import yaml

from appservice.config import ConfigError, load_config
from appservice.database import create_engine
from appservice.service import Service
from bot.store import ingest
from tests.support.appservice_api import auth, base, put, reaction
from tests.support.processes import run_service_process
from tests.support.scene import (
    build_scene,
    fetch,
    health,
    open_group_room,
    running_service,
    scene_config,
    service_config,
    until,
)

pytestmark = pytest.mark.synapse


@pytest.fixture
async def config(synapse, tmp_path):
    return service_config(
        synapse,
        tmp_path,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
        staff_room="!unused:localhost",
        staff=[],
    )


@pytest.fixture
async def service(config):
    async with running_service(config) as service:
        yield service


async def inbox_ids(service) -> list[str]:
    async with service.engine.connect() as conn:
        return [item.event_id for item in await ingest.pending(conn, limit=1000)]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}],
    ids=["missing", "wrong", "not-bearer"],
)
async def test_missing_or_wrong_token_is_403(service, headers):
    status, body = await put(service, "t1", {"events": []}, headers=headers)
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
    async with aiohttp.ClientSession() as session:
        for method, path in (
            ("GET", "users/@a:localhost"),
            ("GET", "rooms/%23a:localhost"),
            ("POST", "ping"),
        ):
            async with session.request(
                method, f"{base(service)}/_matrix/app/v1/{path}", headers=headers
            ) as response:
                assert response.status == 403


async def test_query_parameter_token_is_accepted(service):
    status, _ = await put(
        service, f"t?access_token={service.registration.hs_token}", {"events": []}, headers={}
    )
    assert status == 200


async def test_bad_bodies_are_400_and_lose_nothing(service):
    status, body = await put(service, "bad1", b"{not json", raw=True)
    assert (status, body["errcode"]) == (400, "M_NOT_JSON")
    status, body = await put(service, "bad2", {"events": {"not": "a list"}})
    assert (status, body["errcode"]) == (400, "M_BAD_JSON")
    status, body = await put(service, "bad3", ["not", "an", "object"])
    assert (status, body["errcode"]) == (400, "M_BAD_JSON")
    # The same txn id with a good body afterwards is still processed.
    status, _ = await put(service, "bad2", {"events": [reaction("$after-bad")]})
    assert status == 200
    assert "$after-bad" in await inbox_ids(service)


async def test_malformed_events_are_skipped_not_fatal(service):
    events = [
        "not an event",
        42,
        None,
        {"event_id": "$no-type", "room_id": "!r:l", "sender": "@a:l"},
        {
            "event_id": "$bad-content",
            "room_id": "!r:l",
            "type": "m.reaction",
            "sender": "@a:l",
            "content": "nope",
        },
        reaction("$good"),
    ]
    status, body = await put(service, "mixed", {"events": events})
    assert (status, body) == (200, {})
    # Of this transaction's events (the session's Synapse may still push others, left
    # over from earlier tests, to whichever service listens now).
    sent = {"$no-type", "$bad-content", "$good"}
    assert [i for i in await inbox_ids(service) if i in sent] == ["$good"]
    _status, text = await fetch(service, "/metrics")
    assert 'safeguard_events_total{outcome="malformed"} 5.0' in text


async def test_oversized_body_is_413(service):
    body = b'{"events": [' + b" " * (32 * 1024 * 1024 + 10) + b"]}"
    status, payload = await put(service, "big", body, raw=True)
    assert status == 413 and payload["errcode"] == "M_TOO_LARGE"


async def test_legal_synapse_sized_transaction_fits(service):
    padding = "x" * (60 * 1024)
    events = [reaction(f"$big{n}") | {"unsigned": {"pad": padding}} for n in range(100)]
    status, _ = await put(service, "legal", {"events": events})
    assert status == 200


async def test_query_ping_unknown_and_wrong_method(service):
    async with aiohttp.ClientSession(headers=auth(service)) as session:
        async with session.get(f"{base(service)}/_matrix/app/v1/users/@who:localhost") as r:
            assert (r.status, (await r.json())["errcode"]) == (404, "M_NOT_FOUND")
        async with session.get(f"{base(service)}/_matrix/app/v1/rooms/%23who:localhost") as r:
            assert (r.status, (await r.json())["errcode"]) == (404, "M_NOT_FOUND")
        async with session.post(f"{base(service)}/_matrix/app/v1/ping", json={}) as r:
            assert (r.status, await r.json()) == (200, {})
        async with session.get(f"{base(service)}/_matrix/app/v1/nonsense") as r:
            assert (r.status, (await r.json())["errcode"]) == (404, "M_UNRECOGNIZED")
        async with session.get(f"{base(service)}/elsewhere") as r:
            assert (r.status, (await r.json())["errcode"]) == (404, "M_UNRECOGNIZED")
        async with session.get(f"{base(service)}/_matrix/app/v1/transactions/1") as r:
            assert (r.status, (await r.json())["errcode"]) == (405, "M_UNRECOGNIZED")
        async with session.head(f"{base(service)}/metrics") as r:
            assert r.status == 200, "HEAD is answered wherever GET is"


async def test_health_names_each_check(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    config = scene_config(
        scene,
        staff=[],
    )
    async with running_service(config) as service:
        status, body = await health(service)
    assert status == 200
    assert set(body["checks"]) == {
        "database",
        "inbox",
        "homeserver",
        "checkins",
        "staff_room",
        "alerts",
        "cases",
        "encryption",
        "ready_dm_rooms",
        "transactions",
        "messages",
    }
    assert set(body["checks"]["inbox"]["lanes"]) == {"flags", "other", "refusals", "decrypt"}
    assert all(check["ok"] for check in body["checks"].values())


async def test_health_says_the_bot_is_not_in_the_staff_room(service):
    status, body = await health(service)
    assert status == 503
    assert body["checks"]["database"]["ok"] and body["checks"]["homeserver"]["ok"]
    assert body["checks"]["staff_room"]["ok"] is False
    assert "!unused:localhost" in body["checks"]["staff_room"]["problem"]
    # A flag would still be acted on (members told and removed; the alert waits): ready.
    assert (await fetch(service, "/live"))[0] == 200
    status, text = await fetch(service, "/ready")
    assert status == 200 and json.loads(text)["status"] == "ready", text


async def test_duplicate_transaction_is_not_reprocessed_after_restart(config):
    async with running_service(config) as first:
        assert (await put(first, "dup", {"events": [reaction("$once")]}))[0] == 200
        await until(lambda: _decisions_about(first, "$once"), what="the flag to be decided")
    async with running_service(config) as second:
        assert (await put(second, "dup", {"events": [reaction("$once")]}))[0] == 200
        assert (await put(second, "other", {"events": [reaction("$once")]}))[0] == 200
        await until(lambda: _drained(second), what="the inbox to drain")
        assert await _decisions_about(second, "$once") == 1


async def _drained(service) -> bool:
    async with service.engine.connect() as conn:
        return await ingest.backlog(conn) == 0


async def _decisions_about(service, flag_event: str) -> int:
    from bot.store import audit

    async with service.engine.connect() as conn:
        entries = await audit.entries(conn)
    return sum(1 for e in entries if (e.personal or {}).get("flag_event") == flag_event)


async def test_database_down_answers_503_so_synapse_retries(service):
    working = service.intake._recorder
    unreachable = create_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    service.intake._recorder = ingest.TransactionRecorder(unreachable)
    try:
        status, _body = await put(service, "while-down", {"events": [reaction("$kept")]})
        assert status == 503
    finally:
        await service.intake._recorder.close()
        await unreachable.dispose()
        service.intake._recorder = working
    assert (await put(service, "while-down", {"events": [reaction("$kept")]}))[0] == 200
    assert "$kept" in await inbox_ids(service)


async def test_second_instance_refuses_to_start(config, service):
    with pytest.raises(ConfigError, match="already running"):
        await Service(load_config(config)).start()


async def test_homeserver_down_at_start_still_serves(synapse, tmp_path):
    path = service_config(
        synapse,
        tmp_path,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'x.db'}",
        staff_room="!s:localhost",
        staff=[],
    )
    text = path.read_text().replace(synapse.url, "http://127.0.0.1:9")
    path.write_text(text)
    service = Service(load_config(path), connect_retry_seconds=0.2)
    await service.start()
    try:
        status, body = await health(service)
        assert status == 503
        assert body["checks"]["homeserver"]["ok"] is False
        assert body["checks"]["database"]["ok"] is True
        assert (await put(service, "queued", {"events": [reaction("$q")]}))[0] == 200
    finally:
        await service.stop()


async def test_bot_exists_and_synapse_delivers_messages_and_reactions(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    path = scene_config(
        scene,
        policy={"reactions": ["🚨", "👀"]},
    )
    async with running_service(path) as service:
        await open_group_room(scene)
        said = await scene.member.send_text(scene.group, "ordinary message")
        reacted = await scene.owner.react(scene.group, said, "👍")
        seen = await until(lambda: _seen(service, {said, reacted}), what="delivery of both events")
        assert seen
        profile = await scene.owner.request(
            "GET", "/_matrix/client/v3/profile/@safeguard:localhost/displayname"
        )
        assert profile["displayname"] == "Safeguarding"


async def _seen(service, event_ids: set[str]) -> bool:
    from sqlalchemy import select

    from bot.store.schema import seen_events

    async with service.engine.connect() as conn:
        rows = await conn.execute(
            select(seen_events.c.event_id).where(seen_events.c.event_id.in_(event_ids))
        )
        return set(rows.scalars()) == event_ids


async def test_transaction_retried_by_synapse_is_processed_once(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    path = scene_config(
        scene,
    )
    async with running_service(path):
        await open_group_room(scene)
    # The service is down: Synapse queues the flag and retries later.
    said = await scene.member.send_text(scene.group, "while you were away")
    await scene.moderator.react(scene.group, said, "🚨")
    async with running_service(path) as service:
        await until(lambda: _case_count(service, 1), within=30, what="one case")
        await until(lambda: _left(scene), within=30, what="the removal")
        assert await _case_count(service, 1)


async def _left(scene) -> bool:
    return await scene.membership(scene.group, scene.member) == "leave"


async def _case_count(service, expected: int) -> bool:
    from bot.store import cases

    async with service.engine.connect() as conn:
        return len(await cases.listing(conn)) == expected


async def test_invite_from_someone_not_allowed_is_rejected_and_recorded(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    path = scene_config(
        scene,
    )
    data = yaml.safe_load(path.read_text())
    data["appservice"]["allowed_inviters"] = [scene.staff.user_id]
    path.write_text(yaml.safe_dump(data))
    async with running_service(path) as service:
        room = await scene.owner.create_room(name="Unvetted", invite=["@safeguard:localhost"])

        async def rejected() -> bool:
            return (await scene.owner.members(room)).get("@safeguard:localhost") == "leave"

        await until(rejected, what="the bot to reject the invite")
        # The leave is visible a moment before its record: wait for what is asserted.
        await until(lambda: _logged(service, "invite_refused"), what="the refusal's record")


async def _logged(service, kind: str) -> bool:
    from bot.store import audit

    async with service.engine.connect() as conn:
        return any(e.kind == kind for e in await audit.entries(conn))


async def test_one_instance_per_postgresql_database(tmp_path):
    from appservice.database import InstanceLock
    from tests.support.databases import fresh_database

    async with fresh_database("postgresql", tmp_path) as url:
        first, second = InstanceLock(url), InstanceLock(url)
        await first.acquire()
        try:
            with pytest.raises(ConfigError, match="already running"):
                await second.acquire()
        finally:
            await first.release()
        await second.acquire()  # released with its holder: a restart is never blocked
        await second.release()


async def test_odd_but_legal_transactions_never_wedge_delivery(service):
    # The same event twice in one transaction: recorded once, acknowledged.
    twice = reaction("$twice")
    assert (await put(service, "dupes", {"events": [twice, twice]}))[0] == 200
    # A transaction id longer than any column: still recorded, and still deduplicated.
    long_txn = "t" * 1000
    assert (await put(service, long_txn, {"events": [reaction("$long")]}))[0] == 200
    assert (await put(service, long_txn, {"events": [reaction("$long")]}))[0] == 200
    # An event id longer than the columns hold is skipped as malformed, not a 5xx.
    status, _ = await put(service, "huge-id", {"events": [reaction("$" + "x" * 300)]})
    assert status == 200
    await until(lambda: _drained(service), what="the inbox to drain")
    decided = [await _decisions_about(service, event) for event in ("$twice", "$long")]
    assert decided == [1, 1]


async def test_export_since_must_be_a_date(config):
    from tests.support.scene import safeguard_cli

    code, _, err = await safeguard_cli(
        "cases", "export", "-c", str(config), "--since", "last tuesday"
    )
    assert code == 2 and "is not a date (write YYYY-MM-DD)" in err


async def test_ids_the_database_cannot_store_are_skipped_not_a_500(service):
    """A lone UTF-16 surrogate in an id (escaped in JSON) is skipped like any malformed event."""
    body = (
        b'{"events": ['
        b'{"event_id": "$bad\\ud800", "room_id": "!r:l", "type": "m.reaction", "sender": "@a:l"},'
        b'{"event_id": "$ok", "room_id": "!r\\udfff:l", "type": "m.reaction", "sender": "@a:l"},'
        + json.dumps(reaction("$fine") | {"content": {"body": "x"}}).encode()
        + b"]}"
    )
    status, payload = await put(service, "surrogates", body, raw=True)
    assert (status, payload) == (200, {})
    # Content with a lone surrogate is kept (made storable), not a reason to drop the event.
    lone = reaction("$content-surrogate")
    lone["content"]["m.relates_to"]["key"] = "🚨"
    lone["content"]["note"] = "\ud800 alone"
    status, _ = await put(
        service, "surrogate-content", json.dumps({"events": [lone]}).encode(), raw=True
    )
    assert status == 200
    ids = await inbox_ids(service)
    assert "$content-surrogate" in ids and not any("\ud800" in i for i in ids)


async def test_nesting_the_parser_refuses_is_a_400_in_matrix_shape(service):
    deep = b'{"events": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}"
    status, payload = await put(service, "deep", deep, raw=True)
    assert (status, payload["errcode"]) == (400, "M_NOT_JSON")
    nested_event = reaction("$nested") | {"content": {"x": json.loads("[" * 500 + "]" * 500)}}
    assert (await put(service, "nested", {"events": [nested_event]}))[0] == 200


async def test_the_postgresql_instance_lock_lost_is_taken_again_unless_a_twin_has_it(tmp_path):
    """The lock's session ends (the server restarted, a network blip): the service takes the
    lock again and goes on. Only if another instance holds it does it stop, non-zero."""
    import asyncio

    from sqlalchemy import text

    from appservice.database import _PG_LOCK_KEY
    from appservice.registration import write_registration
    from tests.support.databases import fresh_database

    async with fresh_database("postgresql", tmp_path) as url:
        path = tmp_path / "config.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "homeserver": {"url": "http://127.0.0.1:9", "domain": "localhost"},
                    "appservice": {"url": "http://127.0.0.1:2", "listen": {"port": 0}},
                    "database": {"url": url},
                    "policy": {"staff_room": "!s:localhost"},
                }
            )
        )
        write_registration(load_config(path), tmp_path / "registration.yaml")
        process = await run_service_process(path, stderr=asyncio.subprocess.PIPE)
        admin = create_engine(url)
        lock_holder = (
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = :key AND granted"
        )
        try:

            async def holder() -> int | None:
                async with admin.connect() as conn:
                    return (
                        await conn.execute(text(lock_holder), {"key": _PG_LOCK_KEY})
                    ).scalar_one_or_none()

            first = await until(holder, within=30, what="the service to take the lock")
            async with admin.connect() as conn:
                await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})

            async def held_again() -> int | None:
                pid = await holder()
                return pid if pid not in (None, first) else None

            second = await until(held_again, within=30, what="the lock taken again")
            assert process.returncode is None, "an outage, not the end"

            # A twin takes the lock the moment the service's session ends: the service stops.
            async with admin.connect() as twin:
                await twin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": second})
                took = False
                for _ in range(100):
                    took = (
                        await twin.execute(
                            text("SELECT pg_try_advisory_lock(:key)"), {"key": _PG_LOCK_KEY}
                        )
                    ).scalar_one()
                    await twin.commit()
                    if took:
                        break
                    await asyncio.sleep(0.02)
                assert took
                code = await asyncio.wait_for(process.wait(), 60)
            assert code != 0
            assert process.stderr is not None
            assert (
                "another instance took the instance lock" in (await process.stderr.read()).decode()
            )
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await admin.dispose()
