"""Draining the inbox: each recorded event goes to the handler for what it is.

Lanes (bot/intake/accept.py), each drained in arrival order by its own worker: flags;
everything else (staff commands, memberships, relays); flags that will be refused;
encrypted group messages to decrypt. A moderator's flag is never queued behind a
command reply, a refusal, an event being retried or chat waiting to be decrypted:
an encrypted message that decrypts to a flag moves to the flag lane (or the refusal
lane), anything else it decrypts to is done with there and then.

The dispatcher owns acknowledgement: a handler records its decision through
`Handling.transaction()`, which marks the event done in that same database
transaction; an event whose handler recorded nothing is marked done with the
batch. When handling fails:
- the homeserver is down (checked, not assumed): the event waits, uncounted,
  and the lane backs off — nothing is lost, order is kept;
- anything else, including a homeserver call that fails because of the event
  itself (a 70,000-character event id...): the attempt is counted and the event
  retried later without holding up the rest; after MAX_ATTEMPTS it is recorded
  as failed, counted, audited and reported to staff, and the lane moves on.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, ParamSpec, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bot.config.deployment import Deployment
from bot.core.metrics import Metrics
from bot.core.ports import Decrypter, Homeserver, HomeserverUnavailable
from bot.core.reactions import ACK_KEY, CLAIM_KEY, annotation
from bot.intake.accept import DECRYPT_LANE, LANES, is_policy_request, redacted_by
from bot.rooms.directory import RoomDirectory, RoomKind
from bot.rooms.refusal_reports import RefusalReports
from bot.rooms.staff_room import StaffRoom
from bot.store import audit, ingest, outbox
from bot.store.ingest import InboxItem
from bot.store.transact import Work, read, transact
from bot.texts.messages import Texts

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

MAX_ATTEMPTS = 5
BATCH = 50  # events a lane takes at a time
# An encrypted event whose key has not come this long after it did: staff are told a
# message could not be read (a key may still come late: it is retried until then).
UNDECRYPTABLE_AFTER = dt.timedelta(minutes=2)
KEY_WAIT = dt.timedelta(seconds=2)
KEY_WAIT_MAX = dt.timedelta(seconds=20)
# Backoff (seconds) before an event's next attempt, by attempts so far.
RETRY_DELAYS = (1.0, 2.0, 5.0, 15.0, 30.0)
OUTAGE_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


def _redacts(item: InboxItem) -> str | None:
    """The event a redaction removes (None: no redaction)."""
    if item.event_type != "m.room.redaction":
        return None
    return redacted_by(item.payload)


class EventKind(Enum):
    FLAG = "flag"  # a possible flag in a group room
    BOT_MEMBERSHIP = "bot_membership"  # the bot invited, kicked, banned
    MEMBERSHIP = "membership"  # someone joining or leaving a group room
    CHECKIN_MEMBERSHIP = "checkin_membership"
    POWER_LEVELS = "power_levels"
    TOMBSTONE = "tombstone"  # a group room upgraded (bot/moderation/upgrades.py)
    STAFF_MESSAGE = "staff_message"  # a `!case` command, perhaps
    STAFF_REACTION = "staff_reaction"  # ✅ on an alert, ✋ on a check-in notice
    MEMBER_MESSAGE = "member_message"  # in a DM or check-in room: relayed to staff
    POLICY_REQUEST = "policy_request"  # `!policy` in a group room (bot/members/policy.py)
    POLICY_ROOM_MESSAGE = "policy_room_message"  # written in a `!policy` DM
    SPACE_CHILD = "space_child"  # a room added to a community's Space (bot/community)
    IGNORED = "ignored"


class Classifier:
    def __init__(self, rooms: RoomDirectory, bot_user_id: str) -> None:
        self._rooms = rooms
        self._bot = bot_user_id

    def __call__(self, item: InboxItem) -> EventKind:
        event = item.payload
        if event.get("sender") == self._bot and item.event_type != "m.room.member":
            return EventKind.IGNORED
        kind = self._rooms.kind(item.room_id)
        if item.event_type == "m.room.member":
            if event.get("state_key") == self._bot:
                return EventKind.BOT_MEMBERSHIP
            if kind is RoomKind.CHECKIN:
                return EventKind.CHECKIN_MEMBERSHIP
            return EventKind.MEMBERSHIP if kind is RoomKind.GROUP else EventKind.IGNORED
        if item.event_type == "m.room.power_levels":
            return EventKind.POWER_LEVELS
        if item.event_type == "m.space.child":
            return EventKind.SPACE_CHILD
        if item.event_type == "m.room.tombstone":
            return EventKind.TOMBSTONE if kind is RoomKind.GROUP else EventKind.IGNORED
        if kind is RoomKind.STAFF:
            if item.event_type == "m.room.message":
                return EventKind.STAFF_MESSAGE
            if item.event_type in ("m.reaction", "m.room.encrypted"):
                reacted = annotation(event.get("content"))
                if reacted is not None and reacted[0] in (ACK_KEY, CLAIM_KEY):
                    return EventKind.STAFF_REACTION
            return EventKind.IGNORED
        if kind in (RoomKind.DM, RoomKind.CHECKIN):
            if item.event_type in ("m.room.message", "m.room.encrypted"):
                return EventKind.MEMBER_MESSAGE
            return EventKind.IGNORED
        if kind is RoomKind.POLICY:
            if item.event_type in ("m.room.message", "m.room.encrypted"):
                return EventKind.POLICY_ROOM_MESSAGE
            return EventKind.IGNORED
        if item.event_type == "m.room.message":
            content = event.get("content")
            body = content.get("body") if isinstance(content, dict) else None
            if isinstance(body, str) and is_policy_request(body):
                return EventKind.POLICY_REQUEST
        if item.event_type in ("m.reaction", "m.room.message", "m.room.encrypted"):
            return EventKind.FLAG
        return EventKind.IGNORED


class Handling:
    """One event being handled; its decision is recorded with its acknowledgement."""

    def __init__(self, db: AsyncEngine, item: InboxItem) -> None:
        self._db = db
        self.item = item
        self.finished = False

    def database(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        """A read of the database (no lock, nothing acknowledged)."""
        return self._db.connect()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction that also marks the event done (once, at commit)."""
        async with self._db.begin() as conn:
            yield conn
            await self._finish(conn)
        self.finished = True

    async def transact(self, work: Work[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`work(conn, *args)` as one write transaction (whole, on SQLite's writer thread:
        bot/store/transact.py) that also marks the event done."""

        async def and_finish(conn: AsyncConnection) -> T:
            result = await work(conn, *args, **kwargs)
            await self._finish(conn)
            return result

        result = await transact(self._db, and_finish)
        self.finished = True
        return result

    async def _finish(self, conn: AsyncConnection) -> None:
        if not self.finished:
            await ingest.finish(conn, self.item.seq, dt.datetime.now(dt.UTC))


Handler = Callable[[Handling], Awaitable[None]]


@dataclass(frozen=True)
class StaffOfRoom:
    """Who hears of trouble with an event in a room: its community's staff room, in its
    words, coalesced by its refusal reports."""

    staff_room: StaffRoom
    texts: Texts
    refusal_reports: RefusalReports


class Dispatcher:
    def __init__(
        self,
        db: AsyncEngine,
        homeserver: Homeserver,
        classify: Callable[[InboxItem], EventKind],
        handlers: Mapping[EventKind, Handler],
        *,
        deployment: Deployment,
        staff_room: StaffRoom,
        metrics: Metrics,
        texts: Texts,
        on_outbox: Callable[[], None],
        reports: RefusalReports,
        decrypter: Decrypter | None = None,
        lane_of: Callable[[dict[str, Any], str, str], int | None] = lambda e, kind, room: None,
        on_moved: Callable[[int], None] = lambda lane: None,
        retry_delays: tuple[float, ...] = RETRY_DELAYS,
        outage_delays: tuple[float, ...] = OUTAGE_DELAYS,
        hand_over_lanes: frozenset[int] = frozenset(),
        staff_of: Callable[[str], Awaitable[StaffOfRoom]] | None = None,
        told_ahead: Callable[[str], bool] = lambda event_id: False,
    ) -> None:
        # Whether a flag's member was told as its push was recorded (bot/steps/notify_ahead.py):
        # then it was acted on, and its redaction no longer withdraws it unseen.
        self._told_ahead = told_ahead
        # Whose staff hear of trouble with an event in a room (its community's): by
        # default the one staff room's, with these texts and reports.
        self._staff_of = staff_of
        # Events the intake hands over as it queues them (`hand_over`), by lane and queue
        # number: a lane takes them from memory, not from a read of what was just written,
        # while it is `clear` — every event it holds pending is known here (none waits in
        # the inbox to be retried, nothing moved into it). Else it reads the inbox, which
        # stays the truth either way: what is handed over is written first.
        self._hand_over_lanes = hand_over_lanes
        self._handed: dict[int, dict[int, InboxItem]] = {lane: {} for lane in hand_over_lanes}
        self._clear: set[int] = set()
        # The newest queue number a read of the lane returned: an event handed over only
        # after a read took it (its commit and the hand-over straddling the read) is
        # not taken again. (The intake records one transaction at a time, so queue
        # numbers are committed in order.)
        self._read_up_to: dict[int, int] = {}
        self._decrypter = decrypter
        # Where a decrypted event belongs (the intake's test), and who is told it moved.
        self._lane_of = lane_of
        self._on_moved = on_moved
        self._keys_asked: set[str] = set()
        self.undecryptable_after = UNDECRYPTABLE_AFTER
        self._db = db
        self._hs = homeserver
        self._classify = classify
        self._handlers = dict(handlers)
        self._deployment = deployment
        self._staff_room = staff_room
        self._metrics = metrics
        self._texts = texts
        self._on_outbox = on_outbox
        self._reports = reports
        self._retry_delays = retry_delays
        self._outage_delays = outage_delays
        self._outages = 0

    def hand_over(self, items: list[InboxItem]) -> None:
        """Events just queued (and committed) in a lane that takes them from memory."""
        for item in items:
            handed = self._handed.get(item.lane)
            if handed is not None and item.seq > self._read_up_to.get(item.lane, 0):
                handed[item.seq] = item

    async def _due(self, lane: int, now: dt.datetime) -> tuple[list[InboxItem], bool]:
        """The lane's due events, in order, and whether they are every event it holds
        pending: from what was handed over while the lane is clear, else read."""
        handed = self._handed.get(lane)
        if handed and lane in self._clear:
            items = [handed.pop(seq) for seq in sorted(handed)[:BATCH]]
            return items, not handed
        items, pending = await read(
            self._db, ingest.due_in_lane, lane, now, BATCH, counted=handed is not None
        )
        if handed is not None and items:
            self._read_up_to[lane] = max(self._read_up_to.get(lane, 0), items[-1].seq)
            # Read now: handed over meanwhile, and committed after the read, it stays.
            for item in items:
                handed.pop(item.seq, None)
        return items, pending == len(items)

    async def work_lane(self, lane: int) -> bool:
        """Handle the lane's due events in order; True if there may be more to do now."""
        now = dt.datetime.now(dt.UTC)
        items, all_pending = await self._due(lane, now)
        # Clear again only once this round has left nothing of the lane waiting.
        self._clear.discard(lane)
        # Flags their sender removed (redacted) before they were reached: not acted on.
        # Only their own sender's redaction, in their room: a redaction event names any
        # event it likes (one from another server is not checked against power when it
        # is sent), and must not cancel someone else's flag.
        withdrawn = {
            (redacted, item.room_id, item.payload.get("sender"))
            for item in items
            if (redacted := _redacts(item)) is not None
        }
        nothing_to_do: list[int] = []
        left_waiting = False
        try:
            for item in items:
                taken_back = (item.event_id, item.room_id, item.payload.get("sender"))
                if (
                    taken_back in withdrawn
                    and item.event_type != "m.room.redaction"
                    and not self._told_ahead(item.event_id)
                ):
                    await self._withdrawn(item)
                    continue
                readable = await self._readable(item)
                if readable is None:
                    left_waiting = True
                    continue  # waiting for its key (or given up, and staff told)
                if lane == DECRYPT_LANE:
                    if not await self._moved(readable):
                        nothing_to_do.append(item.seq)  # chat: nothing to act on
                    continue
                item = readable
                handling = Handling(self._db, item)
                try:
                    handler = self._handlers.get(self._classify(item))
                    if handler is not None:
                        await handler(handling)
                except HomeserverUnavailable as exc:
                    left_waiting = True
                    if await self._is_outage():
                        await self._wait_for_homeserver(item, exc)
                        return False
                    await self._failed(item, exc)
                except Exception as exc:
                    left_waiting = True
                    log.exception("event %s could not be handled", item.event_id)
                    await self._failed(item, exc)
                else:
                    self._outages = 0
                    if not handling.finished:
                        nothing_to_do.append(item.seq)
        finally:
            if nothing_to_do:
                async with self._db.begin() as conn:
                    await ingest.finish_many(conn, nothing_to_do, dt.datetime.now(dt.UTC))
        if all_pending and not left_waiting and lane in self._handed:
            self._clear.add(lane)
        return len(items) == BATCH

    async def _staff_for(self, room_id: str) -> StaffOfRoom:
        """The staff room, texts and refusal reports of the room's community."""
        if self._staff_of is not None:
            return await self._staff_of(room_id)
        return StaffOfRoom(self._staff_room, self._texts, self._reports)

    async def _withdrawn(self, item: InboxItem) -> None:
        """A flag removed before the queue reached it: recorded, and nothing done."""
        now = dt.datetime.now(dt.UTC)
        async with self._db.begin() as conn:
            await ingest.finish(conn, item.seq, now)
            await audit.append(
                conn,
                self._deployment.provenance,
                "flag_withdrawn",
                facts={"event": item.event_id, "why": "removed before it was acted on"},
                personal={"room": item.room_id, "flagger": item.payload.get("sender")},
                at=now,
            )
        log.info("a flag removed before it was acted on: %s", item.event_id)

    async def _moved(self, decrypted: InboxItem) -> bool:
        """Move a decrypted event that needs acting on (a flag, say) to its lane; True if
        it did. The encrypted event stays the payload: plaintext is never stored."""
        lane = self._lane_of(decrypted.payload, decrypted.event_type, decrypted.room_id)
        if lane is None or lane == DECRYPT_LANE:
            return False
        async with self._db.begin() as conn:
            await ingest.move_to_lane(conn, decrypted.seq, lane)
        self._clear.discard(lane)  # an event there it was not handed: read the inbox
        self._on_moved(lane)
        return True

    async def _readable(self, item: InboxItem) -> InboxItem | None:
        """The item with an encrypted event decrypted (in memory only: plaintext is never
        stored); None while its key has not arrived."""
        if item.event_type != "m.room.encrypted" or self._decrypter is None:
            return item
        decrypted = self._decrypter.decrypt(item.payload)
        if decrypted is not None:
            return replace(item, payload=decrypted, event_type=str(decrypted.get("type")))
        if annotation(item.payload.get("content")) is not None:
            return item  # an encrypted reaction: its relation is in the clear, and enough
        now = dt.datetime.now(dt.UTC)
        if now - item.received_at < self.undecryptable_after:
            if item.event_id not in self._keys_asked:
                self._keys_asked.add(item.event_id)
                try:
                    await self._decrypter.request_key(item.payload)
                except Exception:
                    log.warning("could not ask for the key of %s", item.event_id, exc_info=True)
            # Looked at again when a key arrives (Service._room_key_arrived), and meanwhile
            # less and less often: a flood of messages nobody shared keys for must not
            # become a flood of retries.
            wait = min(max(KEY_WAIT, (now - item.received_at) / 4), KEY_WAIT_MAX)
            async with self._db.begin() as conn:
                await ingest.retry_later(
                    conn, item.seq, now + wait, "waiting for its key", counted=False
                )
            return None
        await self._undecryptable(item, now)
        return None

    async def _undecryptable(self, item: InboxItem, now: dt.datetime) -> None:
        """Its key never came: recorded (no content), and staff told — the first of a
        sender's in a room at once, any more in that window in one summary (a broken
        client, or someone sending noise, must not flood the staff room)."""
        sender = str(item.payload.get("sender", ""))
        staff = await self._staff_for(item.room_id)
        async with self._db.begin() as conn:
            await ingest.finish(conn, item.seq, now, error="its key never arrived")
            await audit.append(
                conn,
                self._deployment.provenance,
                "undecryptable",
                facts={"event": item.event_id},
                personal={"room": item.room_id, "sender": sender},
                at=now,
            )
            told = await staff.refusal_reports.refused(
                conn,
                kind="undecryptable",
                actor=sender,
                room_id=item.room_id,
                report=staff.texts.undecryptable(sender=sender, room=item.room_id),
                now=now,
            )
        self._keys_asked.discard(item.event_id)
        log.warning("event %s could not be decrypted: its key never arrived", item.event_id)
        if told:
            self._on_outbox()

    async def keys_arrived(self) -> None:
        """Room keys came: encrypted events waiting for theirs are due now."""
        async with self._db.begin() as conn:
            await ingest.retry_encrypted_now(conn)

    async def homeserver_back(self) -> None:
        """The homeserver answers again: what waited it out (every lane but the one waiting
        for keys) is due now, and the next outage backs off from its first delay."""
        self._outages = 0
        lanes = [lane for lane in LANES if lane != DECRYPT_LANE]
        async with self._db.begin() as conn:
            await ingest.retry_lanes_now(conn, lanes)

    async def _is_outage(self) -> bool:
        """Whether the homeserver itself is unwell (not just this event's call failing)."""
        try:
            return await self._hs.check() is not None
        except Exception:
            return True

    async def _wait_for_homeserver(self, item: InboxItem, exc: Exception) -> None:
        delay = self._outage_delays[min(self._outages, len(self._outage_delays) - 1)]
        self._outages += 1
        log.warning("homeserver unavailable (%s); retrying in %.1fs", exc, delay)
        self._metrics.errors.labels("homeserver").inc()
        until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
        async with self._db.begin() as conn:
            await ingest.retry_later(conn, item.seq, until, str(exc)[:500], counted=False)

    async def _failed(self, item: InboxItem, exc: Exception) -> None:
        """Count the attempt; retry later without blocking the lane, or give up for good."""
        error = f"{type(exc).__name__}: {exc}"[:500]
        attempts = item.attempts + 1
        if attempts < MAX_ATTEMPTS:
            delay = self._retry_delays[min(attempts, len(self._retry_delays)) - 1]
            until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
            async with self._db.begin() as conn:
                await ingest.retry_later(conn, item.seq, until, error, counted=True)
            log.warning(
                "event %s failed (attempt %d of %d): %s",
                item.event_id,
                attempts,
                MAX_ATTEMPTS,
                type(exc).__name__,
            )
            return
        await self._poisoned(item, error)

    async def _poisoned(self, item: InboxItem, error: str) -> None:
        now = dt.datetime.now(dt.UTC)
        self._metrics.errors.labels("event").inc()
        staff = await self._staff_for(item.room_id)
        async with self._db.begin() as conn:
            await ingest.finish(conn, item.seq, now, error=error)
            await audit.append(
                conn,
                self._deployment.provenance,
                "event_failed",
                facts={
                    "event": item.event_id,
                    "type": item.event_type,
                    "attempts": item.attempts + 1,
                },
                personal={"room": item.room_id, "error": error},
                at=now,
            )
            # A failed event might have been a flag: a person must look at it.
            await outbox.queue(
                conn,
                staff.staff_room.address,
                staff.texts.processing_failed(event_id=item.event_id, room=item.room_id),
                now,
            )
        log.error("event %s failed for good after %d attempts", item.event_id, item.attempts + 1)
        self._on_outbox()
