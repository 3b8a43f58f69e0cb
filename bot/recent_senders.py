"""Who sent each recent event, noted as events arrive, so that a flag on a message needs
no read of that message to know whose it is.

The intake notes every event it accepts (`Intake.accept`); the referral asks the
same instance before reading the flagged event from the homeserver. The message
always arrives before any flag on it (Synapse pushes a room's events in order), so
a flag on a recent message finds it. The sender comes from the same delivery that
carries the flag itself — whose own sender, the flagger, is taken as delivered —
so this trusts nothing the flag does not.

Bounded: the oldest are forgotten first. A flag on a message older than that, or
sent before the service started, reads the message, as it would without this.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any

# About 4 MB: minutes of a busy deployment's events, hours of a quiet one's.
SIZE = 10_000
_KEY = itemgetter("room_id", "event_id")
_SENDER = itemgetter("sender")


class RecentSenders:
    def __init__(self, size: int = SIZE) -> None:
        self._size = size
        self._senders: dict[tuple[str, str], str] = {}

    def note(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Remember who sent each event (well-formed events, as the intake takes them).

        On every transaction's path (about half a microsecond an event): the stores run
        in C (map, zip, update), the oldest are dropped in bulk.
        """
        senders = self._senders
        senders.update(zip(map(_KEY, events), map(_SENDER, events), strict=True))
        excess = len(senders) - self._size
        if excess > 0:
            # Dicts keep insertion order: the first keys are the oldest.
            for key in list(itertools.islice(senders, excess)):
                del senders[key]

    def sender_of(self, room_id: str, event_id: str) -> str | None:
        return self._senders.get((room_id, event_id))
