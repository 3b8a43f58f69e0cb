"""Periodic jobs on APScheduler (housekeeping, the daily chain-head post), with the rules
every job here needs: never skip, never die.

APScheduler's default misfire_grace_time (1 s) silently drops a run that fell
due while the event loop was busy; every run here happens however late, once
(coalesced). A job that raises is logged and runs again at its next time.
Case work that falls due (check-ins, reminders, escalations) is not here: it is
a step of its case, run by the step engine from the database.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

log = logging.getLogger(__name__)
Job = Callable[[], Awaitable[Any]]


class Timers:
    def __init__(self) -> None:
        self._scheduler = AsyncIOScheduler(timezone=dt.UTC)
        self._running: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        if not self._scheduler.running:
            self._scheduler.start()

    async def stop(self) -> None:
        """Stop firing and cancel runs in flight: each job is idempotent."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        for task in self._running:
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    def pause(self) -> None:
        """Fire nothing until `resume` (runs that fall due meanwhile run then, once)."""
        if self._scheduler.running:
            self._scheduler.pause()

    def resume(self) -> None:
        if self._scheduler.running:
            self._scheduler.resume()

    def every(
        self, job_id: str, interval: dt.timedelta, job: Job, *, first: dt.datetime | None = None
    ) -> None:
        """Run `job` every `interval`, first at `first` (default: one interval from now)."""
        options: dict[str, Any] = {}
        if first is not None:
            # Passing next_run_time=None would add the job paused: it would never run.
            options["next_run_time"] = first
        self._scheduler.add_job(
            self._run,
            "interval",
            seconds=interval.total_seconds(),
            args=[job_id, job],
            id=job_id,
            replace_existing=True,
            misfire_grace_time=None,
            coalesce=True,
            **options,
        )

    def next_run(self, job_id: str) -> dt.datetime | None:
        job = self._scheduler.get_job(job_id)
        return job.next_run_time if job is not None else None

    def job_ids(self) -> list[str]:
        return [job.id for job in self._scheduler.get_jobs()]

    async def _run(self, job_id: str, job: Job) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._running.add(task)
        try:
            await job()
        except asyncio.CancelledError:
            # Only stop() cancels a job; ending quietly keeps shutdown out of the error log.
            log.info("timed job %s stopped with the service", job_id)
        except Exception:
            log.exception("timed job %s failed; it runs again at its next time", job_id)
        finally:
            self._running.discard(task)
