"""Accepting a transaction: record it durably, fast, and queue only what may need action.

Every event id is recorded (so nothing is processed twice), but only events that
could matter to the policy — reactions with a flag key, messages carrying the
command, memberships, power levels, anything in the staff room or a member's
DM — are queued with their content. Ordinary chat stays out of the inbox: it
costs one id row, and a flag never waits behind it.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.context import PolicyContext
from bot.store import ingest
from bot.triggers import normalise_key

# Reactions staff use on the bot's own staff-room messages.
CLAIM_KEY = "✋"
ACK_KEY = "✅"
STATE_TYPES = frozenset(
    {"m.room.member", "m.room.power_levels", "m.room.create", "m.room.tombstone"}
)


class StorageUnavailable(Exception):
    """The database could not record a transaction; the homeserver must retry it."""


class ActionFilter:
    """The cheap test, run on every event on the hot path, of whether to queue it."""

    def __init__(self, context: PolicyContext) -> None:
        self._context = context
        self._keys = frozenset(normalise_key(k) for k in context.policy.reactions) | {
            normalise_key(CLAIM_KEY),
            normalise_key(ACK_KEY),
        }
        self._command = re.compile(re.escape(context.policy.command), re.IGNORECASE)

    def __call__(self, event: Mapping[str, Any]) -> bool:
        event_type = event["type"]
        if event_type in STATE_TYPES:
            return True
        if event["room_id"] in self._context.watched_rooms:
            return True
        content = event.get("content")
        if not isinstance(content, Mapping):
            return False
        if event_type in ("m.reaction", "m.room.encrypted"):
            relation = content.get("m.relates_to")
            if isinstance(relation, Mapping) and relation.get("rel_type") == "m.annotation":
                key = relation.get("key")
                return isinstance(key, str) and normalise_key(key) in self._keys
            return False
        if event_type == "m.room.message":
            body = content.get("body")
            return isinstance(body, str) and self._command.search(body) is not None
        return False


class Intake:
    def __init__(
        self,
        engine: AsyncEngine,
        context: PolicyContext,
        on_queued: Callable[[], None],
    ) -> None:
        self._engine = engine
        self._filter = ActionFilter(context)
        self._on_queued = on_queued
        self._metrics = context.metrics

    async def accept(self, txn_id: str, events: Sequence[Mapping[str, Any]]) -> ingest.Recorded:
        """Record a transaction of well-formed events in one DB transaction."""
        to_act_on = [event for event in events if self._filter(event)]
        now = dt.datetime.now(dt.UTC)
        try:
            async with self._engine.begin() as conn:
                recorded = await ingest.record_transaction(
                    conn, txn_id, [event["event_id"] for event in events], to_act_on, now
                )
        except (SQLAlchemyError, OSError) as exc:
            raise StorageUnavailable(str(exc)) from exc
        duplicates = len(events) - len(recorded.new_event_ids)
        self._metrics.transactions.labels(
            "duplicate" if recorded.duplicate_transaction else "new"
        ).inc()
        if duplicates:
            self._metrics.events.labels("duplicate").inc(duplicates)
        if recorded.new_event_ids:
            self._metrics.events.labels("new").inc(len(recorded.new_event_ids))
        if any(event["event_id"] in recorded.new_event_ids for event in to_act_on):
            self._on_queued()
        return recorded
