"""Pending check-ins at scale: our service against the floor, in the same run.

N open cases (default 10,000) are seeded as real cases look while they wait
for their check-in: opened by the store's own `open_or_corroborate`, every
immediate step finished (the alert acknowledged), the check-in and the two
staff steps that follow it pending, the case's `next_attempt_at` at the
check-in's due time. Case 1 is due 3 s after the service starts; the rest
over the next week. Then, against a real Synapse:
  - floor: reading those cases' ids and due times with the raw driver
    (aiosqlite, no project code);
  - ours:  what the pending check-ins add to getting ready: from
    `Service.start()` until the step engine has read its due cases and armed
    its one timer (`StepEngine.ready`), median over alternating starts on the
    seeded database and on an empty one (the homeserver handshake, migrations
    and the rest cost the same for both); the engine's own part is shown too;
  - how late case 1's check-in starts (and finishes: a room opened on
    Synapse), read from its step record;
  - the process's memory (RSS) before the start, once ready, and after case 1.
Seeding runs in a child process, so its memory is not counted.
Usage: python bench/checkin.py [--pending 10000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appservice.config import load_config
from appservice.database import create_engine
from appservice.service import Service
from bench.memory import rss_mib
from bench.seeding import CHECKIN_AFTER, WaitingCase, seed_waiting_cases
from bot.store import cases
from bot.store.schema import case_steps
from tests.support.scene import build_scene, service_config
from tests.support.synapse import start_synapse

FIRST_DUE_AFTER_START = 3.0  # seconds
FLOOR_QUERY = (
    "SELECT c.id, c.due_at, c.next_attempt_at FROM cases c "
    "JOIN case_steps s ON s.case_id = c.id "
    "WHERE s.step = 'checkin' AND s.status IN ('pending', 'started') AND c.state = 'open'"
)


def sqlite_path(database_url: str) -> str:
    return database_url.split(":///", 1)[1]


# ---- seeding (in a child process) ----------------------------------------------------------


async def seed(config_path: Path, pending: int, member: str) -> None:
    """Room ids the bot is not in (bench/scale.py seeds real rooms)."""
    server = load_config(config_path).bot_user_id.split(":", 1)[1]
    waiting = [
        WaitingCase(
            member=member if number == 1 else f"@bench-{number}:{server}",
            dm_room=f"!dm-{number}:{server}",
            debrief_room=f"!debrief-{number}:{server}",
        )
        for number in range(1, pending + 1)
    ]
    await seed_waiting_cases(config_path, f"!group:{server}", f"@moderator:{server}", waiting)


async def seed_in_child(config_path: Path, pending: int, member: str) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--seed", str(config_path), str(pending), member
    )
    if await child.wait() != 0:
        raise RuntimeError("seeding failed")


async def arm_first(database_url: str, due: dt.datetime) -> None:
    """Case 1 due at `due`, as if flagged CHECKIN_AFTER before (its schedule step says so)."""
    engine = create_engine(database_url)
    async with engine.begin() as conn:
        flagged = due - CHECKIN_AFTER
        await cases.set_fields(
            conn, 1, due_at=due, flagged_at=flagged, received_at=flagged, next_attempt_at=due
        )
        await conn.execute(
            case_steps.update()
            .where(case_steps.c.case_id == 1, case_steps.c.step == "schedule")
            .values(result={"due_at": due.isoformat()})
        )
    await engine.dispose()


# ---- measuring -----------------------------------------------------------------------------


async def floor_read(database_url: str, pending: int, rounds: int = 5) -> float:
    """Median time to read the pending check-ins' ids and due times, raw driver."""
    times = []
    async with aiosqlite.connect(sqlite_path(database_url)) as db:
        for _ in range(rounds):
            started = time.perf_counter()
            async with db.execute(FLOOR_QUERY) as cursor:
                rows = await cursor.fetchall()
            times.append(time.perf_counter() - started)
            assert len(rows) == pending, (len(rows), pending)
    return statistics.median(times)


async def checkin_record(database_url: str, within: float) -> tuple[str, dict[str, str | None]]:
    """Wait for case 1's check-in to finish; its step row and due time."""
    deadline = time.monotonic() + within
    query = (
        "SELECT s.status, s.started_at, s.finished_at, c.due_at FROM case_steps s "
        "JOIN cases c ON c.id = s.case_id WHERE s.case_id = 1 AND s.step = 'checkin'"
    )
    async with aiosqlite.connect(sqlite_path(database_url)) as db:
        while True:
            async with db.execute(query) as cursor:
                status, started, finished, due = await cursor.fetchone()
            if status in ("done", "failed", "skipped") or time.monotonic() > deadline:
                return status, {"started": started, "finished": finished, "due": due}
            await asyncio.sleep(0.05)


def stored_time(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC)


@dataclass
class Started:
    """One start of the service: from `Service.start()`, and from the engine's own start,
    until the engine has read its due cases and armed its timer."""

    service: Service
    from_start: float
    from_engine_start: float


async def start_until_ready(config: Path) -> Started:
    service = Service(load_config(config), connect_retry_seconds=0.5)
    engine_started: list[float] = []
    start_engine = service.steps.start

    def timed_start() -> None:  # the bench's own hook: the service is not changed
        engine_started.append(time.perf_counter())
        start_engine()

    service.steps.start = timed_start  # type: ignore[method-assign]
    started = time.perf_counter()
    await service.start()
    await asyncio.wait_for(service.steps.ready.wait(), 60)
    ready = time.perf_counter()
    return Started(service, ready - started, ready - engine_started[0])


def fresh_copy(pristine: Path, database: Path) -> None:
    """Every start reads the same rows: the database as seeded (WAL checkpointed on close)."""
    for suffix in ("-wal", "-shm"):
        database.with_name(database.name + suffix).unlink(missing_ok=True)
    shutil.copyfile(pristine, database)
    # Written out before the start, so that no start pays for the copy's write-back.
    with open(database, "rb+") as copied:
        os.fsync(copied.fileno())


async def run(pending: int, rounds: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="safeguard-bench-checkin-"))
    synapse = await start_synapse(work / "synapse")
    try:
        scene = await build_scene(synapse, work)
        configs, databases = {}, {}
        for label in ("none", "pending"):
            (work / label).mkdir()
            databases[label] = work / label / "bench.db"
            configs[label] = service_config(
                synapse,
                work / label,
                database_url=f"sqlite+aiosqlite:///{databases[label]}",
                staff_room=scene.staff_room,
                staff=[scene.staff.user_id],
                checkin={"after": f"{CHECKIN_AFTER.days}d"},
                # One bot device, whichever database: as a deployment has.
                encryption={"private_rooms": False, "store": str(work / "crypto")},
            )
        seeding = time.perf_counter()
        await seed_in_child(configs["pending"], pending, scene.member.user_id)
        seeded_in = time.perf_counter() - seeding
        await seed_in_child(configs["none"], 0, scene.member.user_id)
        pristine = {label: path.with_name("seeded.db") for label, path in databases.items()}
        for label, path in databases.items():
            shutil.copyfile(path, pristine[label])
        url = f"sqlite+aiosqlite:///{databases['pending']}"
        floor_seconds = await floor_read(url, pending)

        # First, in a fresh process: case 1 due 3 s after the start; memory; lateness.
        due = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=FIRST_DUE_AFTER_START)
        await arm_first(url, due)
        memory_before = rss_mib()
        first = await start_until_ready(configs["pending"])
        memory_ready = rss_mib()
        status, record = await checkin_record(url, within=30)
        memory_after = rss_mib()
        await first.service.stop()

        # Then what the pending check-ins add to getting ready: alternating starts on the
        # seeded database and on an empty one (nothing due during these).
        times: dict[str, list[Started]] = {"none": [], "pending": []}
        for number in range(rounds):
            order = ("none", "pending") if number % 2 == 0 else ("pending", "none")
            for label in order:
                fresh_copy(pristine[label], databases[label])
                result = await start_until_ready(configs[label])
                await result.service.stop()
                times[label].append(result)
    finally:
        await synapse.close()

    def median(label: str, figure: str) -> float:
        return statistics.median(getattr(result, figure) for result in times[label]) * 1000

    added = median("pending", "from_start") - median("none", "from_start")
    ratio = added / (floor_seconds * 1000)
    print(
        f"check-in benchmark: {pending} pending check-ins, SQLite, real Synapse, "
        f"{rounds} alternating starts (medians; seeded in {seeded_in:.0f} s)"
    )
    print(f"{'':22} {'start -> ready ms':>18} {'engine -> armed ms':>19}")
    for label, name in (("none", "none pending"), ("pending", f"{pending} pending")):
        whole, engine = median(label, "from_start"), median(label, "from_engine_start")
        print(f"{name:22} {whole:>18.1f} {engine:>19.1f}")
    print(f"{'floor: read the rows':22} {floor_seconds * 1000:>18.1f}   (raw aiosqlite)")
    print(
        f"ratio (added by {pending} pending: {added:.1f} ms) / floor: {ratio:.2f} "
        f"(target <= 2.00) -> {'OK' if ratio <= 2.0 else 'BELOW'}"
    )
    began, ended = stored_time(record["started"]), stored_time(record["finished"])
    due_at = stored_time(record["due"])
    if began is None or due_at is None:
        print(f"first due check-in: NOT started within 30 s of its due time -> BELOW ({status})")
    else:
        late = (began - due_at).total_seconds()
        done = f", {status} {(ended - due_at).total_seconds() * 1000:.0f} ms" if ended else ""
        print(
            f"first due check-in: started {late * 1000:.0f} ms after its due time{done} "
            f"(target < 1000 ms) -> {'OK' if late < 1.0 and status == 'done' else 'BELOW'}"
        )
    print(
        f"memory (RSS): {memory_before:.0f} MiB before start, {memory_ready:.0f} MiB ready, "
        f"{memory_after:.0f} MiB after the first check-in (target < 150 MiB) -> "
        f"{'OK' if max(memory_ready, memory_after) < 150 else 'BELOW'}"
    )


def main() -> None:
    if sys.argv[1:2] == ["--seed"]:
        config_path, pending, member = sys.argv[2:5]
        asyncio.run(seed(Path(config_path), int(pending), member))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pending", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(run(args.pending, args.rounds))


if __name__ == "__main__":
    main()
