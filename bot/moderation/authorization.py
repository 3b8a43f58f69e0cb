"""Who may flag whom (pure), on room state fetched fresh for each decision.

Power levels follow the room version's rules exactly as Synapse computes them
(synapse/event_auth.py get_user_power_level): in room v12 (and hydra.11) the
creators — the create event's sender and `additional_creators` — outrank
everyone and are not listed in `users`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

from bot.core.ports import RoomState

CREATOR_POWER = math.inf
# Room versions where creators have infinite power (MSC4289).
PRIVILEGED_CREATOR_VERSIONS = frozenset({"12", "org.matrix.hydra.11"})
# Room versions before v11 name the creator in the create event's content.
_CREATOR_IN_CONTENT = frozenset(str(v) for v in range(1, 11))
DEFAULT_KICK_LEVEL = 50

RefusalCode = Literal[
    "own_event",
    "not_moderator",
    "target_is_bot",
    "self_flag",
    "target_is_staff",
    "target_privileged",
    "target_outranks_flagger",
    "target_unknown",
    "room_unreadable",
    "not_in_room",
]


@dataclass(frozen=True)
class Refusal:
    code: RefusalCode
    detail: str


def _as_int(value: object, default: int = 0) -> int:
    """Old rooms may hold levels as strings ("50"); anything unusable counts as the default."""
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return default
    return default


def creators(state: RoomState) -> set[str]:
    found = {state.create_sender} if state.create_sender else set()
    extra = state.create_content.get("additional_creators")
    if isinstance(extra, list):
        found.update(user for user in extra if isinstance(user, str))
    return found


def power_level(user_id: str, state: RoomState) -> float:
    if state.room_version in PRIVILEGED_CREATOR_VERSIONS and user_id in creators(state):
        return CREATOR_POWER
    levels = state.power_levels
    if isinstance(levels, Mapping):
        users = levels.get("users")
        if isinstance(users, Mapping) and user_id in users:
            return _as_int(users[user_id])
        return _as_int(levels.get("users_default", 0))
    creator = (
        state.create_content.get("creator")
        if state.room_version in _CREATOR_IN_CONTENT
        else state.create_sender
    )
    return 100 if creator == user_id else 0


def kick_level(state: RoomState) -> int:
    levels = state.power_levels
    if isinstance(levels, Mapping) and "kick" in levels:
        return _as_int(levels["kick"], DEFAULT_KICK_LEVEL)
    return DEFAULT_KICK_LEVEL


def can_kick(user_id: str, target_power: float, state: RoomState) -> bool:
    """The spec's rule: at least the kick level, and strictly above the target."""
    mine = power_level(user_id, state)
    return mine >= kick_level(state) and mine > target_power


def can_redact(user_id: str, state: RoomState) -> bool:
    """At least the room's `redact` level (default 50): may redact others' events."""
    levels = state.power_levels
    needed = DEFAULT_KICK_LEVEL
    if isinstance(levels, Mapping) and "redact" in levels:
        needed = _as_int(levels["redact"], DEFAULT_KICK_LEVEL)
    return power_level(user_id, state) >= needed


def room_powers(bot_user_id: str, state: RoomState) -> tuple[bool, bool]:
    """(can remove members, can redact others' events), for the bot in that room."""
    # Members sit at users_default; the bot must outrank them to remove them.
    default = power_level("@nobody:invalid", state)
    return can_kick(bot_user_id, default, state), can_redact(bot_user_id, state)


def event_level(state: RoomState, event_type: str, *, state_event: bool) -> int:
    """The power needed to send an event of this type (the spec's defaults: 0 for
    messages, 50 for state)."""
    levels = state.power_levels
    if not isinstance(levels, Mapping):
        return 0
    events = levels.get("events")
    if isinstance(events, Mapping) and event_type in events:
        return _as_int(events[event_type])
    key, default = ("state_default", 50) if state_event else ("events_default", 0)
    return _as_int(levels.get(key, default), default)


def moderation_level(state: RoomState) -> int:
    """What a user needs to remove members, redact their messages and post a notice."""
    levels = state.power_levels if isinstance(state.power_levels, Mapping) else {}
    redact = _as_int(levels.get("redact", DEFAULT_KICK_LEVEL), DEFAULT_KICK_LEVEL)
    message = event_level(state, "m.room.message", state_event=False)
    return max(kick_level(state), redact, message)


def is_staff(
    user_id: str,
    *,
    staff_users: Collection[str],
    staff_room: RoomState | None,
    staff_power_level: int,
) -> bool:
    if user_id in staff_users:
        return True
    return staff_room is not None and power_level(user_id, staff_room) >= staff_power_level


def decide_flag(
    *,
    flagger: str,
    target: str,
    room: RoomState,
    bot_user_id: str,
    moderator_power_level: int,
    target_is_staff: bool,
) -> Refusal | None:
    """None when the flag may proceed; otherwise why not (reported to staff, never the room)."""
    if flagger == bot_user_id:
        return Refusal("own_event", "the bot's own event")
    flagger_power = power_level(flagger, room)
    if flagger_power < moderator_power_level:
        return Refusal(
            "not_moderator",
            f"{flagger} is not a moderator in that room (power {_show(flagger_power)}, "
            f"needs {moderator_power_level})",
        )
    if target == bot_user_id:
        return Refusal("target_is_bot", "the flagged message was the bot's own")
    if target == flagger:
        return Refusal("self_flag", f"{flagger} flagged their own message")
    if target_is_staff:
        return Refusal("target_is_staff", f"{target} is staff and cannot be flagged")
    target_power = power_level(target, room)
    if target_power >= moderator_power_level:
        return Refusal(
            "target_privileged",
            f"{target} is a moderator or room creator (power {_show(target_power)}) "
            "and cannot be flagged",
        )
    if target_power >= flagger_power:
        return Refusal(
            "target_outranks_flagger",
            f"{target} (power {_show(target_power)}) is not below {flagger} "
            f"(power {_show(flagger_power)})",
        )
    return None


def _show(power: float) -> str:
    return "creator" if math.isinf(power) else str(int(power))
