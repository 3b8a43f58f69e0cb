"""Check-in scheduling at scale: 10,000 pending check-ins in the database.

Measures, against a real Synapse: how long the service takes from start until
every pending check-in is scheduled, how late the first due check-in fires
(it is due 3 s after the service starts), and the process's memory before and
after scheduling. The floor for the start time is reading the same rows
without scheduling them.
Usage: python bench/checkin.py [--pending 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appservice.config import load_config
from appservice.database import create_engine, upgrade
from appservice.service import Service
from bot.referral import CASE_STEPS
from bot.store import cases
from bot.store.schema import case_steps
from bot.store.schema import cases as cases_table
from tests.support.scene import build_scene, service_config
from tests.support.synapse import start_synapse


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def seed(database_url: str, pending: int, first_due: dt.datetime) -> None:
    engine = create_engine(database_url)
    await upgrade(engine)
    now = dt.datetime.now(dt.UTC)
    rows, steps = [], []
    for number in range(1, pending + 1):
        # The first is due just after start; the rest over the next week.
        due = first_due if number == 1 else now + dt.timedelta(hours=1, seconds=number * 60)
        rows.append(
            {
                "id": number,
                "room_id": "!group:localhost",
                "member_id": f"@m{number}:localhost",
                "active_key": None,
                "state": "open",
                "dry_run": False,
                "flagged_at": now,
                "received_at": now,
                "due_at": due,
            }
        )
        for position, step in enumerate(CASE_STEPS):
            steps.append(
                {
                    "case_id": number,
                    "step": step,
                    "position": position,
                    "status": "pending" if step == "checkin" else "done",
                }
            )
    async with engine.begin() as conn:
        await conn.execute(cases_table.insert(), rows)
        await conn.execute(case_steps.insert(), steps)
    await engine.dispose()


async def floor_read(database_url: str) -> float:
    engine = create_engine(database_url)
    started = time.perf_counter()
    async with engine.connect() as conn:
        found = await cases.with_pending_checkin(conn)
    elapsed = time.perf_counter() - started
    await engine.dispose()
    assert found
    return elapsed


async def run(pending: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="safeguard-bench-checkin-"))
    synapse = await start_synapse(work / "synapse")
    try:
        scene = await build_scene(synapse, work)
        database_url = f"sqlite+aiosqlite:///{work / 'bench.db'}"
        config = service_config(
            synapse,
            work,
            database_url=database_url,
            staff_room=scene.staff_room,
            staff=[scene.staff.user_id],
        )
        # Case 1's due time is set just before the start (below); seed a placeholder.
        await seed(database_url, pending, dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
        floor_seconds = await floor_read(database_url)

        service = Service(load_config(config), connect_retry_seconds=0.5)
        fired: list[float] = []
        original = service.checkins.open

        async def timed_open(case_id: int) -> None:
            if case_id == 1 and not fired:
                fired.append(time.time())
            await original(case_id)

        service.checkins.open = timed_open  # type: ignore[method-assign]
        # Due 3 s from now: the service must start, schedule 10,000 jobs and fire it.
        due = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
        engine = create_engine(database_url)
        async with engine.begin() as conn:
            await cases.set_fields(conn, 1, due_at=due)
        await engine.dispose()
        memory_before = rss_mib()
        started = time.perf_counter()
        await service.start()
        await service.connected.wait()
        scheduled_after = time.perf_counter() - started
        jobs = service.checkins.job_count
        memory_after = rss_mib()
        for _ in range(100):
            if fired:
                break
            await asyncio.sleep(0.1)
        await service.stop()
    finally:
        await synapse.close()

    print(f"check-in benchmark: {pending} pending check-ins, SQLite, real Synapse")
    print(
        f"  start → all scheduled:      {scheduled_after * 1000:8.0f} ms "
        f"({jobs} jobs; floor: reading the rows alone {floor_seconds * 1000:.0f} ms)"
    )
    if fired:
        late = fired[0] - due.timestamp()
        print(f"  first due check-in fired:   {late * 1000:8.0f} ms after its due time")
    else:
        print("  first due check-in fired:   NOT within 10 s")
    print(
        f"  memory (RSS):               {memory_before:8.0f} MiB before, "
        f"{memory_after:.0f} MiB scheduled (+{memory_after - memory_before:.0f} MiB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pending", type=int, default=10_000)
    asyncio.run(run(parser.parse_args().pending))


if __name__ == "__main__":
    main()
