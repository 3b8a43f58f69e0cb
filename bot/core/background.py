"""A loop of the policy core run as one background task, woken early by `trigger()`."""

from __future__ import annotations

import asyncio
import contextlib


class TriggeredLoop:
    """start/trigger/stop for a class whose `_loop` waits on `self._trigger` between
    rounds; the class sets `_trigger` (an asyncio.Event) and `_task` (None) itself."""

    TASK_NAME = "loop"
    _trigger: asyncio.Event
    _task: asyncio.Task[None] | None

    async def _loop(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self.TASK_NAME)

    def trigger(self) -> None:
        """A gap just ended (the homeserver answers again): catch up now, not later."""
        self._trigger.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
