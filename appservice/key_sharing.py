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

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import peewee
import vodozemac
from nio import Api, ErrorResponse, RoomKeyRequest
from nio.exceptions import EncryptionError

from appservice.homeserver import ENCRYPTION
from bot.core.ports import HomeserverUnavailable

log = logging.getLogger(__name__)

# How the bot reads the homeserver itself: (method, path, body) -> (status, answer).
Raw = Callable[[str, str, Any], Awaitable[tuple[int, dict[str, Any]]]]

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


class KeySharing:
    """The bot's rule for who gets its room keys, kept across the crypto clients it
    starts (counts, and the cross-signing read); `attach` each new client."""

    def __init__(self, bot_user_id: str, raw: Raw, *, verified_only: bool = False) -> None:
        self.bot_user_id = bot_user_id
        self.verified_only = verified_only
        self._raw = raw
        self.answered = 0  # requests answered, and refused (tests, status)
        self.refused = 0
        self._shares: SessionShares | None = None
        # verified_only: the devices each user cross-signed, as last read: user ->
        # {(device id, Ed25519 key)}; a user not here is read again when needed.
        self._cross_signed: dict[str, frozenset[tuple[str, str]]] = {}
        # The cross-signed devices each room's session was shared under: another set
        # (a device verified since, or no longer) means a new session.
        self._shared_under: dict[str, frozenset[tuple[str, str]]] = {}

    def attach(self, client: Any) -> None:
        """A client whose store is loaded: its shares table made, and (verified_only)
        nio kept from sharing with devices their owners have not cross-signed."""
        self._shares = SessionShares(client.store.database)
        self._cross_signed.clear()
        self._shared_under.clear()
        client.keys_queried = self._keys_queried
        if self.verified_only:
            olm = client.olm
            # nio shares a room's session with every device not blacklisted in its store:
            # one not cross-signed counts as blacklisted too, for this run only (nothing
            # is written, so turning verified_only off shares with every device again).
            blacklisted = olm.is_device_blacklisted
            olm.is_device_blacklisted = lambda device: (
                blacklisted(device) or not (self._is_cross_signed(device))
            )

    # ---- sharing ---------------------------------------------------------------------------

    async def before_share(self, client: Any, room: Any) -> None:
        """verified_only: know which devices in the room their owners cross-signed; a
        session shared under another set than now is replaced by a new one."""
        if not self.verified_only:
            return
        await self._read_cross_signing({u for u in room.users if u not in self._cross_signed})
        verified = frozenset(
            (user_id, device.id)
            for user_id in room.users
            for device in client.olm.device_store.active_user_devices(user_id)
            if self._is_cross_signed(device)
        )
        before = self._shared_under.get(room.room_id)
        if before is not None and before != verified:
            client.invalidate_outbound_session(room.room_id)
        self._shared_under[room.room_id] = verified

    def shared(self, client: Any, room_id: str) -> None:
        """Keep who the room's session now went to: the only devices it is ever given to
        again (nio forgets, with the session, when it rotates or the service restarts)."""
        assert self._shares is not None
        session = client.olm.outbound_group_sessions.get(room_id)
        if session is None:
            return
        devices = []
        for user_id, device_id in session.users_shared_with:
            device = client.olm.device_store[user_id].get(device_id)
            if device is not None:
                devices.append((user_id, device_id, device.curve25519))
        self._shares.record(session.id, room_id, devices)
        room = client.rooms.get(room_id)
        if not self.verified_only or room is None:
            return
        unverified = [
            device
            for user_id in room.users
            if user_id != self.bot_user_id
            for device in client.olm.device_store.active_user_devices(user_id)
            if not self._is_cross_signed(device)
        ]
        if unverified and not devices:
            log.warning(
                "a room key was given to no device: none of the %d there is verified by its "
                "owner (encryption.verified_only), so nobody can read the message",
                len(unverified),
            )
        elif unverified:
            log.info(
                "a room key was not given to %d device(s) their owners have not verified "
                "(encryption.verified_only)",
                len(unverified),
            )

    # ---- a device asks for a key again ---------------------------------------------------------

    async def answer(self, client: Any, event: RoomKeyRequest) -> None:
        """Forward one of the bot's sessions to a device it first shared it with, while
        its owner is in the room (and, verified_only, has cross-signed it); refuse the
        rest. HomeserverUnavailable or EncryptionError: it could not be answered now."""
        assert self._shares is not None
        olm = client.olm
        own_key = olm.account.identity_keys["curve25519"]
        group_session = (
            olm.inbound_group_store.get(event.room_id, own_key, event.session_id)
            if event.algorithm == ENCRYPTION["algorithm"]
            else None
        )
        if group_session is None:
            return self._refuse(event, "it is not for a key the bot sent")
        given_to = self._shares.given_to(
            event.session_id, event.room_id, event.sender, event.requesting_device_id
        )
        if given_to is None:
            return self._refuse(
                event, "that device was never given this key (a device or member that came later)"
            )
        room = client.rooms.get(event.room_id)
        if room is None or event.sender not in room.users:
            return self._refuse(event, "its owner is no longer in the room")
        if event.requesting_device_id not in olm.device_store[event.sender]:
            olm.users_for_key_query.add(event.sender)
            _check(await client.keys_query(), "keys query")
        device = olm.device_store[event.sender].get(event.requesting_device_id)
        if device is None or device.deleted or device.curve25519 != given_to:
            return self._refuse(event, "the device is gone, or its keys are not those given it")
        if self.verified_only:
            await self._read_cross_signing({event.sender})  # as it is now, not as it was
            if not self._is_cross_signed(device):
                return self._refuse(event, "its owner has not verified the device (verified_only)")
        if olm.session_store.get(device.curve25519) is None:
            _check(await client.keys_claim({event.sender: [device.id]}), "keys claim")
        session = olm.session_store.get(device.curve25519)
        if session is None:
            raise EncryptionError("no Olm session with the device could be made")
        message = olm._encrypt_forwarding_key(event.room_id, group_session, session, device)
        _check(await client.to_device(message), "sending the key")
        self.answered += 1
        log.info("gave a room key back to a device that had it before (%d so far)", self.answered)
        log.debug(
            "forwarded session %s of %s to %s's device %s",
            event.session_id,
            event.room_id,
            event.sender,
            event.requesting_device_id,
        )

    def _refuse(self, event: RoomKeyRequest, why: str) -> None:
        self.refused += 1
        log.warning("refused a room key request: %s", why)
        log.debug(
            "refused %s's device %s the key of session %s in %s: %s",
            event.sender,
            event.requesting_device_id,
            event.session_id,
            event.room_id,
            why,
        )

    # ---- cross-signing ---------------------------------------------------------------------

    def cross_signed(self, user_id: str, device_id: str) -> bool | None:
        """Whether the user cross-signed that device, as the bot last read it; None when it
        is to be read again before the next share (their device list changed since: the
        sync brings that news, `reconcile.gather` at most after the answer before)."""
        known = self._cross_signed.get(user_id)
        if known is None:
            return None
        return any(device == device_id for device, _key in known)

    def _is_cross_signed(self, device: Any) -> bool:
        return (device.id, device.ed25519) in self._cross_signed.get(device.user_id, frozenset())

    def _keys_queried(self, users: set[str]) -> None:
        """nio read these users' devices again (their device list changed, which a new
        cross-signature also does): their cross-signing is read again when next needed."""
        for user_id in users:
            self._cross_signed.pop(user_id, None)

    async def _read_cross_signing(self, users: set[str]) -> None:
        """Read which of these users' devices their owners cross-signed (nio keeps no
        cross-signing keys: the /keys/query answer is read here)."""
        if not users:
            return
        body = {"device_keys": {user_id: [] for user_id in sorted(users)}}
        status, answer = await self._raw("POST", "/_matrix/client/v3/keys/query", body)
        if status != 200:
            raise HomeserverUnavailable(f"reading cross-signing keys: HTTP {status}")
        signed = cross_signed_devices(answer)
        for user_id in users:
            self._cross_signed[user_id] = signed.get(user_id, frozenset())


def _check(response: Any, what: str) -> Any:
    if isinstance(response, ErrorResponse):
        raise HomeserverUnavailable(f"{what} failed: {response}")
    return response


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
