"""Timed jobs on APScheduler, with the one rule every job here needs: never skip.

APScheduler's default misfire_grace_time (1 s) silently drops a job that fell
due while the service was down; every job here runs however late, once
(coalesced), and is idempotent, because the database — not the job — is the truth.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

log = logging.getLogger(__name__)
Job = Callable[..., Awaitable[Any]]


class Timers:
    def __init__(self) -> None:
        self._scheduler = AsyncIOScheduler(timezone=dt.UTC)
        self._running: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        if not self._scheduler.running:
            self._scheduler.start()

    async def stop(self) -> None:
        """Stop firing and cancel jobs in flight: each is idempotent and re-created at start."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        for task in self._running:
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    @property
    def running(self) -> bool:
        return self._scheduler.running

    def at(self, job_id: str, when: dt.datetime, job: Job, *args: Any) -> None:
        self._scheduler.add_job(
            self._run,
            "date",
            run_date=when,
            args=[job, *args],
            id=job_id,
            replace_existing=True,
            misfire_grace_time=None,
            coalesce=True,
        )

    def every(
        self, job_id: str, interval: dt.timedelta, job: Job, *, first: dt.datetime | None = None
    ) -> None:
        self._scheduler.add_job(
            self._run,
            "interval",
            seconds=interval.total_seconds(),
            args=[job],
            id=job_id,
            replace_existing=True,
            misfire_grace_time=None,
            coalesce=True,
            next_run_time=first,
        )

    def count(self, prefix: str = "") -> int:
        return sum(1 for job in self._scheduler.get_jobs() if job.id.startswith(prefix))

    async def _run(self, job: Job, *args: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._running.add(task)
        try:
            await job(*args)
        except asyncio.CancelledError:
            # Only stop() cancels a job; ending quietly keeps shutdown out of the error log.
            log.info("timed job %s stopped with the service", getattr(job, "__name__", job))
        finally:
            self._running.discard(task)
