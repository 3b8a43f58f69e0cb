"""A transaction Synapse never sends (issue 22): the gap it leaves is noticed and nudged.

Synapse → proxy (on the registered AS port) → the service. The proxy swallows one
transaction (answers Synapse 200, passes nothing on): the service sees a real gap in
Synapse's transaction ids. What Synapse then does with the nudge is Synapse's own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bot.intake.stranded import sequential_id
from bot.store.schema import seen_events, transactions
from tests.support.proxy import HoldingProxy
from tests.support.scene import (
    Scene,
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
RESOLVED = "safeguard_stranded_transactions_resolved_total"
ABANDONED = f'{RESOLVED}{{outcome="abandoned"}} 1.0'
RECOVERED = f'{RESOLVED}{{outcome="recovered"}} 1.0'


def is_transaction(request: Any) -> bool:
    return "/_matrix/app/v1/transactions/" in request.path


def event_ids(body: bytes) -> list[str]:
    return [event.get("event_id") for event in json.loads(body).get("events", [])]


async def metric(service: Any, name: str) -> float:
    _status, text = await fetch(service, "/metrics")
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def recorded(service: Any, event_id: str) -> bool:
    async with service.engine.connect() as conn:
        query = sa.select(sa.func.count()).where(seen_events.c.event_id == event_id)
        return (await conn.execute(query)).scalar_one() == 1


async def swallow_a_flag(scene: Scene, proxy: HoldingProxy, service: Any) -> tuple[str, str]:
    """The member speaks (delivered), the moderator flags it (swallowed): (txn id, flag)."""
    said = await scene.member.send_text(scene.group, "I can't do this any more")
    await until(lambda: recorded(service, said), what="the message delivered")
    proxy.swallow(lambda request, body: is_transaction(request) and b'"m.reaction"' in body)
    flag = await scene.moderator.react(scene.group, said, "🚨")
    await asyncio.wait_for(proxy.swallowed_event.wait(), 30)
    path, body = proxy.swallowed[0]
    assert flag in event_ids(body), "the flag was in the swallowed transaction"
    return path.rsplit("/", 1)[1], flag


def nudged_transactions(proxy: HoldingProxy) -> list[str]:
    return [path for path, status in proxy.answers if is_transaction_path(path) and status == 503]


def is_transaction_path(path: str) -> bool:
    return "/_matrix/app/v1/transactions/" in path


async def test_a_swallowed_transaction_is_noticed_nudged_once_and_its_flag_caught_up(
    synapse, tmp_path, caplog
):
    scene = await build_scene(synapse, tmp_path)
    service_port = free_port()
    async with HoldingProxy(f"http://127.0.0.1:{service_port}", port=synapse.as_port) as proxy:
        # Catch-up every 2 s: it is what finds the flag Synapse will never resend.
        config = scene_config(scene, listen_port=service_port, reconcile={"interval": "2s"})

        def prepare(service: Any) -> None:
            service.stranded.tracker.nudge_wait = 5.0  # give up sooner than in production

        caplog.set_level(logging.INFO, logger="bot.intake.stranded")
        async with running_service(config, prepare=prepare) as service:
            await open_group_room(scene)
            swallowed, flag = await swallow_a_flag(scene, proxy, service)
            # The next push arrives: the swallowed id is now a gap below it.
            after = await scene.owner.send_text(scene.group, "anyway")
            await until(lambda: recorded(service, after), what="the next push")

            async def noticed() -> bool:
                return await metric(service, "safeguard_stranded_transactions_total") == 1

            await until(noticed, within=15, what="the gap counted as stranded")
            # Logged: at INFO while nothing shows the gap is ours (next: the flag caught up).
            assert f"transaction {swallowed} missing" in caplog.text
            _status, report = await health(service)
            assert report["checks"]["transactions"]["stranded"] == 1
            # A gap alone is not nudged (another appservice's ids leave gaps too): the
            # safety net finding the flag the push never brought shows it is ours.
            assert not nudged_transactions(proxy)
            await until(lambda: _flagged(config), within=30, what="the flag caught up")
            # The next push is answered 503 once, and Synapse's recoverer resends it.
            nudge = await scene.owner.send_text(scene.group, "still here")
            await until(lambda: recorded(service, nudge), within=30, what="the nudged push")
            (refused,) = nudged_transactions(proxy)
            statuses = [status for path, status in proxy.answers if path == refused]
            assert statuses == [503, 200], "refused once, then taken when Synapse resent it"
            resent = [body for _m, path, body in proxy.forwarded if path == refused]
            assert event_ids(resent[0]) == event_ids(resent[1]), "the same events, resent"
            txn_id = refused.rsplit("/", 1)[1]
            async with service.engine.connect() as conn:
                rows = await conn.execute(
                    sa.select(transactions.c.txn_id).where(transactions.c.txn_id == txn_id)
                )
                assert len(rows.all()) == 1, "recorded once (the refused push was not)"
            for event_id in event_ids(resent[0]):
                assert await recorded(service, event_id)
            assert await metric(service, "safeguard_stranded_nudges_total") == 1
            assert (
                'safeguard_transactions_total{outcome="nudged"} 1.0'
                in (await fetch(service, "/metrics"))[1]
            )

            # Synapse had its 200 for the swallowed one: it never comes. Given up, once.
            async def given_up() -> bool:
                text = (await fetch(service, "/metrics"))[1]
                return (
                    'safeguard_stranded_transactions_resolved_total{outcome="abandoned"} 1.0'
                    in (text)
                )

            await until(given_up, within=30, what="the gap given up")
            assert f"transaction {swallowed} not resent after a nudge" in caplog.text
            # The flag is acted on all the same: catch-up read it from the room.
            await until(lambda: _flagged(config), within=30, what="the caught-up flag's case")
            assert len(nudged_transactions(proxy)) == 1, "one nudge for the gap, no more"
            delivered = [
                e for _m, p, b in proxy.forwarded if is_transaction_path(p) for e in event_ids(b)
            ]
            assert flag not in delivered
        (case,) = (await export_json(config))["cases"]
        flagged = case["entries"][0]
        assert flagged["kind"] == "flagged" and flagged["facts"]["caught_up"] is True
        assert flagged["personal"]["flag_event"] == flag
        # Nothing in the log names a room or a person.
        stranded_log = [r.getMessage() for r in caplog.records if r.name == "bot.intake.stranded"]
        assert stranded_log and not any(("!" in m or "@" in m) for m in stranded_log)


async def _flagged(config: Path) -> bool:
    return len((await export_json(config))["cases"]) == 1


async def test_a_transaction_synapse_stranded_is_resent_after_the_nudge(synapse, tmp_path):
    """A real strand, made as Synapse makes one: the transaction is in Synapse's table of
    unsent transactions while the service is marked up (the proxy swallows the push and
    the test puts the row back). The nudge makes Synapse's recoverer send it."""
    scene = await build_scene(synapse, tmp_path)
    service_port = free_port()
    registration = json.loads(json.dumps(_registration(synapse.registration_path)))
    database = synapse.registration_path.parent / "synapse" / "homeserver.db"
    async with HoldingProxy(f"http://127.0.0.1:{service_port}", port=synapse.as_port) as proxy:
        config = scene_config(scene, listen_port=service_port)
        async with running_service(config) as service:
            await open_group_room(scene)
            swallowed, flag = await swallow_a_flag(scene, proxy, service)
            number = sequential_id(swallowed)
            assert number is not None, "Synapse's transaction ids are integers"
            ids = event_ids(proxy.swallowed[0][1])
            await asyncio.to_thread(_strand, database, registration["id"], number, ids)
            after = await scene.owner.send_text(scene.group, "anyway")
            await until(lambda: recorded(service, after), what="the next push")

            async def noticed() -> bool:
                return await metric(service, "safeguard_stranded_transactions_total") == 1

            await until(noticed, within=15, what="the gap counted as stranded")
            # The safety net finds the flag the push never brought: the gap is ours.
            await until(lambda: _flagged(config), within=30, what="the flag caught up")
            await scene.owner.send_text(scene.group, "still here")  # nudged

            async def recovered() -> bool:
                text = (await fetch(service, "/metrics"))[1]
                return RECOVERED in text

            await until(recovered, what="the gap counted as recovered")
            resent = [p for p, status in proxy.answers if p.endswith(f"/{swallowed}")]
            assert resent == [f"/_matrix/app/v1/transactions/{swallowed}"], "sent by the recoverer"
            assert len(nudged_transactions(proxy)) == 1
            _status, report = await health(service)
            assert report["checks"]["transactions"]["stranded"] == 0
        (case,) = (await export_json(config))["cases"]
        flagged = case["entries"][0]
        assert flagged["personal"]["flag_event"] == flag, "one case: the resent flag is known"


def _registration(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def _strand(database: Path, as_id: str, txn_id: int, ids: list[str]) -> None:
    """Put the transaction back in Synapse's queue of unsent ones, as its race leaves it
    (once Synapse has deleted it, on the 200 the proxy gave it)."""
    for _ in range(100):
        with sqlite3.connect(database, timeout=10) as db:
            query = "SELECT 1 FROM application_services_txns WHERE as_id = ? AND txn_id = ?"
            if db.execute(query, (as_id, txn_id)).fetchone() is None:
                db.execute(
                    "INSERT INTO application_services_txns (as_id, txn_id, event_ids)"
                    " VALUES (?, ?, ?)",
                    (as_id, txn_id, json.dumps(ids)),
                )
                return
        time.sleep(0.1)
    raise AssertionError("Synapse never completed the swallowed transaction")
