"""A poisoned event is recorded, counted and reported; the events behind it still flow."""

from __future__ import annotations

import datetime as dt
import json
import logging

import pytest

from appservice.database import create_engine, upgrade
from appservice.logs import JsonFormatter
from bot.dispatch import Dispatcher
from bot.store import audit, ingest, outbox
from tests.support.fake_homeserver import FakeHomeserver
from tests.unit.test_workflow import GROUP, MEMBER, MOD, STAFF, context, homeserver

NOW = dt.datetime(2026, 11, 24, 12, tzinfo=dt.UTC)


@pytest.fixture
async def engine(tmp_path):
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'd.db'}")
    await upgrade(engine)
    yield engine
    await engine.dispose()


def flag(event_id: str) -> dict:
    return {
        "event_id": event_id,
        "room_id": GROUP,
        "type": "m.room.message",
        "sender": MOD,
        "origin_server_ts": 1,
        "content": {"body": f"!safeguard {MEMBER}"},
    }


async def queue(engine, *events: dict) -> None:
    async with engine.begin() as conn:
        await ingest.record_transaction(
            conn, "t", [e["event_id"] for e in events], list(events), NOW
        )


class Exploding(FakeHomeserver):
    def __init__(self, fail_for: set[str]) -> None:
        super().__init__()
        self.fail_for = fail_for
        self.current = ""

    async def room_state(self, room_id):
        if self.current in self.fail_for:
            raise ValueError("a bug in a handler")
        return await super().room_state(room_id)


async def test_poisoned_event_is_recorded_and_the_next_one_processed(engine):
    hs = homeserver()
    exploding = Exploding({"$bad"})
    exploding.rooms = hs.rooms
    dispatcher = Dispatcher(
        engine, exploding, context(), on_case=lambda case_id: None, on_outbox=lambda: None
    )
    original = dispatcher._handle

    async def tracking(item):
        exploding.current = item.event_id
        await original(item)

    dispatcher._handle = tracking
    await queue(engine, flag("$bad"), flag("$good"))
    await dispatcher.work_once()
    async with engine.connect() as conn:
        assert await ingest.pending(conn) == []
        entries = await audit.entries(conn)
        messages = await outbox.pending(conn)
    kinds = [e.kind for e in entries]
    assert kinds == ["event_failed", "flagged"]
    assert entries[0].facts["event"] == "$bad" and "ValueError" in entries[0].facts["error"]
    assert any("could not be processed" in m.content["body"] for m in messages)
    assert messages[0].room_id == STAFF
    errors = dispatcher._ctx.metrics.registry.get_sample_value(
        "safeguard_errors_total", {"where": "event"}
    )
    assert errors == 1


async def test_homeserver_outage_keeps_the_event_queued_in_order(engine):
    hs = homeserver()
    hs.unavailable_for = {"room_state"}
    dispatcher = Dispatcher(
        engine,
        hs,
        context(),
        on_case=lambda case_id: None,
        on_outbox=lambda: None,
        retry_delays=(0,),
    )
    await queue(engine, flag("$first"), flag("$second"))
    await dispatcher.work_once()
    async with engine.connect() as conn:
        assert [i.event_id for i in await ingest.pending(conn)] == ["$first", "$second"]
        assert await audit.entries(conn) == []
    hs.unavailable_for = set()
    await dispatcher.work_once()
    async with engine.connect() as conn:
        assert await ingest.pending(conn) == []
        kinds = [e.kind for e in await audit.entries(conn)]
    assert kinds == ["flagged", "corroborated"]


def test_json_logs_carry_the_case_number_and_no_extras():
    record = logging.LogRecord(
        "bot.workflow", logging.INFO, __file__, 1, "case #%d: %s", (4, "x"), None
    )
    record.case = 4
    line = json.loads(JsonFormatter().format(record))
    assert line["case"] == 4 and line["message"] == "case #4: x" and line["level"] == "INFO"
