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

from collections.abc import Sequence

# About 4 MB: minutes of a busy deployment's events, hours of a quiet one's.
SIZE = 10_000


class RecentSenders:
    """Two generations: events are noted in the newer; when it is full it becomes the
    older and the old older is dropped whole. So between `size` / 2 and `size` events
    are remembered, and noting one costs a dict store, never a per-event eviction."""

    def __init__(self, size: int = SIZE) -> None:
        self._generation = max(1, size // 2)
        self._newer: dict[str, tuple[str, str]] = {}
        self._older: dict[str, tuple[str, str]] = {}

    def note(self, event_ids: Sequence[str], origins: Sequence[tuple[str, str]]) -> None:
        """Remember the (room, sender) of each event, as the intake read them.

        On every transaction's path: one store in C.
        """
        newer = self._newer
        newer.update(zip(event_ids, origins, strict=True))
        if len(newer) >= self._generation:
            self._older, self._newer = newer, {}

    def sender_of(self, room_id: str, event_id: str) -> str | None:
        noted = self._newer.get(event_id) or self._older.get(event_id)
        # Keyed by event id alone, so the room is checked: an id noted in another room
        # is not this event.
        if noted is None or noted[0] != room_id:
            return None
        return noted[1]
