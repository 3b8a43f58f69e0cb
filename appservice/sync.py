"""The bot's own /sync, as the safety net behind Synapse's push (bot/safety_net.py).

One long poll for every room the bot is in or invited to, masquerading as the bot
through the as_token. The filter brings only what the policy reads: the timeline
event types the intake acts on, no presence, typing or account data, members
lazy-loaded and no other state (the intake reads state from the timeline; the
room-state cache reads it apart). A start asks for one event a room, so the first
answer is small however many rooms the bot has been in. Read receipts are asked
for only in the rooms named (the DMs whose notice is still unread,
bot/notice_reads.py): never a group room's, and none at all when there is none.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Collection
from typing import Any

from appservice.homeserver import NioHomeserver
from bot.ports import Receipt, Refused, SyncBatch, SyncedRoom

# What the policy reads from a room's timeline (bot/intake.py, bot/dispatch.py).
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
# Events of a room in one answer: more than this since the last one makes the timeline `limited`,
# and that room alone is read back (bot/safety_net.py).
TIMELINE_LIMIT = 50


def _filter(timeline_limit: int, receipts_in: Collection[str] = ()) -> str:
    nothing = {"not_types": ["*"]}
    receipts = {"types": ["m.receipt"], "rooms": sorted(receipts_in)}
    return json.dumps(
        {
            "presence": nothing,
            "account_data": nothing,
            "room": {
                "timeline": {"limit": timeline_limit, "types": TIMELINE_TYPES},
                "state": {"lazy_load_members": True, "types": []},
                "ephemeral": receipts if receipts_in else nothing,
                "account_data": nothing,
                "include_leave": False,
            },
        },
        separators=(",", ":"),
    )


ON_START = _filter(1)
ONGOING = _filter(TIMELINE_LIMIT)


class BotSync:
    """`bot.ports.Syncing` on the bot's homeserver connection."""

    def __init__(self, homeserver: NioHomeserver) -> None:
        self._homeserver = homeserver

    async def sync(
        self, since: str | None, *, wait: float, receipts_in: Collection[str] = ()
    ) -> SyncBatch | Refused:
        chosen = ON_START if since is None else _filter(TIMELINE_LIMIT, receipts_in)
        answer = await self._homeserver.sync_json(since, chosen, wait=wait)
        if isinstance(answer, Refused):
            return answer
        next_batch = answer.get("next_batch")
        if not isinstance(next_batch, str):
            return Refused("M_UNKNOWN", "no next_batch in the /sync answer")
        rooms = _dict(answer.get("rooms"))
        bot = self._homeserver.bot_user_id
        joined = _dict(rooms.get("join"))
        return SyncBatch(
            next_batch,
            [_room(room_id, _dict(room)) for room_id, room in joined.items()],
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
        _events(timeline.get("events"), room_id),
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
