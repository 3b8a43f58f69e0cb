"""Reactions, as every part of the policy reads them: one definition of each key and shape."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

VARIATION_SELECTOR = "\ufe0f"
# What staff react with on the bot's own staff-room messages.
CLAIM_KEY = "✋"  # on a check-in notice: I'll take it
ACK_KEY = "✅"  # on an alert: seen, on it


def normalise_key(key: str) -> str:
    """Reaction keys compare without U+FE0F: "🚨" and "🚨\ufe0f" are the same flag."""
    return key.replace(VARIATION_SELECTOR, "").strip()


def annotation(content: object) -> tuple[str, str] | None:
    """(normalised key, reacted-to event id) of a reaction's content, or None.

    Encrypted reactions carry the same relation in cleartext, so this reads both.
    """
    if not isinstance(content, Mapping):
        return None
    relation: Any = content.get("m.relates_to")
    if not isinstance(relation, Mapping) or relation.get("rel_type") != "m.annotation":
        return None
    key, target = relation.get("key"), relation.get("event_id")
    if not isinstance(key, str) or not isinstance(target, str):
        return None
    return normalise_key(key), target
