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
# How long stopping waits for the round in progress before cancelling it.
STOP_GRACE_SECONDS = 3.0


class Worker:
    def __init__(
        self,
        name: str,
        work_once: Callable[[], Awaitable[bool]],
        *,
        poll_interval: float = 2.0,
        gather_for: float = 0.0,
    ) -> None:
        self.name = name
        self._work_once = work_once
        self._poll_interval = poll_interval
        # Once woken, wait this long for more work before starting: under a stream of
        # transactions the queue is worked in batches (one write for many events),
        # not one round, and one database commit, per transaction.
        self._gather_for = gather_for
        self._wakeup = asyncio.Event()
        self._stop_asked = asyncio.Event()  # ends a gathering wait at once
        self._task: asyncio.Task[None] | None = None
        self.idle = asyncio.Event()
        self._stopping = False

    def wake(self) -> None:
        self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"worker:{self.name}")

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Let the round in progress finish, then stop; cancel it only if it overruns.

        Every round is safe to cut short (work is resumable), but cancelling one in
        the middle of a database transaction can leave its connection, and with
        SQLite the write lock, behind until the process exits.
        """
        if self._task is None:
            return
        self._stopping = True
        self._wakeup.set()
        self._stop_asked.set()
        done, _ = await asyncio.wait({self._task}, timeout=grace)
        if not done:
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        self._stopping = False
        self._stop_asked.clear()

    async def _run(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            try:
                busy = await self._work_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug must not stop the loop: the work stays queued and is retried.
                log.exception("%s worker failed; retrying in %.0fs", self.name, self._poll_interval)
                busy = False
            if busy and not self._stopping:
                self.idle.clear()
                continue
            self.idle.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._poll_interval)
            if self._gather_for and self._wakeup.is_set() and not self._stopping:
                # Stopping need not wait for the gathering: the work is queued either way.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_asked.wait(), self._gather_for)
