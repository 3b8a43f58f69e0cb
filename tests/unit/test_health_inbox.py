"""/health's inbox check: each lane's backlog, and not ok once a flag has waited too long."""

from __future__ import annotations

import datetime as dt
from typing import Any

from appservice.health import HealthChecks
from bot.core.metrics import Metrics
from bot.intake.accept import FLAG_LANE, REFUSAL_LANE
from tests.support.databases import record_events
from tests.support.policy import GROUP, MOD


def checks(engine: Any) -> HealthChecks:
    return HealthChecks(
        engine,
        engine,
        homeserver=None,  # type: ignore[arg-type]
        staff_room=None,  # type: ignore[arg-type]
        intake=None,  # type: ignore[arg-type]
        metrics=Metrics(),
        connected=lambda: True,
    )


def event(event_id: str) -> dict[str, Any]:
    return {"event_id": event_id, "room_id": GROUP, "type": "m.reaction", "sender": MOD}


async def test_lanes_are_reported_and_a_flag_waiting_too_long_is_not_ok(engine):
    now = dt.datetime.now(dt.UTC)
    junk = [(event(f"$junk{n}"), REFUSAL_LANE) for n in range(40)]
    await record_events(engine, "junk", [e["event_id"] for e, _ in junk], junk, now)
    report = await checks(engine).inbox()
    assert report["ok"], "junk waiting in its own lane is no fault"
    assert report["lanes"]["refusals"]["backlog"] == 40
    assert report["lanes"]["flags"] == {"backlog": 0, "oldest_seconds": 0.0}
    stuck = [(event("$flag"), FLAG_LANE)]
    await record_events(engine, "flag", ["$flag"], stuck, now - dt.timedelta(seconds=45))
    report = await checks(engine).inbox()
    assert not report["ok"] and "a flag has waited 4" in report["problem"]
    assert report["lanes"]["flags"]["backlog"] == 1
