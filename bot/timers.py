"""Timed jobs on APScheduler, with the one rule every job here needs: never skip.

APScheduler's default misfire_grace_time (1 s) silently drops a job that fell
due while the service was down; every job here runs however late, once
(coalesced), and is idempotent, because the database — not the job — is the truth.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler


class Timers:
    def __init__(self) -> None:
        self._scheduler = AsyncIOScheduler(timezone=dt.UTC)

    def start(self) -> None:
        if not self._scheduler.running:
            self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    @property
    def running(self) -> bool:
        return self._scheduler.running

    def at(
        self, job_id: str, when: dt.datetime, job: Callable[..., Awaitable[Any]], *args: Any
    ) -> None:
        self._scheduler.add_job(
            job,
            "date",
            run_date=when,
            args=list(args),
            id=job_id,
            replace_existing=True,
            misfire_grace_time=None,
            coalesce=True,
        )

    def every(
        self,
        job_id: str,
        interval: dt.timedelta,
        job: Callable[[], Awaitable[Any]],
        *,
        first: dt.datetime | None = None,
    ) -> None:
        self._scheduler.add_job(
            job,
            "interval",
            seconds=interval.total_seconds(),
            id=job_id,
            replace_existing=True,
            misfire_grace_time=None,
            coalesce=True,
            next_run_time=first,
        )

    def count(self, prefix: str = "") -> int:
        return sum(1 for job in self._scheduler.get_jobs() if job.id.startswith(prefix))
