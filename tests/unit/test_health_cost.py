"""/health's cost does not grow with how often it is asked: a report is shared by the
requests that come together and reused for moments; the heartbeat is written at most
every HEARTBEAT_SECONDS while it succeeds, and at every report after one failed."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

import appservice.health as health_module
from appservice.health import HealthChecks
from bot.core.metrics import Metrics


def checks(engine: Any = None, intake: Any = None) -> HealthChecks:
    return HealthChecks(
        engine,
        engine,
        homeserver=None,  # type: ignore[arg-type]
        staff_room=None,  # type: ignore[arg-type]
        intake=intake,  # type: ignore[arg-type]
        metrics=Metrics(),
        connected=lambda: True,
    )


async def test_a_burst_of_requests_runs_the_checks_once():
    health = checks()
    runs = 0

    async def slow_check() -> dict[str, Any]:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.05)
        return {"ok": True}

    health._checks = {"only": slow_check}
    reports = await asyncio.gather(*(health.report() for _ in range(50)))
    assert runs == 1 and all(report == (True, {"only": {"ok": True}}) for report in reports)
    await health.report()
    assert runs == 1, "a report moments old is reused"
    await health.report(fresh=True)
    assert runs == 2, "an operator asking for the detail gets a fresh one"
    health._report_at -= health_module.REPORT_FRESH_SECONDS + 1
    await health.report()
    assert runs == 3, "and a stale one is made again"


@pytest.fixture
def heartbeats(monkeypatch):
    written: list[bool] = []
    failing = SimpleNamespace(now=False)

    async def write_heartbeat(_engine: Any) -> None:
        written.append(not failing.now)
        if failing.now:
            raise OSError("database or disk is full")

    monkeypatch.setattr(health_module, "write_heartbeat", write_heartbeat)
    return written, failing


async def test_the_heartbeat_is_written_at_most_every_few_seconds_while_it_succeeds(
    engine, heartbeats
):
    written, failing = heartbeats
    intake = SimpleNamespace(paused=None, last_write_error=None, last_write_failed_at=None)
    health = checks(engine, intake)
    for _ in range(5):
        assert (await health.database())["ok"]
    assert written == [True]
    health._heartbeat_at -= health_module.HEARTBEAT_SECONDS + 1
    failing.now = True
    for _ in range(3):
        result = await health.database()
        assert not result["ok"] and "full" in result["error"]
    assert written == [True, False, False, False], "a failed heartbeat is tried every time"
    failing.now = False
    assert (await health.database())["ok"]
    assert written[-1] is True
