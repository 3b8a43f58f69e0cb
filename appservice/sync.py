"""The bot's own /sync, as the safety net behind Synapse's push (bot/intake/safety_net.py),
and, with encryption on, as the encryption device's sync too: one long poll.

One long poll for every room the bot is in or invited to, masquerading as the bot
through the as_token. The filter brings only what the policy reads: the timeline
event types the intake acts on, no presence, receipts, typing or account data,
members lazy-loaded and no other state (the intake reads state from the timeline;
the room-state cache reads it apart). A start asks for one event a room, so the
first answer is small however many rooms the bot has been in; no sync asks for
full state.

With encryption on, the request carries the bot's device (`device_id`, the
masquerade the device's own calls use) whenever the device is attached
(appservice/crypto.py), and the filter adds `m.room.encryption`; to-device
messages, device-list changes and one-time key counts come unfiltered. The
device takes the answer first, then the safety net feeds it, stores its token,
and calls back (`SyncBatch.recorded`) for the device to store its own. A device
just (re)started asks from its own token, not the safety net's: Synapse deletes
the device's to-device messages up to the token a sync asks from, and the safety
net's may have moved on (without the device) meanwhile. A poll without the device
is dropped when the device attaches, so it waits no long poll to get in.

Read receipts are asked for only in the rooms named (the DMs whose notice is still
unread, bot/intake/notice_reads.py): never a group room's, and none at all when there is
none.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Awaitable, Collection
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from appservice.homeserver import NioHomeserver
from bot.core.ports import (
    HomeserverUnavailable,
    Receipt,
    Refused,
    SyncBatch,
    SyncedRoom,
    SyncWithdrawn,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from appservice.crypto import BotCrypto

# What the policy reads from a room's timeline (bot/intake/accept.py, bot/intake/dispatch.py).
TIMELINE_TYPES = [
    "m.reaction",
    "m.room.message",
    "m.room.encrypted",
    "m.room.member",
    "m.room.redaction",
    "m.room.power_levels",
    "m.room.tombstone",
    "m.room.create",
    "m.room.join_rules",
]
ENCRYPTION = "m.room.encryption"
# Events of a room in one answer: more than this since the last one makes the timeline `limited`,
# and that room alone is read back (bot/intake/safety_net.py).
TIMELINE_LIMIT = 50
# Synapse gives at most this many to-device messages an answer: an answer with as many
# likely has more waiting (a device catching up after an outage or a restore).
TO_DEVICE_PER_ANSWER = 100


def _filter(timeline_limit: int, *, device: bool = False, receipts_in: Collection[str] = ()) -> str:
    """The filter; with the encryption device, rooms also bring what nio reads of them:
    a room becoming encrypted (in the timeline, or in the state a gap left out).
    To-device messages, device-list changes and one-time key counts are not filtered.
    Read receipts only of `receipts_in`."""
    nothing = {"not_types": ["*"]}
    extra = [ENCRYPTION] if device else []
    receipts = {"types": ["m.receipt"], "rooms": sorted(receipts_in)}
    return json.dumps(
        {
            "presence": nothing,
            "account_data": nothing,
            "room": {
                "timeline": {"limit": timeline_limit, "types": TIMELINE_TYPES + extra},
                "state": {"lazy_load_members": True, "types": extra},
                "ephemeral": receipts if receipts_in else nothing,
                "account_data": nothing,
                "include_leave": False,
            },
        },
        separators=(",", ":"),
    )


ON_START = _filter(1)
ON_START_WITH_DEVICE = _filter(1, device=True)


def _chosen(since: str | None, *, device: bool, receipts_in: Collection[str]) -> str:
    """A start asks one event a room and no receipts; later answers, the full filter."""
    if since is None:
        return ON_START_WITH_DEVICE if device else ON_START
    return _filter(TIMELINE_LIMIT, device=device, receipts_in=receipts_in)


class BotSync:
    """`bot.core.ports.Syncing` on the bot's homeserver connection, and, when encryption is
    on, the encryption device's sync too (`crypto`): one long poll for both."""

    def __init__(self, homeserver: NioHomeserver, crypto: BotCrypto | None = None) -> None:
        self._homeserver = homeserver
        self._crypto = crypto
        self._waiting: asyncio.Future[Any] | None = None  # the request, until its answer

    def withdraw(self) -> bool:
        """Drop the request waiting for its answer: the homeserver, which computes a
        sync answer the moment anything happens in any of the bot's rooms, stops (Synapse
        cancels a /sync whose client went), and nothing of it is taken."""
        waiting = self._waiting
        if waiting is None or waiting.done():
            return False
        waiting.cancel()
        return True

    async def _answer_of(self, request: Awaitable[Any]) -> Any:
        """The request's answer; SyncWithdrawn if `withdraw()` dropped it first."""
        waiting = asyncio.ensure_future(request)
        self._waiting = waiting
        try:
            await asyncio.wait({waiting})
        finally:
            self._waiting = None
            if not waiting.done():
                waiting.cancel()  # we were cancelled ourselves: so is the request
        if waiting.cancelled():
            raise SyncWithdrawn()
        return waiting.result()

    async def sync(
        self, since: str | None, *, wait: float, receipts_in: Collection[str] = ()
    ) -> SyncBatch | Refused:
        bot = self._homeserver.bot_user_id
        while True:
            device = self._crypto.sync_device() if self._crypto is not None else None
            if device is None:
                answer = await self._unless_device_joins(
                    self._answer_of(
                        self._homeserver.sync_json(
                            since, _chosen(since, device=False, receipts_in=receipts_in), wait=wait
                        )
                    )
                )
                if answer is None:
                    continue  # the device joined meanwhile: ask again, with it
                return _batch(answer, bot, receipts_in)
            return await self._with_device(since, wait, receipts_in, *device)

    async def _with_device(
        self,
        since: str | None,
        wait: float,
        receipts_in: Collection[str],
        device_id: str,
        adopt_from: str | None,
    ) -> SyncBatch | Refused:
        """One answer for both: the device takes it first (its to-device messages and
        keys), then the safety net, whose storing it calls back (`recorded`) to store
        the device's own token. A device just (re)started asks from its store's token:
        the homeserver deletes the to-device messages up to the token a sync asks from,
        and the safety net's may have moved on while the device was away."""
        assert self._crypto is not None
        asked = adopt_from if since is not None and adopt_from is not None else since
        if asked != since:
            log.info("the device joins the sync from its own token %s (not %s)", asked, since)
        try:
            answer = await self._answer_of(
                self._homeserver.sync_json(
                    asked,
                    _chosen(asked, device=True, receipts_in=receipts_in),
                    wait=wait,
                    device_id=device_id,
                )
            )
        except HomeserverUnavailable as exc:
            self._crypto.sync_failed(str(exc))
            raise
        if isinstance(answer, Refused):
            self._crypto.sync_failed(str(answer))
            return answer
        recorded = await self._crypto.take(answer, asked)
        batch = _batch(answer, self._homeserver.bot_user_id, receipts_in)
        return batch if isinstance(batch, Refused) else replace(batch, recorded=recorded)

    async def _unless_device_joins(
        self, request: Awaitable[dict[str, Any] | Refused]
    ) -> dict[str, Any] | Refused | None:
        """The answer to a sync without the device, or None if the device joined the
        sync before it came (the request is dropped: without the device, nothing it
        answers is lost by not reading it)."""
        crypto = self._crypto
        if crypto is None or crypto.attached.is_set():
            return await request
        asked = asyncio.ensure_future(request)
        joined = asyncio.ensure_future(crypto.attached.wait())
        try:
            await asyncio.wait({asked, joined}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            joined.cancel()
            if not asked.done():
                asked.cancel()
            await asyncio.gather(joined, asked, return_exceptions=True)
        return None if asked.cancelled() else asked.result()


def _batch(
    answer: dict[str, Any] | Refused, bot: str, receipts_in: Collection[str]
) -> SyncBatch | Refused:
    if isinstance(answer, Refused):
        return answer
    next_batch = answer.get("next_batch")
    if not isinstance(next_batch, str):
        return Refused("M_UNKNOWN", "no next_batch in the /sync answer")
    rooms = _dict(answer.get("rooms"))
    joined = _dict(rooms.get("join"))
    to_device = _dict(answer.get("to_device")).get("events")
    synced = [_room(room_id, _dict(room)) for room_id, room in joined.items()]
    return SyncBatch(
        next_batch,
        synced,
        [
            invite
            for room_id, room in _dict(rooms.get("invite")).items()
            if (invite := _invite(room_id, _dict(room), bot)) is not None
        ],
        [
            receipt
            for room_id, room in joined.items()
            if room_id in receipts_in
            for receipt in receipts_of(room_id, _dict(room).get("ephemeral"))
        ],
        backlog=(isinstance(to_device, list) and len(to_device) >= TO_DEVICE_PER_ANSWER)
        or any(room.limited for room in synced),
    )


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _events(value: Any, room_id: str) -> list[dict[str, Any]]:
    events = (
        [event for event in value if isinstance(event, dict)] if isinstance(value, list) else []
    )
    for event in events:
        event.setdefault("room_id", room_id)
    return events


def _room(room_id: str, room: dict[str, Any]) -> SyncedRoom:
    timeline = _dict(room.get("timeline"))
    prev_batch = timeline.get("prev_batch")
    return SyncedRoom(
        room_id,
        [e for e in _events(timeline.get("events"), room_id) if e.get("type") in TIMELINE_TYPES],
        limited=timeline.get("limited") is True,
        prev_batch=prev_batch if isinstance(prev_batch, str) else None,
    )


def _invite(room_id: str, room: dict[str, Any], bot: str) -> dict[str, Any] | None:
    """The bot's invite among the invite's stripped state (sender, content, state_key:
    no event id, no timestamp)."""
    for event in reversed(_events(_dict(room.get("invite_state")).get("events"), room_id)):
        if event.get("type") == "m.room.member" and event.get("state_key") == bot:
            return event
    return None


def receipts_of(room_id: str, ephemeral: Any) -> list[Receipt]:
    """The read receipts among a room's ephemeral events (`m.receipt`: event id, then
    receipt type, then user, then `{"ts": ..., "thread_id": ...}`), whatever else is there."""
    found: list[Receipt] = []
    events = _dict(ephemeral).get("events")
    for event in events if isinstance(events, list) else []:
        if not isinstance(event, dict) or event.get("type") != "m.receipt":
            continue
        for event_id, by_type in _dict(event.get("content")).items():
            for receipt_type, by_user in _dict(by_type).items():
                for user_id, data in _dict(by_user).items():
                    data = _dict(data)
                    ts, thread = data.get("ts"), data.get("thread_id")
                    found.append(
                        Receipt(
                            room_id,
                            event_id,
                            user_id,
                            receipt_type,
                            _time(ts),
                            thread if isinstance(thread, str) else None,
                        )
                    )
    return found


def _time(ts: Any) -> dt.datetime | None:
    if not isinstance(ts, int) or isinstance(ts, bool) or ts < 0:
        return None
    try:
        return dt.datetime.fromtimestamp(ts / 1000, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return None
