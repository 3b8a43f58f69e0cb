"""Catching up on events the homeserver never delivered.

Synapse keeps the events it has yet to send an application service in memory;
when it restarts, they are gone (its stream position has already moved past
them). So after any gap — the service starting, the homeserver answering again
after an outage, and every `reconcile.interval` in any case (a restart nobody
noticed) — each watched room's timeline is read forwards from the position
last read, and every event found goes through the same intake as a
transaction's: deduplicated by event id, so nothing runs twice, and marked
"caught up" so the record says how the flag reached us. A room never read
before is read back `reconcile.lookback` (default 24 h), but never to before
the bot was put in it (a flag raised before the charity enrolled the room is
not the bot's to act on); older events are not acted on.

Nothing from before this database first started is fed, and the staff room's
first read feeds nothing at all: a fresh or restored database must never run
the last day's `!case` commands again. A flag older than the look-back, found
after a long outage, is fed all the same, to be refused as found too late and
told to staff (never dropped in silence).

An event read moments after it was sent is, nearly always, on its way to us in
Synapse's push. Catch-up leaves events younger than `reconcile.settle` (and the
position before them) for a round that soon after, so "caught up" in the record
and the log means the homeserver did not deliver it, not that we read first.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.config.settings import ReconcileSettings
from bot.core.background import TriggeredLoop
from bot.core.ports import HomeserverUnavailable, Refused, Timeline
from bot.intake.accept import Intake, StorageUnavailable, well_formed
from bot.store import positions

log = logging.getLogger(__name__)
PAGE = 100
# A room read back further than this many pages is caught up from there on.
MAX_PAGES_BACK = 50


def event_time(event: dict[str, Any]) -> dt.datetime | None:
    ts = event.get("origin_server_ts")
    if isinstance(ts, int) and not isinstance(ts, bool) and ts > 0:
        with contextlib.suppress(OverflowError, OSError, ValueError):
            return dt.datetime.fromtimestamp(ts / 1000, dt.UTC)
    return None


def settled_part(
    events: list[dict[str, Any]], now: dt.datetime, settle: dt.timedelta
) -> list[dict[str, Any]]:
    """The events before the first one sent within `settle` of `now` (timeline order).

    A timestamp is the sending server's word: one further in the future than `settle`
    counts as settled, so a forged or skewed one cannot hold the rest back for long.
    """
    for position, event in enumerate(events):
        sent = event_time(event)
        if sent is not None and abs(now - sent) < settle:
            return events[:position]
    return events


class Reconciler(TriggeredLoop):
    TASK_NAME = "reconcile"

    def __init__(
        self,
        db: AsyncEngine,
        timeline: Timeline,
        intake: Intake,
        watched_rooms: Callable[[], Awaitable[list[tuple[str, dt.datetime | None]]]],
        settings: ReconcileSettings,
        *,
        is_flag: Callable[[dict[str, Any]], bool] = lambda event: False,
        is_staff_room: Callable[[str], bool] = lambda room_id: False,
        on_caught_up: Callable[[int], None] = lambda count: None,
    ) -> None:
        self._is_flag = is_flag
        # Told how many events were found that the push never brought (bot/intake/stranded.py
        # takes that as the sign that a gap in the push's numbering is ours).
        self._on_caught_up = on_caught_up
        self._is_staff_room = is_staff_room
        # When this database first started: nothing older is ever fed (set at start).
        self.first_started: dt.datetime | None = None
        self._db = db
        self._timeline = timeline
        self._intake = intake
        self._watched_rooms = watched_rooms
        self._settings = settings
        self._trigger = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0  # completed rounds (tests and /metrics)
        self.caught_up = 0  # events found that had never been delivered
        # Rooms whose latest events were left to settle: read again (they alone) once
        # those have, while every room waits for the next full round.
        self._unsettled: set[str] = set()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        only: set[str] | None = None  # None: a full round
        full_round_due = loop.time()
        while True:
            self._trigger.clear()
            if only is None:
                full_round_due = loop.time() + self._settings.interval.total_seconds()
            try:
                await self.catch_up_all(only=only)
            except (HomeserverUnavailable, StorageUnavailable) as exc:
                log.warning("catch-up interrupted (%s); trying again later", exc)
            except Exception:
                log.exception("catch-up failed; trying again later")
            wait = full_round_due - loop.time()
            if self._unsettled:
                wait = min(wait, self._settings.settle.total_seconds())
            try:
                await asyncio.wait_for(self._trigger.wait(), max(wait, 0.0))
            except TimeoutError:
                only = set(self._unsettled) if loop.time() < full_round_due else None
            else:
                only = None  # a gap just ended: every room

    async def catch_up_all(self, *, only: set[str] | None = None) -> int:
        """One round over every watched room (or `only` these of them); returns how many
        events were new to us."""
        found = 0
        self._unsettled = set()
        for room_id, since in await self._watched_rooms():
            if only is None or room_id in only:
                found += await self.catch_up(room_id, since)
        self.rounds += 1
        if found:
            log.warning(
                "caught up %d event(s) the homeserver had not delivered %gs after they were sent",
                found,
                self._settings.settle.total_seconds(),
            )
        return found

    async def catch_up(self, room_id: str, since: dt.datetime | None = None) -> int:
        """Feed the room's events we never received; `since`: when the bot was put there."""
        async with self._db.connect() as conn:
            token = await positions.get(conn, room_id)
        now = dt.datetime.now(dt.UTC)
        # Never before the bot was put in the room, nor before this database started.
        floor = max((t for t in (since, self.first_started) if t is not None), default=None)
        if token is None and self._is_staff_room(room_id):
            floor = now  # never a command from before the service saw the staff room
        window = _Window(now - self._settings.lookback, floor)
        if token is None:
            first = await self._first_read(room_id, window)
            if first:
                # Mostly what happened before the bot was there (never sent to us): no alarm.
                log.info(
                    "read %d earlier event(s) of %s, watched for the first time", first, room_id
                )
            return 0
        found = 0
        while True:
            page = await self._timeline.read_forward(room_id, token, limit=PAGE)
            if isinstance(page, Refused):
                log.info("cannot read %s to catch up: %s", room_id, page)
                return found
            settled = settled_part(page.events, dt.datetime.now(dt.UTC), self._settings.settle)
            found += await self._feed(settled, window)
            if len(settled) < len(page.events):
                # The position stays before this page: the rest of it is read again (what
                # was fed is known by then) once it has settled.
                self._unsettled.add(room_id)
                return found
            if page.next_token is None or page.next_token == token:
                return found
            token = page.next_token
            async with self._db.begin() as conn:
                await positions.put(conn, room_id, token, dt.datetime.now(dt.UTC))

    async def _first_read(self, room_id: str, window: _Window) -> int:
        """No position yet: read back to the window's start, then remember "now"."""
        now_token = await self._timeline.current_position(room_id)
        if isinstance(now_token, Refused):
            log.info("cannot read %s to catch up: %s", room_id, now_token)
            return 0
        events: list[dict[str, Any]] = []
        if window.floor is None or window.floor < dt.datetime.now(dt.UTC):
            events = await self.read_back(room_id, now_token, window.start)
        found = await self._feed(events, window, first_read=True)
        async with self._db.begin() as conn:
            await positions.put(conn, room_id, now_token, dt.datetime.now(dt.UTC))
        return found

    async def read_back(
        self, room_id: str, token: str | None, oldest: dt.datetime
    ) -> list[dict[str, Any]]:
        """The room's events before `token`, back to `oldest` (or MAX_PAGES_BACK pages),
        oldest first."""
        events: list[dict[str, Any]] = []
        for _ in range(MAX_PAGES_BACK):
            page = await self._timeline.read_back(room_id, token, limit=PAGE)
            if isinstance(page, Refused):
                log.info("cannot read %s back: %s", room_id, page)
                break
            events.extend(page.events)
            times = [event_time(event) for event in page.events]
            if page.next_token is None or any(t is not None and t < oldest for t in times):
                break
            token = page.next_token
        return list(reversed(events))

    async def feed_read_on(
        self, events: list[dict[str, Any]], since: dt.datetime | None = None
    ) -> int:
        """Feed events read on from a known position (the bot's sync): the same rules as a
        room's catch-up; `since`: when the bot was put in the room."""
        now = dt.datetime.now(dt.UTC)
        floor = max((t for t in (since, self.first_started) if t is not None), default=None)
        return await self._feed(events, _Window(now - self._settings.lookback, floor))

    async def _feed(
        self, events: list[dict[str, Any]], window: _Window, *, first_read: bool = False
    ) -> int:
        """Feed what falls in the window: since the floor, within the look-back; and
        flags older than the look-back (to be refused as found too late, and told) when
        reading on from a position."""
        now = dt.datetime.now(dt.UTC)
        wanted = []
        for event in events:
            if not well_formed(event):
                continue
            sent = event_time(event) or now
            if window.floor is not None and sent < window.floor:
                continue
            if sent >= window.start or (not first_read and self._is_flag(event)):
                wanted.append(event)
        if not wanted:
            return 0
        recorded = await self._intake.accept(f"catch-up:{uuid.uuid4().hex}", wanted, caught_up=True)
        self.caught_up += recorded.new_events
        if recorded.new_events:
            self._on_caught_up(recorded.new_events)
        return recorded.new_events


@dataclass(frozen=True)
class _Window:
    """What catch-up feeds: since `start` (the look-back), never before `floor`."""

    start: dt.datetime
    floor: dt.datetime | None
