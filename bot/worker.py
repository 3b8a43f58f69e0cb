"""One background loop shape for every durable queue (inbox, cases, outbox).

Each queue offers `work_once() -> bool` (True if it did something); the loop
runs it until there is nothing left, then sleeps until woken or until the poll
interval passes, so work persisted by a crashed run is picked up on start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Worker:
    def __init__(
        self, name: str, work_once: Callable[[], Awaitable[bool]], *, poll_interval: float = 2.0
    ) -> None:
        self.name = name
        self._work_once = work_once
        self._poll_interval = poll_interval
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.idle = asyncio.Event()

    def wake(self) -> None:
        self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"worker:{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            self._wakeup.clear()
            try:
                busy = await self._work_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug must not stop the loop: the work stays queued and is retried.
                log.exception("%s worker failed; retrying in %.0fs", self.name, self._poll_interval)
                busy = False
            if busy:
                self.idle.clear()
                continue
            self.idle.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._poll_interval)
