"""What the policy core needs to know about its deployment, gathered once at start."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bot.metrics import Metrics
from bot.settings import CheckinSettings, MessageTemplates, PolicySettings, Resource
from bot.store.audit import Provenance


@dataclass
class PolicyContext:
    policy: PolicySettings
    checkin: CheckinSettings
    messages: MessageTemplates
    resources: list[Resource]
    bot_user_id: str
    provenance: Provenance
    may_invite: Callable[[str], bool]
    metrics: Metrics = field(default_factory=Metrics)
    # Resolved from policy.staff_room at start (an alias becomes a room id).
    staff_room_id: str | None = None
    # Rooms whose every message matters (the staff room and the members' DMs),
    # kept in memory so the transaction hot path can tell them apart cheaply.
    watched_rooms: set[str] = field(default_factory=set)

    @property
    def staff_room(self) -> str:
        """Where staff messages are queued: the room id once resolved, else the configured
        alias, which delivery resolves (and waits for) when it can."""
        room = self.staff_room_id or self.policy.staff_room
        if room is None:  # check_runnable refuses to run such a config
            raise RuntimeError("policy.staff_room is not set")
        return room

    def watch(self, room_id: str) -> None:
        self.watched_rooms.add(room_id)
