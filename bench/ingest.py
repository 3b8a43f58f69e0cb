"""Transaction ingest: our service against the floor, in the same run.

Synapse-shaped transactions (100 events: mostly messages and reactions, a few
flags and memberships) are PUT one at a time, as Synapse sends them, to:
  - floor: a minimal aiohttp handler that checks the token and persists the
    txn id and event ids (same SQLite settings, one DB transaction);
  - ours:  the real service (homeserver deliberately unreachable: this measures
    acknowledging, not acting).
Prints events/s and ack latency p50/p99 for each, and the ratio (target >= 0.8).
Usage: python bench/ingest.py [--transactions N] [--database sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hmac
import json
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appservice.config import load_config
from appservice.database import create_engine, upgrade
from appservice.registration import write_registration
from appservice.service import Service
from bot.store import ingest

EVENTS_PER_TXN = 100


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reaction(target: str, key: str) -> dict:
    relation = {"rel_type": "m.annotation", "event_id": target, "key": key}
    return {"type": "m.reaction", "content": {"m.relates_to": relation}}


def make_transaction(number: int) -> bytes:
    events = []
    for index in range(EVENTS_PER_TXN):
        event_id = f"$bench-{number}-{index}-{uuid.uuid4().hex[:6]}"
        base = {
            "event_id": event_id,
            "room_id": "!group:localhost",
            "sender": "@u:localhost",
            "origin_server_ts": int(time.time() * 1000),
        }
        if index % 50 == 49:  # a flag now and then
            events.append(base | reaction(f"$bench-{number}-0", "🚨"))
        elif index % 5 == 0:
            events.append(base | reaction(f"$bench-{number}-1", "👍"))
        else:
            events.append(
                base
                | {
                    "type": "m.room.message",
                    "content": {
                        "msgtype": "m.text",
                        "body": "just chatting about the weekend " * 4,
                    },
                }
            )
    return json.dumps({"events": events}).encode()


async def floor_app(database_url: str, token: str) -> tuple[web.Application, object]:
    engine = create_engine(database_url)
    await upgrade(engine)
    expected = token.encode()

    async def transaction(request: web.Request) -> web.Response:
        presented = request.headers.get("Authorization", "").removeprefix("Bearer ").encode()
        if not hmac.compare_digest(presented, expected):
            return web.json_response({"errcode": "M_FORBIDDEN"}, status=403)
        payload = json.loads(await request.read())
        ids = [event["event_id"] for event in payload["events"]]
        async with engine.begin() as conn:
            await ingest.record_transaction(
                conn, request.match_info["txn"], ids, [], dt.datetime.now(dt.UTC)
            )
        return web.json_response({})

    app = web.Application(client_max_size=32 * 1024 * 1024)
    app.router.add_put("/_matrix/app/v1/transactions/{txn}", transaction)
    return app, engine


async def drive(port: int, token: str, bodies: list[bytes], label: str) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}/_matrix/app/v1/transactions/"
    latencies = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        started = time.perf_counter()
        for number, body in enumerate(bodies):
            sent = time.perf_counter()
            async with session.put(f"{url}{label}-{number}", data=body) as response:
                assert response.status == 200, await response.text()
            latencies.append(time.perf_counter() - sent)
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "events_per_s": len(bodies) * EVENTS_PER_TXN / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000,
    }


async def run(transactions: int, backend: str, rounds: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="safeguard-bench-"))
    bodies = [make_transaction(n) for n in range(transactions)]
    warmup = [make_transaction(10_000 + n) for n in range(10)]

    def database(name: str) -> str:
        if backend == "sqlite":
            return f"sqlite+aiosqlite:///{work / name}.db"
        return f"postgresql+asyncpg://postgres@127.0.0.1/{name}"

    if backend == "postgresql":
        admin = create_engine("postgresql+asyncpg://postgres@127.0.0.1/test")
        admin = admin.execution_options(isolation_level="AUTOCOMMIT")
        from sqlalchemy import text

        async with admin.connect() as conn:
            for name in ("bench_floor", "bench_ours"):
                await conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                await conn.execute(text(f"CREATE DATABASE {name}"))

    # Both servers run side by side and are driven in alternating rounds, so
    # drift on the machine (WAL checkpoints, a busy core) hits both alike.
    token = uuid.uuid4().hex
    app, engine = await floor_app(database("bench_floor"), token)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    floor_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", floor_port).start()

    service_port = free_port()
    config_path = work / "config.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "homeserver": {"url": f"http://127.0.0.1:{free_port()}", "domain": "localhost"},
                "appservice": {
                    "url": f"http://127.0.0.1:{service_port}",
                    "listen": {"host": "127.0.0.1", "port": service_port},
                },
                "database": {"url": database("bench_ours")},
                "policy": {"staff_room": "!staff:localhost"},
            }
        )
    )
    write_registration(load_config(config_path), work / "registration.yaml")
    # The homeserver is deliberately unreachable: this measures acknowledging, not acting.
    service = Service(load_config(config_path), connect_retry_seconds=3600)
    await service.start()
    hs_token = service.registration.hs_token

    targets = {"floor": (floor_port, token), "ours": (service_port, hs_token)}
    for label, (port, key) in targets.items():
        await drive(port, key, warmup, f"warm-{label}")
    results: dict[str, list[dict[str, float]]] = {"floor": [], "ours": []}
    chunk = max(1, len(bodies) // rounds)
    for number in range(rounds):
        part = bodies[number * chunk : (number + 1) * chunk]
        order = ("floor", "ours") if number % 2 == 0 else ("ours", "floor")
        for label in order:
            port, key = targets[label]
            results[label].append(await drive(port, key, part, f"{label}-{number}"))
    await service.stop()
    await runner.cleanup()
    await engine.dispose()

    def median(label: str, figure: str) -> float:
        return statistics.median(result[figure] for result in results[label])

    print(
        f"ingest benchmark: {transactions} transactions x {EVENTS_PER_TXN} events, {backend}, "
        f"{rounds} alternating rounds (medians)"
    )
    print(f"{'':8} {'events/s':>10} {'ack p50 ms':>11} {'ack p99 ms':>11}")
    for label in ("floor", "ours"):
        print(
            f"{label:8} {median(label, 'events_per_s'):>10.0f} {median(label, 'p50_ms'):>11.2f} "
            f"{median(label, 'p99_ms'):>11.2f}"
        )
    ratio = median("ours", "events_per_s") / median("floor", "events_per_s")
    print(f"ratio ours/floor: {ratio:.2f} (target >= 0.80) -> {'OK' if ratio >= 0.8 else 'BELOW'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=200)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    asyncio.run(run(args.transactions, args.database, args.rounds))


if __name__ == "__main__":
    main()
