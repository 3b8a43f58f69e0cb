"""Who sent each recent event, kept as events arrive, so that a flag on a message needs
no read of that message to know whose it is.

The intake keeps every transaction it accepts (`Intake.accept`); the referral asks the
same instance before reading the flagged event from the homeserver. The message
always arrives before any flag on it (Synapse pushes a room's events in order), so
a flag on a recent message finds it. The sender comes from the same delivery that
carries the flag itself — whose own sender, the flagger, is taken as delivered —
so this trusts nothing the flag does not.

What is kept is the transaction's body as it came, by reference: one object the
server already holds, so keeping it costs the path every event takes nothing per
event (an index of ids or senders, built there, cost that path a tenth of its
speed: allocations kept alive, freed minutes later from a cold cache). The cost
moves to the question, asked once per flag: the bodies are searched for the id
in C, newest first, and only one that holds it is parsed (about 0.1 ms). Events
that came without a body (caught up from room history) are kept as the intake's
own lists.

Bounded, by size: the oldest are forgotten first. A flag on a message older than
that, or sent before the service started, reads the message, as it would without
this. The bodies hold what members wrote, in memory only, for minutes; nothing of
it is written anywhere.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from bot.intake.json_body import parse_body

# Minutes of a busy deployment's events, hours of a quiet one's.
SIZE_BYTES = 4 * 1024 * 1024
# What an event kept without a body is counted as (about a pushed event's size).
EVENT_BYTES = 400

_Events = tuple[Sequence[str], Sequence[Mapping[str, Any]]]


class RecentSenders:
    def __init__(self, size_bytes: int = SIZE_BYTES) -> None:
        self._size = size_bytes
        self._kept: deque[tuple[bytes | _Events, int]] = deque()
        self._bytes = 0

    def note_body(self, body: bytes) -> None:
        """Keep a transaction's body, as the server read it (the intake accepted it)."""
        self._keep(body, len(body))

    def note(self, event_ids: Sequence[str], events: Sequence[Mapping[str, Any]]) -> None:
        """Keep events that came without a body, each with a string room_id and sender
        (as the intake checked them), `event_ids[i]` being `events[i]`'s id."""
        if event_ids:
            self._keep((event_ids, events), EVENT_BYTES * len(event_ids))

    def _keep(self, entry: bytes | _Events, weight: int) -> None:
        kept = self._kept
        kept.append((entry, weight))
        self._bytes += weight
        while self._bytes - kept[0][1] >= self._size:
            self._bytes -= kept.popleft()[1]

    def sender_of(self, room_id: str, event_id: str) -> str | None:
        try:
            needle = event_id.encode()
        except UnicodeEncodeError:
            return None
        for entry, _ in reversed(self._kept):
            if isinstance(entry, bytes):
                if needle not in entry:  # in C; most bodies are ruled out here
                    continue
                found = _in_body(entry, event_id)
            else:
                found = _in_events(entry, event_id)
            if found is None:
                continue  # named there (a reaction to it, a reply), but not there itself
            # Keyed by event id alone, so the room is checked: an id noted in another room
            # is not this event.
            room, sender = found
            return sender if room == room_id else None
        return None


def _in_body(body: bytes, event_id: str) -> tuple[str, str] | None:
    """(room, sender) of the event with that id in a transaction's body, if it is one of
    the body's events (its id may be there only in another event's content)."""
    try:
        payload, _ = parse_body(body)
    except (ValueError, RecursionError):
        return None
    events = payload.get("events") if isinstance(payload, dict) else None
    for event in events if isinstance(events, list) else ():
        if isinstance(event, dict) and event.get("event_id") == event_id:
            room, sender = event.get("room_id"), event.get("sender")
            if isinstance(room, str) and isinstance(sender, str):
                return room, sender
    return None


def _in_events(events: _Events, event_id: str) -> tuple[str, str] | None:
    event_ids, kept = events
    try:
        event = kept[event_ids.index(event_id)]
    except ValueError:
        return None
    return event["room_id"], event["sender"]
