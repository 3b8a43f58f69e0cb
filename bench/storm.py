"""A flood of refused flags and a real one inside it: how much later is the member removed?

A non-moderator sends 200 🚨 reactions as fast as Synapse takes them; in the
middle, a moderator flags a member. Measured with Synapse's clock (the real
flag's reaction to the bot's kick), alternating rounds with a quiet room where
only the real flag is sent. Target: the stormy removal within 3× the quiet one.
Also printed: how many staff messages the storm caused (one per window).
Usage: python bench/storm.py [--rounds 3] [--storm 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.referral import event_ts, kick_ts, new_member
from tests.support.scene import (
    build_scene,
    open_group_room,
    running_service,
    service_config,
    until,
)
from tests.support.synapse import start_synapse


async def one_round(scene, troll, storm: int, number: int) -> float:
    member = await new_member(scene, f"r{number}-{storm}")
    said = await member.send_text(scene.group, "I can't take it any more")
    if storm:
        targets = [await member.send_text(scene.group, f"t{n}") for n in range(storm)]
        flood = [asyncio.create_task(troll.react(scene.group, t, "🚨")) for t in targets]
        await asyncio.sleep(0.2)  # the flood is under way
    reaction = await scene.moderator.react(scene.group, said, "🚨")
    reacted = await event_ts(scene.moderator, scene.group, reaction)
    if storm:
        await asyncio.gather(*flood)
    kick = await until(
        lambda: kick_ts(scene, member.user_id),
        within=120,
        interval=0.5,
        what="the kick",
    )
    return float(kick - reacted)


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="safeguard-storm-"))
    synapse = await start_synapse(work / "synapse")
    try:
        scene = await build_scene(synapse, work)
        config = service_config(
            synapse,
            work,
            database_url=f"sqlite+aiosqlite:///{work / 'safeguard.db'}",
            staff_room=scene.staff_room,
            staff=[scene.staff.user_id],
        )
        async with running_service(config):
            await open_group_room(scene)
            troll = await new_member(scene, "troll")
            quiet, stormy = [], []
            for number in range(args.rounds):
                quiet.append(await one_round(scene, troll, 0, number))
                stormy.append(await one_round(scene, troll, args.storm, number))
            refusals = await scene.staff_matching(lambda m: "refused" in m.lower())
        q, s = statistics.median(quiet), statistics.median(stormy)
        print(f"🚨 → kick, quiet room:            p50 {q:.0f} ms  ({quiet})")
        print(f"🚨 → kick, amid {args.storm} refused flags: p50 {s:.0f} ms  ({stormy})")
        print(f"ratio {s / q:.2f}× (target ≤ 3×); staff messages about refusals: {len(refusals)}")
    finally:
        await synapse.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--storm", type=int, default=200)
    asyncio.run(main(parser.parse_args()))
