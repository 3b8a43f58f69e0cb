"""One sync for every room: the safety net behind the homeserver's push.

Synapse forgets the events (invites too) it had queued for us when it restarts.
The bot's own sync, from a `next_batch` token kept in the database, sees every
room the bot is in or invited to in one long poll, so what the service asks of
the homeserver while idle does not grow with the number of rooms or cases.

Each timeline event the sync brings goes through the same intake as a pushed
one, deduplicated by event id and marked "caught up" when it was new to us, by
the rules of bot/intake/reconcile.py (the look-back; never before the bot was put in
the room, nor before this database first started). Each invite goes the same
way as a pushed invite: joined if the inviter may put the bot there, else
declined and reported. A room whose timeline came `limited` (more happened than
one answer holds) is read back, that room alone, to where the last sync stood.
The token is stored only once the answer's events are recorded; an answer that
could not be recorded is held and fed again (not asked for again: with encryption
on, the same sync is the encryption device's, which has taken the answer's
to-device messages already, appservice/sync.py). Once stored, the answer's
`recorded` callback lets the device store its own token.

An event seen moments after it was sent is, nearly always, on its way in the
push: an answer is fed once its youngest event is `reconcile.settle` old, so
"caught up" means the homeserver did not deliver it, not that we read first.

With no token yet (a new database, or one that used per-room catch-up), the
start takes a token for "now" (and the invites pending, fed as above), catches
every watched room up once from its own position (bot/intake/reconcile.py), and only
then stores the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.config.settings import ReconcileSettings
from bot.core.background import TriggeredLoop
from bot.core.ports import (
    HomeserverUnavailable,
    Refused,
    SyncBatch,
    SyncedRoom,
    Syncing,
    SyncWithdrawn,
)
from bot.intake.accept import StorageUnavailable
from bot.intake.notice_reads import NoticeReads
from bot.intake.reconcile import Reconciler, event_time
from bot.store import ingest, positions

log = logging.getLogger(__name__)
# Where the sync's token is kept among the rooms' positions: no room id looks like it.
SYNC_POSITION = "sync:next_batch"
# How long one sync waits for something to happen: while idle, the one request made.
POLL_SECONDS = 30.0
# Trying again after the homeserver did not answer backs off to this (seconds), so
# catch-up starts well within a minute of it answering again.
RETRY_MAX_SECONDS = 8.0
# While an answer's young events settle, how often to look whether the push brought them.
SETTLE_POLL_SECONDS = 0.1
# After an answer that brought anything, the next sync waits `reconcile.gather`. A sync waiting
# in a long poll is answered (and recomputed by the homeserver, for every room the bot
# is in) on each event in any of those rooms: a flag's burst (the reaction, the invite,
# the notice, m.direct, the kick, the alert) made about eleven answers, each costing
# Synapse ~80 ms at 5,000 rooms, and the flag's own requests queued behind them. A
# moment's pause gathers the burst into one or two answers. Its cost: a room key sent
# in that moment reaches the encryption device that much later. Nothing waits on it
# for safety: the push delivers events, the sync only catches up. An answer that shows a
# backlog (a limited timeline, to-device messages at the homeserver's limit) is followed
# at once: catching up after an outage or a restore is not slowed by it.
#
# The pause comes after an answer; the first answer of a flag's burst is the one the
# reaction itself wakes, computed by Synapse while the flag's own calls (invite, notice,
# kick) need it. So a pushed flag withdraws the sync waiting in its long poll (Synapse
# stops computing a /sync whose client went) and holds the next one back for `gather`:
# the burst is then one answer, after the flag's calls. Only a sync that has waited
# WITHDRAW_AFTER is withdrawn: by then it has answered anything that was waiting when it
# asked (a room key, a backlog), so flags in a stream can never keep the sync from
# answering (each one asked again comes back at once with what it has).
WITHDRAW_AFTER_SECONDS = 0.5


class SafetyNet(TriggeredLoop):
    TASK_NAME = "safety-net"

    def __init__(
        self,
        db: AsyncEngine,
        syncing: Syncing,
        reconciler: Reconciler,
        settings: ReconcileSettings,
        *,
        bot_user_id: str,
        joined_at: Callable[[], Awaitable[dict[str, dt.datetime | None]]],
        poll_seconds: float | None = None,
        notice_reads: NoticeReads | None = None,
        on_interrupted: Callable[[str], None] = lambda why: None,
    ) -> None:
        # Told each time a round fails, wherever in it (the sync, a read-back, a start's
        # catch-up): the encryption device, whose answers come only with this sync.
        self._on_interrupted = on_interrupted
        self._db = db
        self._syncing = syncing
        self._reconciler = reconciler
        self._settings = settings
        self._bot = bot_user_id
        # When the bot was put in each room it moderates (nothing older is its to act on).
        self._joined_at = joined_at
        # The module's, read now (not bound at import): a test of idle cost shortens it.
        self._poll = POLL_SECONDS if poll_seconds is None else poll_seconds
        self._gather = settings.gather.total_seconds()
        self._brought = False  # the last answer brought events, invites or receipts
        self._backlog = False  # ... and more was waiting than it held: no pause then
        # Read receipts, of the DMs whose notice is unread only (bot/intake/notice_reads.py).
        self._notice_reads = notice_reads
        self._trigger = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._held_until = 0.0  # loop time before which no sync is asked (`hold`)
        self._asked_at = 0.0  # loop time the last sync was asked
        self.withdrawn = 0  # syncs withdrawn for a flag (tests and the bench)
        self.rounds = 0  # answers fed (tests and /metrics)
        # An answer not recorded yet, and the token it was asked from: fed again, not
        # asked for again (the encryption device has taken it: asking again would show
        # it its to-device messages twice).
        self._held: tuple[str | None, SyncBatch] | None = None

    @property
    def caught_up(self) -> int:
        return self._reconciler.caught_up

    def hold(self) -> None:
        """A flag was pushed: its burst of events is coming, and the flag's calls need the
        homeserver now. The sync waiting in its long poll is withdrawn, and the next waits
        `gather` (see WITHDRAW_AFTER_SECONDS)."""
        if self._gather <= 0:
            return
        now = asyncio.get_running_loop().time()
        if now - self._asked_at < WITHDRAW_AFTER_SECONDS:
            return  # just asked: it may be bringing what was waiting; let it answer
        if self._syncing.withdraw():
            self.withdrawn += 1
            self._held_until = max(self._held_until, now + self._gather)

    async def _held_back(self) -> None:
        # Only a withdrawal moves the hold on, and none can come while no sync is asked.
        left = self._held_until - asyncio.get_running_loop().time()
        if left > 0:
            await asyncio.sleep(left)

    async def _loop(self) -> None:
        delay = 1.0
        while True:
            self._trigger.clear()
            try:
                await self._held_back()
                await self.catch_up()
                delay = 1.0
                if self._brought and not self._backlog and self._gather > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._trigger.wait(), self._gather)
                continue
            except SyncWithdrawn:
                continue  # for a flag (`hold`): asked again once the hold ends
            except (HomeserverUnavailable, StorageUnavailable) as exc:
                log.warning("the sync is interrupted (%s); trying again", exc)
                self._on_interrupted(str(exc))
            except Exception as exc:
                log.exception("the sync failed; trying again")
                self._on_interrupted(f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._trigger.wait(), delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)

    async def catch_up(self) -> int:
        """One sync, fed; returns how many events were new to us."""
        async with self._db.connect() as conn:
            stored = await positions.get_with_time(conn, SYNC_POSITION)
        if stored is None:
            return await self._start()
        token, synced_at = stored
        reads = self._notice_reads
        watched = await reads.watched() if reads is not None else []
        batch = await self._answer(token, wait=self._poll, receipts_in=watched)
        if isinstance(batch, Refused):
            # A token the homeserver no longer knows: start again from the rooms' own.
            log.warning("the homeserver refused the sync (%s): starting it again", batch)
            async with self._db.begin() as conn:
                await positions.forget(conn, SYNC_POSITION)
            return 0
        self._brought = bool(batch.rooms or batch.invites or batch.receipts)
        self._backlog = batch.backlog
        await self._settled(batch)
        joined_at = await self._joined_at()
        found = 0
        for room in batch.rooms:
            events = await self._with_gap(room, synced_at)
            if events:
                found += await self._reconciler.feed_read_on(
                    events, self._floor(room.room_id, events, joined_at)
                )
        invites = await self._invites_not_pushed(batch, synced_at - self._settings.settle)
        if invites:
            found += await self._reconciler.feed_read_on(invites)
        if reads is not None and batch.receipts:
            await reads.take(batch.receipts)
        await self._store(batch)
        if found:
            log.warning("caught up %d event(s) the homeserver had not delivered", found)
        return found

    async def _answer(
        self, since: str | None, *, wait: float, receipts_in: Collection[str] = ()
    ) -> SyncBatch | Refused:
        """The answer held from an attempt that could not record it, else a new one."""
        if self._held is not None and self._held[0] == since:
            return self._held[1]
        self._asked_at = asyncio.get_running_loop().time()
        batch = await self._syncing.sync(since, wait=wait, receipts_in=receipts_in)
        self._held = None if isinstance(batch, Refused) else (since, batch)
        return batch

    async def _start(self) -> int:
        batch = await self._answer(None, wait=0)
        if isinstance(batch, Refused):
            raise HomeserverUnavailable(f"the first sync was refused: {batch}")
        found = await self._reconciler.catch_up_all()
        # Every invite the bot has: one made while the service was away is taken now.
        since = dt.datetime.now(dt.UTC) - self._settings.lookback
        invites = await self._invites_not_pushed(batch, since)
        if invites:
            found += await self._reconciler.feed_read_on(invites)
        await self._store(batch)
        return found

    async def _invites_not_pushed(
        self, batch: SyncBatch, since: dt.datetime
    ) -> list[dict[str, Any]]:
        """The answer's invites the push did not bring, as the event a push would have.

        A sync shows an invite stripped of its event id, so it cannot be deduplicated by
        it: one is left to the push when a membership event of that room was recorded
        since `since` (by now, settled, the push has come if it ever will; one that comes
        later still is taken once, bot/moderation/membership.py). Its id is made from the
        answer, so an answer asked for again is not fed twice."""
        invites = []
        for invite in batch.invites:
            if "event_id" not in invite:
                async with self._db.connect() as conn:
                    pushed = await ingest.membership_recorded_since(conn, invite["room_id"], since)
                if pushed:
                    continue
                digest = hashlib.sha256(
                    f"{batch.next_batch}\0{invite['room_id']}\0{invite.get('sender')}".encode()
                ).hexdigest()[:32]
                invite = invite | {"event_id": f"$safeguard-sync-invite-{digest}"}
            invites.append(invite)
        return invites

    async def _store(self, batch: SyncBatch) -> None:
        async with self._db.begin() as conn:
            await positions.put(conn, SYNC_POSITION, batch.next_batch, dt.datetime.now(dt.UTC))
        self._held = None
        self.rounds += 1
        if batch.recorded is not None:
            batch.recorded()

    async def _settled(self, batch: SyncBatch) -> None:
        """Wait until each of the answer's young events has come by push, or is `settle`
        old (a timestamp far in the future is the sender's word, and holds nothing back).

        Nearly always the push has brought them by the time the answer is read, so the
        wait ends at once: the next sync (which, with encryption on, is also the
        device's: its room keys and device lists) is not held back by a busy room."""
        settle = self._settings.settle
        now = dt.datetime.now(dt.UTC)
        wait = dt.timedelta(0)
        young: set[str] = set()
        for room_events in (*(room.events for room in batch.rooms), batch.invites):
            for event in room_events:
                sent = event_time(event)
                if sent is not None and abs(now - sent) < settle:
                    wait = max(wait, settle - (now - sent))
                    if isinstance(event.get("event_id"), str):
                        young.add(event["event_id"])
                    else:
                        young.add("")  # (a stripped invite: only time tells)
        deadline = asyncio.get_running_loop().time() + min(wait, settle).total_seconds()
        while wait > dt.timedelta(0) and asyncio.get_running_loop().time() < deadline:
            if "" not in young:
                async with self._db.connect() as conn:
                    young = await ingest.not_seen(conn, young)
                if not young:
                    return
            await asyncio.sleep(
                min(SETTLE_POLL_SECONDS, deadline - asyncio.get_running_loop().time())
            )

    async def _with_gap(self, room: SyncedRoom, synced_at: dt.datetime) -> list[dict[str, Any]]:
        """The room's events, with those a limited timeline left out read back first."""
        if not room.limited or room.prev_batch is None:
            return room.events
        # Back to the last sync (less the settle time, for what was still on its way).
        oldest = synced_at - self._settings.settle
        return [
            *await self._reconciler.read_back(room.room_id, room.prev_batch, oldest),
            *room.events,
        ]

    def _floor(
        self,
        room_id: str,
        events: list[dict[str, Any]],
        joined_at: dict[str, dt.datetime | None],
    ) -> dt.datetime | None:
        """When the bot was put in the room: as recorded, or its join among these events
        (what came before it was never the bot's to act on)."""
        floor = joined_at.get(room_id)
        for event in events:
            if self._bot_came_in(event) and (sent := event_time(event)) is not None:
                floor = sent if floor is None else max(floor, sent)
        return floor

    def _bot_came_in(self, event: dict[str, Any]) -> bool:
        """The bot's own join (not a join after a join: a display name set again)."""
        if event.get("type") != "m.room.member" or event.get("state_key") != self._bot:
            return False
        unsigned = event.get("unsigned")
        before = unsigned.get("prev_content") if isinstance(unsigned, dict) else None
        return _membership(event.get("content")) == "join" and _membership(before) != "join"


def _membership(content: Any) -> Any:
    return content.get("membership") if isinstance(content, dict) else None
