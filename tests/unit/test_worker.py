"""The background loop: stopping lets a round finish, and cancels only one that overruns."""

from __future__ import annotations

import asyncio

from bot.core.worker import Worker


async def test_stop_lets_the_round_in_progress_finish():
    finished: list[int] = []
    started = asyncio.Event()

    async def round_() -> bool:
        started.set()
        await asyncio.sleep(0.2)  # e.g. a database transaction in flight
        finished.append(1)
        return True  # more work queued: the loop must not start another round

    worker = Worker("test", round_, poll_interval=60)
    worker.start()
    await started.wait()
    await worker.stop(grace=5)
    assert finished == [1]


async def test_stop_cancels_a_round_that_overruns_its_grace():
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def stuck() -> bool:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return False

    worker = Worker("test", stuck, poll_interval=60)
    worker.start()
    await started.wait()
    await worker.stop(grace=0.1)
    assert cancelled.is_set()


async def test_an_idle_worker_stops_at_once_and_can_start_again():
    rounds: list[int] = []

    async def idle() -> bool:
        rounds.append(1)
        return False

    worker = Worker("test", idle, poll_interval=60)
    worker.start()
    await asyncio.sleep(0.05)
    await asyncio.wait_for(worker.stop(grace=5), 1)
    worker.start()
    await asyncio.sleep(0.05)
    await worker.stop()
    assert len(rounds) == 2


async def test_stop_does_not_wait_out_a_gathering_pause():
    rounds: list[int] = []

    async def count() -> bool:
        rounds.append(1)
        return False

    worker = Worker("test", count, poll_interval=3600, gather_for=3600)
    worker.start()
    await asyncio.sleep(0)
    worker.wake()  # the loop now gathers for an hour before its next round
    await asyncio.sleep(0.05)
    # Were the pause waited out, this would hang (and the grace is as long as the pause).
    await asyncio.wait_for(worker.stop(grace=3600), timeout=30)
    assert rounds == [1], "no round started for stopping"
