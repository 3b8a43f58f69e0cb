"""Transaction ingest: our service against the floor, in the same run.

Synapse-shaped transactions (100 events: messages, one reaction in five, a join,
and a 🚨 flag in one transaction in ten) are PUT one at a time, as Synapse sends
them, to:
  - floor: a bare aiohttp handler, no project code, that checks the token and
    persists the txn id and every event id in one database transaction with the
    driver directly, as fast as it goes (the stdlib sqlite3 on a thread of its own,
    one hop per transaction, the service's WAL settings, an implicit transaction,
    integer-millisecond times; or asyncpg in one statement);
  - ours:  the real service (homeserver deliberately unreachable: this measures
    acknowledging, not acting).
Prints events/s and ack latency p50/p99 for each, and the ratio (target >= 0.8);
then feeds the service alone up to 1,000,000 events and prints the process's RSS.
Usage: python bench/ingest.py [--transactions N] [--database sqlite|postgresql] [--chat-only]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hmac
import json
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appservice.config import load_config
from appservice.database import create_engine
from appservice.registration import write_registration
from appservice.service import Service
from bench.memory import rss_mib
from tests.support.synapse import free_port

try:  # the fastest parser there is, as the service uses
    from orjson import loads
except ImportError:  # pragma: no cover
    from json import loads

EVENTS_PER_TXN = 100
# One 🚨 in every FLAG_EVERY transactions (1 event in 1,000): a flag is an exceptional
# event; the rest is chat, reactions (one in five) and a join per transaction.
FLAG_EVERY = 10


def reaction(target: str, key: str) -> dict:
    relation = {"rel_type": "m.annotation", "event_id": target, "key": key}
    return {"type": "m.reaction", "content": {"m.relates_to": relation}}


def make_transaction(number: int, *, chat_only: bool = False) -> bytes:
    """A transaction of the bench's mix (chat, reactions, a join, a flag now and then),
    or of chat alone (`chat_only`: what most pushes are)."""
    events = []
    for index in range(EVENTS_PER_TXN):
        event_id = f"$bench-{number}-{index}-{uuid.uuid4().hex[:6]}"
        base = {
            "event_id": event_id,
            "room_id": "!group:localhost",
            "sender": "@u:localhost",
            "origin_server_ts": int(time.time() * 1000),
        }
        if not chat_only and index == 49 and number % FLAG_EVERY == 0:  # a flag now and then
            events.append(base | reaction(f"$bench-{number}-0", "🚨"))
        elif not chat_only and index == 99:  # someone joins
            membership = {"membership": "join", "displayname": f"user {number}"}
            events.append(
                base
                | {"type": "m.room.member", "state_key": f"@j{number}:localhost"}
                | {"content": membership}
            )
        elif not chat_only and index % 5 == 0:
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


FLOOR_TABLES = (
    "CREATE TABLE IF NOT EXISTS floor_transactions ("
    " txn_id VARCHAR(255) PRIMARY KEY, received_at TIMESTAMP NOT NULL, event_count INTEGER)",
    "CREATE TABLE IF NOT EXISTS floor_events ("
    " event_id VARCHAR(255) PRIMARY KEY, received_at TIMESTAMP NOT NULL)",
)


def floor_handler(token: str, record) -> web.Application:
    """The bare handler: constant-time token check, parse, record the ids, 200.

    No project code: the driver directly, one database transaction per HTTP
    transaction, written as fast as the driver allows.
    """
    expected = token.encode()

    async def transaction(request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        if not hmac.compare_digest(header.removeprefix("Bearer ").encode(), expected):
            return web.json_response({"errcode": "M_FORBIDDEN"}, status=403)
        payload = loads(await request.read())
        ids = [event["event_id"] for event in payload["events"]]
        await record(request.match_info["txn"], ids, dt.datetime.now(dt.UTC).replace(tzinfo=None))
        return web.json_response({})

    app = web.Application(client_max_size=32 * 1024 * 1024)
    app.router.add_put("/_matrix/app/v1/transactions/{txn}", transaction)
    return app


async def sqlite_floor(path: Path, token: str) -> tuple[web.Application, Callable]:
    """The fastest a durable SQLite write of a transaction can be from asyncio: the
    stdlib driver on a thread of its own, one hop there per transaction, WAL and
    synchronous=NORMAL (the service's settings), the driver's implicit transaction,
    and the time as integer milliseconds (no per-row conversion)."""
    loop = asyncio.get_running_loop()
    thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="floor")

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, check_same_thread=False)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=5000"):
            conn.execute(f"PRAGMA {pragma}")
        for statement in FLOOR_TABLES:
            conn.execute(statement)
        conn.commit()
        return conn

    conn = await loop.run_in_executor(thread, connect)

    def write(txn_id: str, ids: list[str], millis: int) -> None:
        with conn:  # BEGIN (implicit, on the first INSERT) ... COMMIT
            conn.execute(
                "INSERT OR IGNORE INTO floor_transactions VALUES (?, ?, ?)",
                (txn_id, millis, len(ids)),
            )
            conn.executemany(
                "INSERT OR IGNORE INTO floor_events VALUES (?, ?)", [(i, millis) for i in ids]
            )

    async def record(txn_id: str, ids: list[str], now: dt.datetime) -> None:
        millis = int(now.timestamp() * 1000)
        await loop.run_in_executor(thread, write, txn_id, ids, millis)

    async def close() -> None:
        await loop.run_in_executor(thread, conn.close)
        thread.shutdown()

    return floor_handler(token, record), close


async def postgresql_floor(url: str, token: str) -> tuple[web.Application, Callable]:
    """asyncpg on one held connection: the txn id and every event id (one array
    parameter) in one statement, so one round trip and no BEGIN/COMMIT."""
    import asyncpg

    conn = await asyncpg.connect(url)
    for statement in FLOOR_TABLES:
        await conn.execute(statement)

    async def record(txn_id: str, ids: list[str], now: dt.datetime) -> None:
        await conn.execute(
            "WITH txn AS ("
            " INSERT INTO floor_transactions VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"
            ") INSERT INTO floor_events SELECT unnest($4::varchar[]), $2 ON CONFLICT DO NOTHING",
            txn_id,
            now,
            len(ids),
            ids,
        )

    return floor_handler(token, record), conn.close


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


async def run(
    transactions: int, backend: str, rounds: int, memory_events: int, chat_only: bool
) -> None:
    work = Path(tempfile.mkdtemp(prefix="safeguard-bench-"))
    warmup = [make_transaction(10_000 + n, chat_only=chat_only) for n in range(10)]

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
    if backend == "sqlite":
        app, close_floor = await sqlite_floor(work / "bench_floor.db", token)
    else:
        app, close_floor = await postgresql_floor(
            "postgresql://postgres@127.0.0.1/bench_floor", token
        )
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
    # Each round's bodies are built before it and dropped after it: the bench holds
    # one round's (about 45 KB a transaction), not all of them, when RSS is read.
    chunk = max(1, transactions // rounds)
    for number in range(rounds):
        part = [make_transaction(number * chunk + n, chat_only=chat_only) for n in range(chunk)]
        order = ("floor", "ours") if number % 2 == 0 else ("ours", "floor")
        for label in order:
            port, key = targets[label]
            results[label].append(await drive(port, key, part, f"{label}-{number}"))
    # Memory: keep feeding the service (fresh transactions, built as they are sent, so the
    # bench holds none of them) until it has ingested `memory_events` in all.
    await runner.cleanup()
    await close_floor()
    del part
    ingested = chunk * rounds * EVENTS_PER_TXN + len(warmup) * EVENTS_PER_TXN
    number = 100_000
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {hs_token}"}) as session:
        while ingested < memory_events:
            async with session.put(
                f"http://127.0.0.1:{service_port}/_matrix/app/v1/transactions/mem-{number}",
                data=make_transaction(number),
            ) as response:
                assert response.status == 200, await response.text()
            number += 1
            ingested += EVENTS_PER_TXN
    memory = rss_mib()
    await service.stop()

    def median(label: str, figure: str) -> float:
        return statistics.median(result[figure] for result in results[label])

    print(
        f"ingest benchmark: {transactions} transactions x {EVENTS_PER_TXN} events "
        f"({'chat only' if chat_only else 'mixed'}), {backend}, "
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
    print(
        f"RSS of the whole bench process after the service ingested {ingested:,} events: "
        f"{memory:.0f} MiB (target < 150) -> {'OK' if memory < 150 else 'ABOVE'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=3000)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--memory-events", type=int, default=1_000_000, help="events ingested before RSS is read"
    )
    parser.add_argument("--chat-only", action="store_true", help="pushes of chat alone")
    args = parser.parse_args()
    asyncio.run(
        run(args.transactions, args.database, args.rounds, args.memory_events, args.chat_only)
    )


if __name__ == "__main__":
    main()
