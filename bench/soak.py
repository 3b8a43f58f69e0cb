"""Soak: realistic chat with flags inside, the service and Synapse restarted along the way.

A real Synapse and the service (as a separate process, so it can be killed) run
for --minutes. Members chat; every --flag-every seconds a moderator flags a
member who is in the room with no open case; a removed member is invited back
once removed (which ends their case, so they can be flagged again). Along the
way the service is killed (SIGKILL) and Synapse stopped (alternately SIGTERM
and SIGKILL), --restarts times in all, spread over the run.

Prints: flags sent, cases expected vs opened vs complete (notify, remove,
alert, schedule done), duplicates (a member removed, notified or a case alerted
more than once), and the service's RSS at its first start and at the end.
Usage: python bench/soak.py [--minutes 30] [--restarts 6] [--flag-every 20] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appservice.database import create_engine
from bench.memory import rss_mib
from bot.core.ports import MESSAGE_MARKER_KEY
from bot.store import cases as case_store
from tests.support.matrix_user import MatrixError, q
from tests.support.scene import (
    BOT,
    build_scene,
    open_group_room,
    running_service,
    service_config,
)
from tests.support.synapse import start_synapse

REFERRAL = ("notify", "remove", "alert", "schedule")


class ServiceProcess:
    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> int:
        with open(self.log, "ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "appservice.cli",
                "run",
                "-c",
                str(self.config),
                stdout=out,
                stderr=out,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return self.process.pid

    async def kill(self) -> None:
        if self.process and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()

    async def stop(self) -> None:
        if self.process and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            await self.process.wait()


async def tolerant(call: Any, *args: Any, tries: int = 60) -> Any:
    """A Client-Server call by a test user, retried while Synapse is restarting."""
    for _ in range(tries):
        try:
            return await call(*args)
        except (TimeoutError, MatrixError, OSError) as exc:
            if isinstance(exc, MatrixError) and exc.status < 500 and exc.status != 429:
                raise
            await asyncio.sleep(1)
        except Exception:  # aiohttp connection errors while Synapse is down
            await asyncio.sleep(1)
    raise RuntimeError(f"{getattr(call, '__name__', call)} kept failing")


async def membership_events(user: Any, room: str) -> list[dict[str, Any]]:
    """Every m.room.member event of the room, paginating back (chat is filtered out)."""
    events: list[dict[str, Any]] = []
    token = None
    while True:
        params = {"dir": "b", "limit": "500", "filter": json.dumps({"types": ["m.room.member"]})}
        if token:
            params["from"] = token
        page = await user.request("GET", f"/_matrix/client/v3/rooms/{q(room)}/messages", **params)
        events.extend(page.get("chunk", []))
        token = page.get("end")
        if not page.get("chunk") or not token:
            return events


async def soak(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="safeguard-soak-"))
    synapse = await start_synapse(work / "synapse")
    scene = await build_scene(synapse, work)
    config = service_config(
        synapse,
        work,
        database_url=f"sqlite+aiosqlite:///{work / 'safeguard.db'}",
        staff_room=scene.staff_room,
        staff=[scene.staff.user_id],
        reconcile={"interval": "15s"},
    )
    async with running_service(config):
        await open_group_room(scene)
        members = [scene.member]
        for n in range(args.members - 1):
            user = await synapse.new_user(f"soak{n}")
            await scene.owner.invite(scene.group, user.user_id)
            await user.join(scene.group)
            members.append(user)
    service = ServiceProcess(config, work / "service.log")
    first_pid = await service.start()
    await asyncio.sleep(3)
    rss_start = rss_mib(first_pid)
    end = time.monotonic() + args.minutes * 60
    restart_times = sorted(
        time.monotonic() + (i + 1) * args.minutes * 60 / (args.restarts + 1)
        for i in range(args.restarts)
    )
    flagged: list[str] = []
    out_of_room: set[str] = set()
    messages = 0
    restarts: Counter[str] = Counter()
    next_flag = time.monotonic() + args.flag_every

    async def bring_back(user: Any) -> None:
        """Once removed, the member is invited back and rejoins (their case stops collecting)."""
        for _ in range(300):
            members_now = await tolerant(scene.owner.members, scene.group)
            if members_now.get(user.user_id) == "leave":
                await tolerant(scene.owner.invite, scene.group, user.user_id)
                await tolerant(user.join, scene.group)
                await asyncio.sleep(2)
                out_of_room.discard(user.user_id)
                return
            await asyncio.sleep(1)

    returns: list[asyncio.Task[None]] = []
    while time.monotonic() < end:
        if restart_times and time.monotonic() >= restart_times[0]:
            restart_times.pop(0)
            turn = sum(restarts.values())
            if turn % 2 == 0:
                await service.kill()
                await asyncio.sleep(rng.uniform(0.5, 3))
                await service.start()
                restarts["service SIGKILL"] += 1
            else:
                kill = turn % 4 == 3
                await synapse.restart(kill=kill, down_for=rng.uniform(2, 10))
                restarts["Synapse " + ("SIGKILL" if kill else "SIGTERM")] += 1
        present = [m for m in members if m.user_id not in out_of_room]
        if present:
            talker = rng.choice(present)
            try:
                said = await talker.send_text(scene.group, f"chat {messages} about the weekend")
                messages += 1
            except Exception:
                await asyncio.sleep(1)
                continue
            if time.monotonic() >= next_flag:
                try:
                    await scene.moderator.react(scene.group, said, "🚨")
                except Exception:
                    continue  # Synapse is away: flag someone a moment later
                next_flag = time.monotonic() + args.flag_every
                flagged.append(talker.user_id)
                out_of_room.add(talker.user_id)
                returns.append(asyncio.create_task(bring_back(talker)))
        await asyncio.sleep(1 / args.chat_rate)

    print(f"chat over: {messages} messages, {len(flagged)} flags; letting every case finish")
    engine = create_engine(f"sqlite+aiosqlite:///{work / 'safeguard.db'}")
    deadline = time.monotonic() + 300
    complete = opened = 0
    while time.monotonic() < deadline:
        async with engine.connect() as conn:
            found = await case_store.listing(conn)
            complete = 0
            for case in found:
                steps = {s.step: s.status for s in await case_store.steps_of(conn, case.id)}
                complete += all(steps.get(name) == "done" for name in REFERRAL)
            opened = len(found)
        if opened >= len(flagged) and complete >= opened:
            break
        await asyncio.sleep(2)
    await asyncio.sleep(3)
    assert service.process is not None
    rss_end = rss_mib(service.process.pid)
    for task in returns:
        task.cancel()

    kicks: Counter[str] = Counter()
    for event in await membership_events(scene.owner, scene.group):
        if event["sender"] == BOT and event["content"].get("membership") == "leave":
            kicks[event["state_key"]] += 1
    flags_per_member = Counter(flagged)
    removed_twice = {
        user: kicks[user] - count for user, count in flags_per_member.items() if kicks[user] > count
    }
    notices: Counter[int] = Counter()
    for user in members:
        for room in await user.invited_rooms():
            await user.join(room)
        for room in await user.joined_rooms():
            if room == scene.group:
                continue
            for event in await user.messages(room, limit=500):
                tag = event.get("content", {}).get(MESSAGE_MARKER_KEY) or {}
                if tag.get("step") == "notify":
                    notices[tag["case"]] += 1
    alerts: Counter[int] = Counter()
    for event in await scene.staff.messages(scene.staff_room, limit=1000):
        tag = event.get("content", {}).get(MESSAGE_MARKER_KEY) or {}
        if tag.get("step") == "alert":
            alerts[tag["case"]] += 1
    duplicates = (
        sum(removed_twice.values())
        + sum(n - 1 for n in notices.values() if n > 1)
        + sum(n - 1 for n in alerts.values() if n > 1)
    )
    await service.stop()
    await engine.dispose()
    await synapse.close()
    print(f"duration: {args.minutes} min, chat messages: {messages}, restarts: {dict(restarts)}")
    print(f"cases expected: {len(flagged)}, opened: {opened}, complete: {complete}")
    print(f"duplicates (removals, notices, alerts beyond one per case): {duplicates}")
    print(f"service RSS: {rss_start:.0f} MiB at start, {rss_end:.0f} MiB at the end")
    print(f"(logs and database in {work})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--restarts", type=int, default=6)
    parser.add_argument("--flag-every", type=float, default=20, help="seconds between flags")
    parser.add_argument("--chat-rate", type=float, default=4, help="messages per second")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    asyncio.run(soak(parser.parse_args()))


if __name__ == "__main__":
    main()
