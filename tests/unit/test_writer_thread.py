"""The intake's thread for whole SQLite transactions (bot/store/writer_thread.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from bot.store.writer_thread import WriterThread


async def test_work_runs_on_its_own_thread_in_the_order_given():
    thread = WriterThread("test-writer")
    ran: list[tuple[int, str]] = []

    def work(number: int) -> int:
        ran.append((number, threading.current_thread().name))
        return number * 10

    try:
        results = await asyncio.gather(*(thread.run(work, n) for n in range(20)))
    finally:
        thread.stop()
    assert results == [n * 10 for n in range(20)]
    assert [number for number, _ in ran] == list(range(20))
    assert {name for _, name in ran} == {"test-writer"}


async def test_an_exception_reaches_the_caller_and_the_thread_goes_on():
    thread = WriterThread("test-writer")

    def fail() -> None:
        raise ValueError("refused")

    try:
        with pytest.raises(ValueError, match="refused"):
            await thread.run(fail)
        assert await thread.run(lambda: "still here") == "still here"
    finally:
        thread.stop()


async def test_a_cancelled_caller_waits_until_its_work_has_ended():
    """What the caller holds (the turn to write) must be held while the work runs."""
    thread = WriterThread("test-writer")
    started, release = threading.Event(), threading.Event()
    finished: list[str] = []

    def slow() -> None:
        started.set()
        release.wait(10)
        finished.append("committed")

    try:
        caller = asyncio.create_task(thread.run(slow))
        await asyncio.to_thread(started.wait, 10)
        caller.cancel()
        await asyncio.sleep(0.2)
        assert not caller.done(), "a cancelled caller returned while its work still ran"
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert finished == ["committed"]
    finally:
        release.set()
        thread.stop()


async def test_stop_ends_the_thread_after_its_work_and_a_later_run_starts_another():
    thread = WriterThread("test-writer-stop")

    def running() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "test-writer-stop"]

    first = await thread.run(threading.current_thread)
    thread.stop()
    first.join(5)
    assert not first.is_alive() and not running()
    second = await thread.run(threading.current_thread)
    try:
        assert second is not first and second.is_alive()
    finally:
        thread.stop()
    second.join(5)
    assert not second.is_alive()
