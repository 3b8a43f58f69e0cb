"""The bot's end-to-end encryption: one device, Olm and Megolm through matrix-nio (vodozemac).

Why this shape (route "b" of issue 12, chosen over Synapse's experimental
appservice to-device extensions): the bot is an ordinary user in the
appservice's exclusive namespace — not its `sender_localpart` — so it may
/sync, and nio's own sync loop receives the room keys other devices send it.
To-device messages wait in the device's inbox until a sync acknowledges them,
so a key sent while the service is down or restarting is not lost (in
appservice transactions, Synapse drops them for good when the service is
unreachable). Room events still arrive in transactions; this module decrypts
them, and encrypts what the bot sends.

Every request acts as the bot through the as_token (`?user_id=` and, for the
device, `?device_id=`): no access token exists to leak or rotate, and calls stay
appservice calls (not rate limited). One device per crypto store, reused across
restarts; a store that is lost means a new device (the old one is deleted, and
members' clients re-key to the new one). Devices are trusted on first use: a
bot cannot verify anyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import ClientConnectionError
from nio import (
    AsyncClientConfig,
    ErrorResponse,
    Event,
    ForwardedRoomKeyEvent,
    MegolmEvent,
    RoomKeyEvent,
    RoomKeyRequest,
)
from nio.exceptions import EncryptionError, LocalProtocolError

from appservice.homeserver import ENCRYPTION, BotClient
from bot.ports import HomeserverUnavailable

log = logging.getLogger(__name__)

MAX_TIMEOUTS = 2
REQUEST_TIMEOUT_SECONDS = 45  # above the sync's 30 s long poll
# What nio raises once it gives up on a connection (see MAX_TIMEOUTS).
TRANSPORT_ERRORS = (ClientConnectionError, TimeoutError, asyncio.TimeoutError)


@contextlib.asynccontextmanager
async def _outage_as_unavailable(what: str) -> AsyncIterator[None]:
    """A dead connection is the homeserver being away: callers retry it as an outage."""
    try:
        yield
    except TRANSPORT_ERRORS as exc:
        raise HomeserverUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc


# What the crypto client syncs: state and to-device, hardly any timeline (room
# events come in transactions), no presence.
SYNC_FILTER = {
    "presence": {"not_types": ["*"]},
    "account_data": {"not_types": ["*"]},
    "room": {
        "timeline": {"limit": 1},
        "ephemeral": {"not_types": ["*"]},
        "account_data": {"not_types": ["*"]},
    },
}
# A room the bot just created is encrypted only once the sync has shown it with its members.
ROOM_KNOWN_WITHIN = 15.0


class BotCrypto:
    def __init__(
        self,
        hs_url: str,
        as_token: str,
        bot_user_id: str,
        store: Path,
        *,
        display_name: str = "Safeguarding",
        on_room_key: Callable[[], None] = lambda: None,
    ) -> None:
        self.bot_user_id = bot_user_id
        self._as_token = as_token
        self.store = store
        self._display_name = display_name
        self._on_room_key = on_room_key
        store.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.client = BotClient(
            hs_url,
            bot_user_id,
            store_path=str(store),
            config=AsyncClientConfig(
                encryption_enabled=True,
                store_sync_tokens=True,
                # nio retries a dead connection this many times, then raises: with no
                # limit a homeserver that is down is waited on for ever, in silence —
                # never on /health, and encrypting a message waits holding the lock.
                max_timeouts=MAX_TIMEOUTS,
                request_timeout=REQUEST_TIMEOUT_SECONDS,
                pickle_key=self._pickle_key(),
            ),
        )
        self.client.add_to_device_callback(self._key_arrived, (RoomKeyEvent, ForwardedRoomKeyEvent))
        self.client.add_to_device_callback(self._key_requested, RoomKeyRequest)
        self.keys_forwarded = 0  # keys re-shared on a member's request (tests, status)
        self._sync_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one key upload / share / claim at a time
        self.ready = asyncio.Event()
        # Why it cannot work now (None while starting up: that is work in progress).
        self.problem: str | None = None
        self._encrypted: dict[str, bool] = {}  # rooms whose encryption state we read ourselves

    # ---- the device -------------------------------------------------------------------------

    def _pickle_key(self) -> str:
        """The key nio pickles the Olm account with, kept with the store it protects."""
        path = self.store / "pickle.key"
        with contextlib.suppress(FileExistsError):
            fd = _create_private(path)
            with open(fd, "w", encoding="ascii") as handle:
                handle.write(secrets.token_hex(32))
        return path.read_text(encoding="ascii").strip()

    @property
    def _device_file(self) -> Path:
        return self.store / "device.json"

    def _store_file(self, device_id: str) -> Path:
        return self.store / f"{self.bot_user_id}_{device_id}.db"

    async def _raw(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        response = await self.client.send(
            method,
            path,
            json.dumps(body) if body is not None else None,
            {"Authorization": f"Bearer {self._as_token}", "Content-Type": "application/json"},
        )
        payload = await response.json(content_type=None)
        return response.status, payload if isinstance(payload, dict) else {}

    async def _device(self) -> str:
        """The device this store belongs to: reused, or made (a lost store: replaced)."""
        state: dict[str, Any] = {}
        if self._device_file.exists():
            state = json.loads(self._device_file.read_text())
        recorded = state.get("device_id")
        self.client.masquerade_user = self.bot_user_id
        self.client.masquerade_device = ""
        if recorded and self._store_file(recorded).exists():
            device_id = recorded
        else:
            if recorded:
                log.warning("the crypto store of device %s is gone: a new device", recorded)
                path = f"/_matrix/client/v3/devices/{quote(recorded, safe='')}"
                await self._raw("DELETE", path, {})
            device_id = "SAFEGUARD" + secrets.token_hex(5).upper()
            self._device_file.write_text(json.dumps({"device_id": device_id}))
        status, body = await self._raw(
            "PUT",
            f"/_matrix/client/v3/devices/{quote(device_id, safe='')}",
            {"display_name": self._display_name},
        )
        if status not in (200, 201):
            raise HomeserverUnavailable(f"the bot's device could not be made ({status} {body})")
        return device_id

    async def start(self) -> None:
        """Make or reuse the device, publish its keys, catch up on to-device, then sync on."""
        began = time.monotonic()
        device_id = await self._device()
        self.client.masquerade_device = device_id
        self.client.restore_login(self.bot_user_id, device_id, self._as_token)
        async with self._lock:
            if self.client.should_upload_keys:
                self._check(await self.client.keys_upload(), "keys upload")
        # Full state every start: nio keeps no rooms in its store, only the sync token,
        # and an encrypted room it does not know is one it cannot send to. The stored
        # token still brings every to-device message that came while we were away.
        first = await self.client.sync(timeout=0, full_state=True, sync_filter=SYNC_FILTER)
        self._check(first, "the first sync")
        await self._keys_housekeeping()
        self._sync_task = asyncio.create_task(self._sync_forever(), name="crypto-sync")
        self.problem = None
        self.ready.set()
        log.info(
            "end-to-end encryption ready: device %s (%.2fs)", device_id, time.monotonic() - began
        )

    async def _keys_housekeeping(self) -> None:
        """What nio's own loop does between syncs: to-device out, keys up, devices known."""
        client = self.client
        async with self._lock:
            if client.outgoing_to_device_messages:
                await client.send_to_device_messages()
            if client.should_upload_keys:  # one-time keys topped up
                self._check(await client.keys_upload(), "keys upload")
            if client.should_query_keys:
                self._check(await client.keys_query(), "keys query")
            if client.should_claim_keys:
                self._check(
                    await client.keys_claim(client.get_users_for_key_claiming()), "keys claim"
                )

    async def _sync_forever(self) -> None:
        delay = 1.0
        while True:
            try:
                response = await self.client.sync(timeout=30_000, sync_filter=SYNC_FILTER)
                if isinstance(response, ErrorResponse):
                    raise HomeserverUnavailable(str(response))
                await self._keys_housekeeping()
                self.problem = None
                delay = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.problem = f"the bot's sync for encryption fails: {type(exc).__name__}: {exc}"
                log.warning("%s; retrying in %.0fs", self.problem, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _key_arrived(self, event: RoomKeyEvent | ForwardedRoomKeyEvent) -> None:
        self._on_room_key()

    async def _key_requested(self, event: RoomKeyRequest) -> None:
        """A member of the room lost the key of a message the bot sent: share it again.

        nio answers only the bot's own devices; a member's device asking for one of the
        bot's own sessions, for a room they are in (joined or invited), gets it — the
        same rule by which it got it first (trust on first use)."""
        if event.sender == self.bot_user_id or event.algorithm != ENCRYPTION["algorithm"]:
            return
        olm = self.client.olm
        room = self.client.rooms.get(event.room_id)
        if olm is None or room is None or event.sender not in room.users:
            return
        own_key = olm.account.identity_keys["curve25519"]
        group_session = olm.inbound_group_store.get(event.room_id, own_key, event.session_id)
        if group_session is None:
            return  # not a session the bot created: not its to give
        try:
            async with self._lock:
                if event.requesting_device_id not in olm.device_store[event.sender]:
                    olm.users_for_key_query.add(event.sender)
                    self._check(await self.client.keys_query(), "keys query")
                device = olm.device_store[event.sender][event.requesting_device_id]
                if olm.session_store.get(device.curve25519) is None:
                    claimed = await self.client.keys_claim(
                        {event.sender: [event.requesting_device_id]}
                    )
                    self._check(claimed, "keys claim")
                session = olm.session_store.get(device.curve25519)
                if session is None:
                    return
                message = olm._encrypt_forwarding_key(event.room_id, group_session, session, device)
                await self.client.to_device(message)
                self.keys_forwarded += 1
        except (KeyError, HomeserverUnavailable, EncryptionError, *TRANSPORT_ERRORS) as exc:
            log.warning("could not re-share a room key with a member: %s", exc)

    @staticmethod
    def _check(response: Any, what: str) -> Any:
        if isinstance(response, ErrorResponse):
            raise HomeserverUnavailable(f"{what} failed: {response}")
        return response

    async def close(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sync_task
        await self.client.close()
        store = getattr(self.client, "store", None)
        if store is not None:
            with contextlib.suppress(Exception):
                store.database.close()

    # ---- decrypting --------------------------------------------------------------------------

    def decrypt(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """The event with its plaintext type and content; None while its key has not come."""
        parsed = Event.parse_event(event)
        if not isinstance(parsed, MegolmEvent):
            return None
        parsed.room_id = event.get("room_id", "")
        try:
            decrypted = self.client.decrypt_event(parsed)
        except (EncryptionError, LocalProtocolError):
            return None
        source = getattr(decrypted, "source", None)
        if not isinstance(source, dict) or not isinstance(source.get("content"), dict):
            return None
        return {**event, "type": source.get("type", "m.room.message"), "content": source["content"]}

    async def request_key(self, event: dict[str, Any]) -> None:
        """Ask the sender's device (and our own others) for a key we never got."""
        parsed = Event.parse_event(event)
        if not isinstance(parsed, MegolmEvent):
            return
        if parsed.session_id in self.client.outgoing_key_requests:
            return
        async with self._lock:
            for user_id, device_id in ((parsed.sender, parsed.device_id), (self.bot_user_id, "*")):
                message = parsed.as_key_request(user_id, self.client.device_id, device_id=device_id)
                self.client.olm.outgoing_to_device_messages.append(message)
            await self.client.send_to_device_messages()

    # ---- encrypting --------------------------------------------------------------------------

    async def room_encrypted(self, room_id: str, read: Callable[[], Any]) -> bool:
        """Whether the room is encrypted: as the sync knows it, else as `read()` finds it."""
        room = self.client.rooms.get(room_id)
        if room is not None and room.encrypted:
            return True
        if room_id in self._encrypted:
            return self._encrypted[room_id]
        encrypted = bool(await read())
        self._encrypted[room_id] = encrypted
        return encrypted

    def created(self, room_id: str, *, encrypted: bool) -> None:
        """A room the bot just created, encrypted from its first event or not at all (no
        one else in it may change that; if anyone does, the sync shows it first)."""
        self._encrypted[room_id] = encrypted

    async def encrypt(
        self, room_id: str, event_type: str, content: dict[str, Any], *, members: list[str]
    ) -> dict[str, Any]:
        """The m.room.encrypted content for a message: keys shared with every device of
        every joined and invited member first (trust on first use)."""
        room = await self._known_room(room_id, members)
        async with self._lock, _outage_as_unavailable("encrypting"):
            if not room.members_synced:
                # Everyone the room has (the sync's state lists the invited too).
                self._check(await self.client.joined_members(room_id), "the room's members")
            if self.client.should_query_keys:
                self._check(await self.client.keys_query(), "keys query")
            if self.client.olm.should_share_group_session(room_id):
                await self.client.share_group_session(room_id, ignore_unverified_devices=True)
            _, encrypted = self.client.encrypt(room.room_id, event_type, content)
        return encrypted

    async def _known_room(self, room_id: str, members: list[str]) -> Any:
        """The room as the sync shows it, with these members in it (a room just created,
        or a member just invited, appears with the next sync)."""
        deadline = time.monotonic() + ROOM_KNOWN_WITHIN
        while True:
            room = self.client.rooms.get(room_id)
            if room is not None and room.encrypted and all(m in room.users for m in members):
                return room
            if time.monotonic() > deadline:
                raise HomeserverUnavailable(
                    f"the encrypted room {room_id} has not reached the bot's sync yet"
                )
            await asyncio.sleep(0.05)

    # ---- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        olm = self.client.olm
        return {
            "ok": self.problem is None,
            "ready": self.ready.is_set(),
            "device_id": self.client.device_id,
            "one_time_keys": olm.uploaded_key_count if olm else None,
            "encrypted_rooms": len(self.client.encrypted_rooms),
            **({"problem": self.problem} if self.problem else {}),
        }


async def offline_status(
    hs_url: str, as_token: str, bot_user_id: str, store: Path
) -> dict[str, Any]:
    """What `safeguard e2ee status` shows: read from the store (and, if the homeserver
    answers, the one-time keys it holds for the device)."""
    device_file = store / "device.json"
    if not device_file.exists():
        return {"device_id": None, "store": str(store), "note": "no device yet (first run)"}
    device_id = json.loads(device_file.read_text()).get("device_id")
    crypto = BotCrypto(hs_url, as_token, bot_user_id, store)
    try:
        crypto.client.masquerade_user = bot_user_id
        crypto.client.masquerade_device = device_id
        crypto.client.restore_login(bot_user_id, device_id, as_token)  # reads the store only
        olm = crypto.client.olm
        status: dict[str, Any] = {
            "device_id": device_id,
            "store": str(crypto._store_file(device_id)),
            "identity_key": olm.account.identity_keys["ed25519"] if olm else None,
            "encrypted_rooms": sorted(crypto.client.encrypted_rooms),
        }
        try:
            code, body = await crypto._raw("POST", "/_matrix/client/v3/keys/upload", {})
            if code == 200:
                counts = body.get("one_time_key_counts") or {}
                status["one_time_keys"] = counts.get("signed_curve25519", 0)
        except Exception as exc:  # offline: the store still says what it holds
            status["one_time_keys"] = f"unknown (homeserver: {type(exc).__name__})"
        return status
    finally:
        await crypto.close()


def _create_private(path: Path) -> int:
    import os

    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
