"""A thread of its own for blocking database work: a whole transaction per hand-over.

aiosqlite hands every statement to its connection's thread and back (BEGIN and
COMMIT included); Synapse instead runs a whole interaction on its database
thread. On the intake's path, where each hand-over costs more than the statement,
the second is what we want: `await WriterThread.run(work, ...)` runs `work` on the
thread and is woken once, with its result.

It is aiosqlite's own mechanism (one thread, a queue, `call_soon_threadsafe`),
not `loop.run_in_executor`, whose future chaining costs several times as much per
call on this path (measured with py-spy while writing bench/ingest.py's figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

_Job = tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]


def _settle(done: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(result)
    else:
        done.set_exception(error)


def _serve(jobs: SimpleQueue[_Job | None]) -> None:
    while (job := jobs.get()) is not None:
        loop, done, work, args = job
        result, error = None, None
        try:
            result = work(*args)
        except BaseException as exc:  # handed to the waiter, whatever it is
            error = exc
        # A closed loop (RuntimeError) has nobody waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, done, result, error)


class WriterThread:
    """Runs functions one at a time, in the order given, on one thread of its own.

    The thread starts on first use and ends at `stop()`, after what was handed to it.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: SimpleQueue[_Job | None] = SimpleQueue()
        self._thread: threading.Thread | None = None

    async def run(self, work: Callable[..., Any], *args: Any) -> Any:
        """`work(*args)` on the thread; its result or its exception.

        Once handed over, `work` runs to its end whatever happens here: a cancelled
        caller still waits for it (and is then cancelled), so whatever the caller holds
        (a turn to write) is held for as long as the work runs.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        if self._thread is None:
            self._thread = threading.Thread(
                target=_serve, args=(self._jobs,), name=self._name, daemon=True
            )
            self._thread.start()
        self._jobs.put((loop, done, work, args))
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            await asyncio.wait([done])
            raise

    def stop(self) -> None:
        """End the thread once it has run everything handed to it (without waiting)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None
            self._jobs = SimpleQueue()
