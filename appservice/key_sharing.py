"""Who may have the bot's room keys: the devices each session was shared with, kept
with the crypto store so a key request is answered by the same rule after a restart,
and which devices their owners cross-signed (`encryption.verified_only`).

The rule for a room-key request (m.room_key_request) from another user's device: the
bot forwards one of its own Megolm sessions only to a device it first shared that
session with — the same user, the same device id, the same Curve25519 key — and only
while that user is still in the room. A device that lost its copy gets it back; a new
device of the same account, or someone who joined or was invited later, gets nothing
(they were never given it). It is the rule matrix-rust-sdk (Element) follows for its
own sessions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import peewee
import vodozemac
from nio import Api

# In the crypto store's own database (one file, backed up and restored together with
# the sessions it is about; a new device starts both afresh). nio's own tables are
# untouched.
TABLE = "safeguard_session_shares"


class SessionShares:
    """Who each of the bot's outbound Megolm sessions was shared with (nio keeps that
    only in memory, for the session it is still sending with)."""

    def __init__(self, database: peewee.Database) -> None:
        self._database = database
        database.execute_sql(
            f"CREATE TABLE IF NOT EXISTS {TABLE} ("
            " session_id TEXT NOT NULL, room_id TEXT NOT NULL, user_id TEXT NOT NULL,"
            " device_id TEXT NOT NULL, curve25519 TEXT NOT NULL,"
            " PRIMARY KEY (session_id, user_id, device_id))"
        )

    def record(
        self, session_id: str, room_id: str, devices: Iterable[tuple[str, str, str]]
    ) -> None:
        """The session was shared with these (user, device, Curve25519 key)."""
        rows = [(session_id, room_id, user, device, key) for user, device, key in devices]
        if not rows:
            return
        with self._database.atomic():
            for row in rows:
                self._database.execute_sql(
                    f"INSERT OR IGNORE INTO {TABLE} "
                    "(session_id, room_id, user_id, device_id, curve25519) VALUES (?, ?, ?, ?, ?)",
                    row,
                )

    def given_to(self, session_id: str, room_id: str, user_id: str, device_id: str) -> str | None:
        """The Curve25519 key of the device the session was shared with, or None: it
        never was (or not in that room)."""
        cursor = self._database.execute_sql(
            f"SELECT curve25519 FROM {TABLE} "
            "WHERE session_id = ? AND room_id = ? AND user_id = ? AND device_id = ?",
            (session_id, room_id, user_id, device_id),
        )
        row = cursor.fetchone()
        return row[0] if row else None


# ---- cross-signing (encryption.verified_only) ---------------------------------------------


def cross_signed_devices(query: dict[str, Any]) -> dict[str, frozenset[tuple[str, str]]]:
    """From a /keys/query answer: for each user asked about, their devices (id, Ed25519
    key) signed by their self-signing key, itself signed by their master key.

    This is the owner vouching for their own device (what Element's "verify this
    device" does); it says nothing of whether the bot trusts the owner's master key,
    which a bot cannot check."""
    found: dict[str, frozenset[tuple[str, str]]] = {}
    device_keys = query.get("device_keys")
    if not isinstance(device_keys, dict):
        return found
    for user_id, devices in device_keys.items():
        found[user_id] = frozenset()
        master = _cross_signing_key(query.get("master_keys"), user_id, "master")
        self_signing_object = (query.get("self_signing_keys") or {}).get(user_id)
        self_signing = _cross_signing_key(query.get("self_signing_keys"), user_id, "self_signing")
        if master is None or self_signing is None:
            continue
        if not _signed_by(self_signing_object, user_id, master):
            continue
        signed = set()
        for device_id, keys in (devices if isinstance(devices, dict) else {}).items():
            if not isinstance(keys, dict):
                continue
            ed25519 = (keys.get("keys") or {}).get(f"ed25519:{device_id}")
            if (
                keys.get("user_id") == user_id
                and keys.get("device_id") == device_id
                and isinstance(ed25519, str)
                and _signed_by(keys, user_id, self_signing)
            ):
                signed.add((device_id, ed25519))
        found[user_id] = frozenset(signed)
    return found


def _cross_signing_key(keys: Any, user_id: str, usage: str) -> str | None:
    """The user's single cross-signing public key for this usage, or None."""
    entry = keys.get(user_id) if isinstance(keys, dict) else None
    if not isinstance(entry, dict) or entry.get("user_id") != user_id:
        return None
    if usage not in (entry.get("usage") or []):
        return None
    values = list((entry.get("keys") or {}).values())
    return values[0] if len(values) == 1 and isinstance(values[0], str) else None


def _signed_by(signed: Any, user_id: str, public_key: str) -> bool:
    """Whether `signed` carries the user's signature by this Ed25519 key, over its
    canonical JSON without `signatures` and `unsigned`."""
    if not isinstance(signed, dict):
        return False
    signature = ((signed.get("signatures") or {}).get(user_id) or {}).get(f"ed25519:{public_key}")
    if not isinstance(signature, str):
        return False
    body = {k: v for k, v in signed.items() if k not in ("signatures", "unsigned")}
    try:
        vodozemac.Ed25519PublicKey.from_base64(public_key).verify_signature(
            Api.to_canonical_json(body).encode(), vodozemac.Ed25519Signature.from_base64(signature)
        )
    except ValueError:  # vodozemac's: a malformed key or signature, or a wrong one
        return False
    return True
