"""The bot's end-to-end encryption: one device, Olm and Megolm through matrix-nio (vodozemac).

Why this shape (route "b" of issue 12, chosen over Synapse's experimental
appservice to-device extensions): the bot is an ordinary user in the
appservice's exclusive namespace — not its `sender_localpart` — so it may
/sync, and a sync as the device receives the room keys other devices send it.
To-device messages wait in the device's inbox until a sync acknowledges them,
so a key sent while the service is down or restarting is not lost (in
appservice transactions, Synapse drops them for good when the service is
unreachable). Room events still arrive in transactions; this module decrypts
them, and encrypts what the bot sends.

The device has no sync of its own: the bot's one sync (the safety net,
appservice/sync.py) carries the device while it is `attached`, and hands each
answer here first (`take`: to-device, device lists, one-time key counts, then
keys up, devices queried, key requests answered). Synapse deletes the device's
to-device messages up to the token a sync asks *from*, so the device's own token
(kept in its store, stored only once the whole answer is recorded) is where the
first answer after any start is asked from; while the store is broken the sync
goes on without the device, and the inbox waits on the homeserver untouched.
nio is never given the full state of every room: a room it must encrypt to is
read from the homeserver when needed (its encryption and members, as nio's own
room_send reads a lazily-loaded room's), and kept up to date by the timeline's
membership events; a gap in a room's timeline makes it read again.

Every request acts as the bot through the as_token (`?user_id=` and, for the
device, `?device_id=`): no access token exists to leak or rotate, and calls stay
appservice calls (not rate limited). One device per crypto store, reused across
restarts; a store that is lost means a new device (the old one is deleted, and
members' clients re-key to the new one). Devices are trusted on first use: a
bot cannot verify anyone.

A member's device that lost a key of the bot's may ask for it again: it gets it only if
it is a device the bot first shared that session with (appservice/key_sharing.py). With
`encryption.verified_only`, keys go only to devices their owner cross-signed.

Encryption is never a single point of failure. A store that cannot be read (a
backup restored with the wrong `pickle.key`, a broken volume) or written (a full
disk, a read-only mount) is a fault of its own, told apart from the homeserver
being away: `problem` and `broken` say what is wrong and what to do, the sync
goes on without the device (an answer whose to-device messages cannot be stored
is never acknowledged), the service is told once (`on_broken`), and `run()`
keeps probing and starts a new client on the repaired store by itself. A sync
failing for over a minute is told to staff too (`sync_failing`), and new rooms
are made without encryption meanwhile. Meanwhile every case goes on: what cannot
be encrypted in time is sent in the clear, said so (encryption.fallback).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import peewee
from aiohttp import ClientConnectionError
from nio import (
    AsyncClientConfig,
    ErrorResponse,
    Event,
    ForwardedRoomKeyEvent,
    MatrixRoom,
    MegolmEvent,
    RoomKeyEvent,
    RoomKeyRequest,
    SyncResponse,
)
from nio.exceptions import EncryptionError, LocalProtocolError

from appservice.homeserver import BotClient
from appservice.key_sharing import KeySharing
from bot.core.ports import EncryptionUnavailable, HomeserverUnavailable

log = logging.getLogger(__name__)

MAX_TIMEOUTS = 2
REQUEST_TIMEOUT_SECONDS = 45  # above the sync's 30 s long poll
# What nio raises once it gives up on a connection (see MAX_TIMEOUTS).
TRANSPORT_ERRORS = (ClientConnectionError, TimeoutError, asyncio.TimeoutError)


def _drop_stale_session(client: CryptoClient, room_id: str) -> None:
    """A session made ahead with its room (`BotCrypto.created`) and never shared, that
    has expired while the room waited: dropped, so sharing makes a fresh one. (nio would
    share the expired one, then refuse to encrypt with it, rotating it unshared.)"""
    assert client.olm is not None
    session = client.olm.outbound_group_sessions.get(room_id)
    if session is not None and not session.shared and session.expired:
        del client.olm.outbound_group_sessions[room_id]


@contextlib.asynccontextmanager
async def _outage_as_unavailable(what: str) -> AsyncIterator[None]:
    """A dead connection is the homeserver being away: callers retry it as an outage."""
    try:
        yield
    except TRANSPORT_ERRORS as exc:
        raise HomeserverUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc


# How long encrypting waits for a room's members (one just invited) to show.
ROOM_KNOWN_WITHIN = 15.0
# With a deadline to keep (encryption.fallback), one attempt waits at most this long for
# the sync or the device: the step is tried again, and goes plain at its deadline.
ATTEMPT_WAIT = 5.0
# What a store that cannot be read or written raises from inside nio: peewee (its store),
# sqlite3 under it, the filesystem, and vodozemac refusing a pickle (the wrong key).
STORE_ERRORS = (peewee.DatabaseError, sqlite3.Error, OSError, ValueError)
# Every device the bot makes is named so (`safeguard e2ee reset` deletes them all).
DEVICE_PREFIX = "SAFEGUARD"
# A sync failing this long (seconds) is told to staff, and new rooms are made plain.
SYNC_FAILING_SECONDS = 60.0
# Starting again after a fault, backing off to this (seconds).
RESTART_MAX_SECONDS = 60.0


class EncryptionBroken(Exception):
    """A fault of the crypto store itself (not the homeserver): what is wrong, and what an
    operator can do about it."""

    def __init__(self, why: str, what_to_do: str) -> None:
        super().__init__(why)
        self.why = why
        self.what_to_do = what_to_do


def _store_fault(exc: BaseException, store: Path) -> EncryptionBroken:
    """The operator's reading of an error the store raised."""
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if "full" in lowered or getattr(exc, "errno", None) == 28:
        return EncryptionBroken(
            f"the crypto store {store} cannot be written: the disk is full ({text})",
            "free space on that disk; encryption starts again by itself",
        )
    if "readonly" in lowered or "read-only" in lowered or getattr(exc, "errno", None) in (13, 30):
        return EncryptionBroken(
            f"the crypto store {store} cannot be written ({text})",
            "make the store folder and its files writable by the service; encryption starts "
            "again by itself",
        )
    return EncryptionBroken(
        f"the crypto store {store} cannot be used ({text})",
        "check the store folder (a folder the service can write, with its own pickle.key and "
        "device.json), or restore it from the backup taken with the database; as a last resort "
        "`safeguard e2ee reset` makes a new device",
    )


class CryptoClient(BotClient):
    """The bot's device's client: nio's, fed answers of the bot's one sync (it makes no
    request of its own for them), and other users' room-key requests kept for BotCrypto.

    nio stores the sync token as it handles an answer: here the token is stored apart
    (`BotCrypto.acknowledge`), only once the whole answer is recorded, and a failure
    while handling it puts the client's token back.

    nio answers key requests from its own user's devices only, and drops every other
    one without a word: it never shows them to a to-device callback, and its
    `collect_key_requests` returns only its own user's untrusted devices' requests.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Other users' requests, by (sender, request id), waiting to be answered.
        self.key_requests: dict[tuple[str, str], RoomKeyRequest] = {}
        # Told which users' devices nio has just read again (a device list changed).
        self.keys_queried: Callable[[set[str]], None] = lambda users: None

    async def keys_query(self) -> Any:
        users = set(self.users_for_key_query)
        response = await super().keys_query()
        if not isinstance(response, ErrorResponse):
            self.keys_queried(users)
        return response

    async def _collect_key_requests(self) -> None:
        assert self.olm is not None
        for event in self.olm.received_key_requests.values():
            # (A cancellation in the same sync has already taken its request out.)
            if isinstance(event, RoomKeyRequest) and event.sender != self.user_id:
                self.key_requests[(event.sender, event.request_id)] = event
        await super()._collect_key_requests()

    async def _handle_sync(self, response: SyncResponse) -> None:
        # nio 0.26's AsyncClient._handle_sync, in the same order, with the token saved last.
        if self.next_batch == response.next_batch:
            return
        previous = self.next_batch
        self.next_batch = response.next_batch
        try:
            await self._handle_to_device(response)
            await self._handle_invited_rooms(response)
            await self._handle_joined_rooms(response)
            await self._handle_presence_events(response)
            await self._handle_global_account_data_events(response)
            if self.olm:
                await self._handle_expired_verifications()
                self._handle_olm_events(response)
                await self._collect_key_requests()
        except BaseException:
            self.next_batch = previous
            raise


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
        on_broken: Callable[[str | None], None] = lambda why: None,
        retry_seconds: float = 5.0,
        verified_only: bool = False,
    ) -> None:
        # Nothing here touches the store: a broken volume must not stop the service from
        # starting (it runs every case without encryption until the store is repaired).
        self.bot_user_id = bot_user_id
        self._hs_url = hs_url
        self._as_token = as_token
        self.store = store
        self._display_name = display_name
        self._on_room_key = on_room_key
        # Told when the store breaks (why) and when encryption works again (None).
        self._on_broken = on_broken
        self._retry = retry_seconds
        self.client: CryptoClient | None = None
        # Who gets the device's room keys (encryption.verified_only: cross-signed only).
        self.key_sharing = KeySharing(bot_user_id, self._raw, verified_only=verified_only)
        self._lock = asyncio.Lock()  # one key upload / share / claim at a time
        self.ready = asyncio.Event()
        # Why it cannot work now (None while starting up: that is work in progress).
        self.problem: str | None = None
        # A fault of the store itself, and what an operator can do (None: none known).
        self.broken: EncryptionBroken | None = None
        self._faulted = asyncio.Event()  # set by a fault found while running
        # Why the sync has failed for long (told to staff), or None.
        self.sync_failing: str | None = None
        self._encrypted: dict[str, bool] = {}  # rooms whose encryption state we read ourselves
        # Set while the device takes the bot's sync's answers (started, its store working).
        self.attached = asyncio.Event()
        self._detached = asyncio.Event()  # set when it stops taking them (a fault, or not)
        # The token the device's first answer after a start is asked from (its store's).
        self._adopt_from: str | None = None
        self._failing_since: float | None = None  # when the sync began to fail
        self._began = time.monotonic()  # when the last start began
        # Rooms nio knows whole (read from the homeserver since the start), and one read
        # of a room at a time.
        self._loaded: set[str] = set()
        self._loading: dict[str, asyncio.Lock] = {}
        self._lookups: set[asyncio.Task[None]] = set()  # devices read ahead of a message
        # Rooms made with nobody invited, known whole, that no sync answer has shown yet.
        self._made_empty: set[str] = set()

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

    def _new_client(self) -> CryptoClient:
        """A client on the store as it is now (its folder made, its pickle key read)."""
        try:
            self.store.mkdir(parents=True, exist_ok=True, mode=0o700)
            pickle_key = self._pickle_key()
        except (OSError, UnicodeDecodeError) as exc:
            raise _store_fault(exc, self.store) from exc
        client = CryptoClient(
            self._hs_url,
            self.bot_user_id,
            store_path=str(self.store),
            config=AsyncClientConfig(
                encryption_enabled=True,
                store_sync_tokens=True,
                # nio retries a dead connection this many times, then raises: with no
                # limit a homeserver that is down is waited on for ever, in silence —
                # never on /health, and encrypting a message waits holding the lock.
                max_timeouts=MAX_TIMEOUTS,
                request_timeout=REQUEST_TIMEOUT_SECONDS,
                pickle_key=pickle_key,
            ),
        )
        client.add_to_device_callback(self._key_arrived, (RoomKeyEvent, ForwardedRoomKeyEvent))
        client.masquerade_user = self.bot_user_id
        return client

    async def _raw(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        assert self.client is not None
        response = await self.client.send(
            method,
            path,
            json.dumps(body) if body is not None else None,
            {"Authorization": f"Bearer {self._as_token}", "Content-Type": "application/json"},
        )
        payload = await response.json(content_type=None)
        return response.status, payload if isinstance(payload, dict) else {}

    def _recorded_device(self) -> str | None:
        if not self._device_file.exists():
            return None
        try:
            state = json.loads(self._device_file.read_text())
        except (OSError, ValueError) as exc:
            raise _store_fault(exc, self.store) from exc
        device_id = state.get("device_id") if isinstance(state, dict) else None
        return device_id if isinstance(device_id, str) and device_id else None

    async def _device(self) -> str:
        """The device this store belongs to: reused, or made (a lost store: replaced)."""
        assert self.client is not None
        recorded = self._recorded_device()
        self.client.masquerade_device = ""
        if recorded and self._store_file(recorded).exists():
            device_id = recorded
        else:
            if recorded:
                log.warning("the crypto store of device %s is gone: a new device", recorded)
            device_id = DEVICE_PREFIX + secrets.token_hex(5).upper()
            try:
                self._device_file.write_text(json.dumps({"device_id": device_id}))
            except OSError as exc:
                raise _store_fault(exc, self.store) from exc
        status, body = await self._raw(
            "PUT",
            f"/_matrix/client/v3/devices/{quote(device_id, safe='')}",
            {"display_name": self._display_name},
        )
        if status not in (200, 201):
            raise HomeserverUnavailable(f"the bot's device could not be made ({status} {body})")
        # Devices of lost stores (device.json lost with them, so not known by id): gone.
        orphans = await self.delete_devices(keep=device_id)
        if orphans:
            log.warning("deleted the bot's devices whose stores are gone: %s", ", ".join(orphans))
        return device_id

    async def delete_devices(self, *, keep: str | None) -> list[str]:
        """Delete the bot's own devices (SAFEGUARD…) on the homeserver but `keep`: a device
        whose store is gone can never read again, and members' clients would go on
        sharing keys with it. Returns the ids deleted."""
        status, body = await self._raw("GET", "/_matrix/client/v3/devices")
        if status != 200:
            raise HomeserverUnavailable(f"listing the bot's devices: HTTP {status}")
        deleted: list[str] = []
        for device in body.get("devices") or []:
            device_id = device.get("device_id") if isinstance(device, dict) else None
            if not isinstance(device_id, str) or not device_id.startswith(DEVICE_PREFIX):
                continue
            if device_id == keep:
                continue
            path = f"/_matrix/client/v3/devices/{quote(device_id, safe='')}"
            status, _ = await self._raw("DELETE", path, {})
            if status != 200:
                raise HomeserverUnavailable(f"deleting device {device_id}: HTTP {status}")
            deleted.append(device_id)
        return deleted

    def _restore(self, device_id: str) -> None:
        """Load the device's account from the store, and prove the store can be written."""
        assert self.client is not None
        client = self.client
        try:
            client.restore_login(self.bot_user_id, device_id, self._as_token)
        except STORE_ERRORS as exc:
            if isinstance(exc, ValueError) and not isinstance(exc, UnicodeDecodeError):
                raise EncryptionBroken(
                    f"the crypto store {self.store} cannot be read with its pickle.key "
                    f"({type(exc).__name__}: {exc}): was it restored with another store's key?",
                    "put back the pickle.key that belongs to this store (back them up "
                    "together), or run `safeguard e2ee reset` to make a new device (messages "
                    "encrypted to the old one stay unreadable to the bot)",
                ) from exc
            raise _store_fault(exc, self.store) from exc
        if client.olm is None or client.store is None:
            raise EncryptionBroken(
                f"the crypto store {self.store} did not load the device's keys",
                "restore the store from its backup, or run `safeguard e2ee reset`",
            )
        self._probe_writable(device_id)
        try:
            self.key_sharing.attach(client)
        except STORE_ERRORS as exc:
            raise _store_fault(exc, self.store) from exc

    def _probe_writable(self, device_id: str) -> None:
        """A write to the store's folder and a write lock on its database: what a full disk
        or a read-only mount refuses (reading alone would succeed on both)."""
        probe = self.store / ".write-probe"
        try:
            with open(probe, "wb") as handle:
                handle.write(b"\0" * 4096)
                handle.flush()
                os.fsync(handle.fileno())
            probe.unlink()
            database = sqlite3.connect(self._store_file(device_id), timeout=5)
            try:
                database.execute("BEGIN IMMEDIATE")
                database.execute("ROLLBACK")
            finally:
                database.close()
        except (OSError, sqlite3.Error) as exc:
            raise _store_fault(exc, self.store) from exc

    async def start(self) -> None:
        """Open the store, make or reuse the device and publish its keys: then the device
        is `attached` to the bot's sync, whose next answer (from this store's own token,
        so every to-device message that came while we were away) makes it ready.
        EncryptionBroken for a fault of the store; any other exception is the
        homeserver's (both are tried again by `run`)."""
        self._began = time.monotonic()
        self.attached.clear()
        await self._close_client()
        self._faulted.clear()
        self._detached.clear()
        self._loaded.clear()
        self._made_empty.clear()
        self.client = self._new_client()
        device_id = await self._device()
        self.client.masquerade_device = device_id
        self._restore(device_id)
        async with self._lock, self._store_guard("keys upload"):
            if self.client.should_upload_keys:
                self._check(await self.client.keys_upload(), "keys upload")
        # No full-state sync: nio keeps no rooms in its store, and a room it must send
        # to is read when needed (_load_room). The store's token is where the device's
        # to-device inbox was last acknowledged: the first answer starts there.
        self._adopt_from = self.client.loaded_sync_token or None
        self.attached.set()
        log.info("the bot's device %s joins the bot's sync (from %s)", device_id, self._adopt_from)

    async def run(self) -> None:
        """Keep encryption working for as long as the service runs: start, then wait for
        a fault (the answers come from the bot's sync, appservice/sync.py); after any
        failure (the homeserver away, the store broken) start again, with backoff, on a
        new client, so a repaired store is taken up without a restart."""
        delay = self._retry
        while True:
            try:
                await self.start()
                delay = self._retry
                await self._detached.wait()
                if self.broken is not None and self._faulted.is_set():
                    raise self.broken
            except asyncio.CancelledError:
                raise
            except EncryptionBroken as exc:
                self._fault(exc)
            except Exception as exc:
                self.problem = f"encryption is not ready: {type(exc).__name__}: {exc}"
            self.attached.clear()
            self.ready.clear()
            log.warning("%s; trying again in %.0fs", self.problem, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX_SECONDS)

    def _fault(self, broken: EncryptionBroken) -> None:
        """The store broke: nothing more is synced or encrypted on it; told once."""
        self.problem = f"{broken.why}; {broken.what_to_do}"
        self.attached.clear()
        self.ready.clear()
        self._faulted.set()
        self._detached.set()
        first = self.broken is None
        self.broken = broken
        if first:
            log.error("end-to-end encryption has stopped: %s", self.problem)
            self._on_broken(broken.why)

    @contextlib.asynccontextmanager
    async def _store_guard(self, what: str) -> AsyncIterator[None]:
        """Errors of the store inside nio, as the fault they are (never the homeserver's)."""
        try:
            yield
        except (HomeserverUnavailable, *TRANSPORT_ERRORS):
            raise
        except EncryptionBroken as exc:
            self._fault(exc)
            raise
        except STORE_ERRORS as exc:
            broken = _store_fault(exc, self.store)
            self._fault(broken)
            raise broken from exc

    async def _keys_housekeeping(self) -> None:
        """What nio's own loop does between syncs: to-device out, keys up, devices known."""
        client = self.client
        assert client is not None
        async with self._lock, self._store_guard("keys housekeeping"):
            if client.outgoing_to_device_messages:
                await client.send_to_device_messages()
            if client.should_upload_keys:  # one-time keys topped up
                uploaded = await client.keys_upload()
                if isinstance(uploaded, ErrorResponse) and "already exists" in str(uploaded):
                    raise EncryptionBroken(
                        "the crypto store no longer matches the bot's device on the homeserver "
                        f"({uploaded}): keys it made were lost (a full disk, an old backup)",
                        "run `safeguard e2ee reset` to make a new device",
                    )
                self._check(uploaded, "keys upload")
            if client.should_query_keys:
                self._check(await client.keys_query(), "keys query")
            if client.should_claim_keys:
                self._check(
                    await client.keys_claim(client.get_users_for_key_claiming()), "keys claim"
                )
            await self._answer_key_requests()

    # ---- the bot's sync, shared -------------------------------------------------------------

    def sync_device(self) -> tuple[str, str | None] | None:
        """What the bot's next sync carries for the device: its id, and the token to ask
        from instead of the caller's (the store's own, for the first answer after a
        start); None while no device may take an answer (starting, or its store broken:
        the device's to-device inbox then waits on the homeserver, untouched)."""
        client = self.client
        if not self.attached.is_set() or client is None or self._faulted.is_set():
            return None
        return client.device_id, self._adopt_from if not self.ready.is_set() else None

    async def take(
        self, answer: dict[str, Any], asked_from: str | None
    ) -> Callable[[], None] | None:
        """Handle a sync answer asked with the device: to-device (room keys, key
        requests), device lists, one-time key counts and the rooms' encryption and
        members; then what nio's own loop does between syncs. Returns what to call once
        the whole answer is recorded (it stores the token in the crypto store), or None
        if the device could not take the answer (its store broke): its to-device
        messages are then asked for again, from the store's token, once repaired.

        The token the answer was asked from is stored first: the homeserver has deleted
        the device's to-device messages up to it, so it is always safe to start from (a
        device stopped before its first answer is recorded must not start from the
        safety net's token next time, which may have moved on without it)."""
        client = self.client
        if client is None or not self.attached.is_set():
            return None
        if asked_from is not None and not self._save_token(client, asked_from):
            return None
        response = SyncResponse.from_dict(copy.deepcopy(answer))
        if isinstance(response, ErrorResponse):
            self._let_go(f"the sync's answer could not be read: {response}")
            return None
        if response.to_device_events:
            log.debug("the device takes %d to-device message(s)", len(response.to_device_events))
        try:
            async with self._store_guard("the sync"):
                await client._handle_sync(response)
        except EncryptionBroken:
            return None
        except Exception as exc:
            log.exception("the device could not take the sync's answer")
            self._let_go(f"the device could not take the sync's answer: {type(exc).__name__}")
            return None
        if client is not self.client or not self.attached.is_set():
            return None
        if asked_from is None and not self._save_token(client, response.next_batch):
            # A first answer (nothing acknowledged before it): its own token, now taken.
            return None
        for room_id, room in response.rooms.join.items():
            # A room the device made with nobody else in it (one made ahead) comes first with
            # its timeline limited (so Synapse shows a room just joined): no one can have come
            # or gone in that gap but whom the bot invited itself, and the device knows them.
            made_empty = room_id in self._made_empty
            self._made_empty.discard(room_id)
            if room.timeline.limited and not made_empty:
                # Members may have come and gone in the gap: read again when needed.
                self._loaded.discard(room_id)
        try:
            await self._keys_housekeeping()
        except EncryptionBroken:
            return None
        except Exception as exc:  # the answer is taken: what follows it is tried next time
            self.sync_failed(f"{type(exc).__name__}: {exc}")
        else:
            self._sync_ok()
        if not self.ready.is_set():
            self._now_ready()
        next_batch = response.next_batch

        def acknowledge() -> None:
            if client is self.client and not self._faulted.is_set():
                self._save_token(client, next_batch)

        return acknowledge

    def _save_token(self, client: CryptoClient, token: str) -> bool:
        """Where the device's to-device inbox is acknowledged, kept in its store."""
        if client.store is None:
            return False
        try:
            client.store.save_sync_token(token)
        except STORE_ERRORS as exc:
            self._fault(_store_fault(exc, self.store))
            return False
        return True

    def _let_go(self, why: str) -> None:
        """The device could not take an answer (not a fault of its store): the sync goes
        on without it, so the answer's to-device messages stay on the homeserver, and
        `run` starts it again (from its store's token)."""
        self.problem = f"encryption is not ready: {why}"
        self.attached.clear()
        self.ready.clear()
        self._detached.set()

    def _now_ready(self) -> None:
        self.problem = None
        self._adopt_from = None
        if self.broken is not None:
            log.warning("end-to-end encryption works again (it was: %s)", self.broken.why)
            self.broken = None
            self._on_broken(None)
        self.ready.set()
        client = self.client
        log.info(
            "end-to-end encryption ready: device %s (%.2fs)",
            client.device_id if client is not None else None,
            time.monotonic() - self._began,
        )

    def sync_failed(self, why: str) -> None:
        """The bot's sync (or what the device does after it) failed: one that keeps
        failing (past SYNC_FAILING_SECONDS) makes encryption unusable for new rooms (they
        are made without it) and is told to staff, once, as is its end."""
        if not self.attached.is_set():
            return  # no device in the sync: nothing of encryption's is late
        self.problem = f"the bot's sync for encryption fails: {why}"
        now = time.monotonic()
        self._failing_since = self._failing_since if self._failing_since is not None else now
        if self.sync_failing is None and now - self._failing_since > SYNC_FAILING_SECONDS:
            self.sync_failing = self.problem
            self._on_broken(f"{self.problem} (for over a minute)")

    def _sync_ok(self) -> None:
        self._failing_since = None
        if self.ready.is_set():
            self.problem = None
        if self.sync_failing is not None:
            self.sync_failing = None
            self._on_broken(None)

    async def _key_arrived(self, event: RoomKeyEvent | ForwardedRoomKeyEvent) -> None:
        self._on_room_key()

    async def _answer_key_requests(self) -> None:
        """Answer the room-key requests of members' devices the last sync brought (the
        device's lock held). A request that cannot be answered now (the homeserver
        away) is dropped: the asking device asks again."""
        client = self.client
        assert client is not None
        while client.key_requests:
            _, event = client.key_requests.popitem()
            try:
                if event.room_id not in self._loaded:
                    # Whether its owner is still in the room, as the room is now: no
                    # full-state sync has told nio of every room's members.
                    await self._load_room(client, event.room_id)
                await self.key_sharing.answer(client, event)
            except (KeyError, HomeserverUnavailable, EncryptionError, *TRANSPORT_ERRORS) as exc:
                log.warning("could not answer a room key request: %s", type(exc).__name__)
                log.debug("could not answer %s's key request: %s", event.sender, exc)

    @staticmethod
    def _check(response: Any, what: str) -> Any:
        if isinstance(response, ErrorResponse):
            raise HomeserverUnavailable(f"{what} failed: {response}")
        return response

    async def _close_client(self) -> None:
        """Let go of the client (and its store's database), saving what only it holds."""
        client, self.client = self.client, None
        if client is None:
            return
        olm = client.olm
        if olm is not None and self._faulted.is_set():
            # Sessions made while the store could not be written live only in memory:
            # without them the bot could not read its own messages after a restart (a
            # resumed step would not find what it sent). Best effort: the store may
            # still refuse.
            with contextlib.suppress(*STORE_ERRORS):
                olm.save_account()
                for session in olm.inbound_group_store:
                    client.store.save_inbound_group_session(session)
        with contextlib.suppress(Exception):
            await client.close()
        store = getattr(client, "store", None)
        if store is not None:
            with contextlib.suppress(Exception):
                store.database.close()

    async def close(self) -> None:
        self.ready.clear()
        for task in list(self._lookups):
            task.cancel()
        await asyncio.gather(*self._lookups, return_exceptions=True)
        await self._close_client()

    # ---- decrypting --------------------------------------------------------------------------

    def decrypt(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """The event with its plaintext type and content; None while its key has not come."""
        parsed = Event.parse_event(event)
        if not isinstance(parsed, MegolmEvent):
            return None
        parsed.room_id = event.get("room_id", "")
        if self.client is None or self.client.olm is None:
            return None  # not (yet, or any more) loaded: tried again when a key comes
        try:
            decrypted = self.client.decrypt_event(parsed)
        except (EncryptionError, LocalProtocolError, *STORE_ERRORS):
            return None
        source = getattr(decrypted, "source", None)
        if not isinstance(source, dict) or not isinstance(source.get("content"), dict):
            return None
        return {**event, "type": source.get("type", "m.room.message"), "content": source["content"]}

    async def request_key(self, event: dict[str, Any]) -> None:
        """Ask the sender's device (and our own others) for a key we never got."""
        parsed = Event.parse_event(event)
        client = self.client
        if not isinstance(parsed, MegolmEvent) or client is None or client.olm is None:
            return
        if parsed.session_id in client.outgoing_key_requests:
            return
        async with self._lock, self._store_guard("a key request"):
            for user_id, device_id in ((parsed.sender, parsed.device_id), (self.bot_user_id, "*")):
                message = parsed.as_key_request(user_id, client.device_id, device_id=device_id)
                client.olm.outgoing_to_device_messages.append(message)
            await client.send_to_device_messages()

    # ---- encrypting --------------------------------------------------------------------------

    async def room_encrypted(self, room_id: str, read: Callable[[], Any]) -> bool:
        """Whether the room is encrypted: as the sync knows it, else as `read()` finds it."""
        room = self.client.rooms.get(room_id) if self.client is not None else None
        if room is not None and room.encrypted:
            return True
        if room_id in self._encrypted:
            return self._encrypted[room_id]
        encrypted = bool(await read())
        self._encrypted[room_id] = encrypted
        return encrypted

    def known_encrypted(self, room_id: str) -> bool | None:
        """Whether the room is encrypted, as far as the bot knows without a read (None:
        not known yet)."""
        room = self.client.rooms.get(room_id) if self.client is not None else None
        if room is not None and (room.encrypted or room_id in self._loaded):
            return bool(room.encrypted)
        return self._encrypted.get(room_id)

    def created(
        self, room_id: str, *, encrypted: bool, invited: Sequence[str] = (), new: bool = False
    ) -> None:
        """A room the bot just created, encrypted from its first event or not at all (no
        one else in it may change that; if anyone does, the sync shows it first).

        `new`: made by this very call, so its members are known without a read: the bot
        and whoever it invited. An encrypted one is then known to the device whole, and
        its first message (a flagged member's notice, into a room made ahead) waits for
        no read of the room's state and members."""
        self._encrypted[room_id] = encrypted
        client = self.client
        if not (new and encrypted) or client is None:
            return
        room = client.rooms.get(room_id)
        if room is None:
            room = client.rooms[room_id] = MatrixRoom(room_id, client.user_id, True)
        room.encrypted = True
        client.encrypted_rooms.add(room_id)
        if client.user_id not in room.users:
            room.add_member(client.user_id, None, None)
        for user_id in invited:
            if user_id not in room.users:
                room.add_member(user_id, None, None, invited=True)
        room.members_synced = True
        if client.olm is not None:
            client.olm.update_tracked_users(room)
            self._session_ahead(client, room_id)
        self._loaded.add(room_id)
        if not invited:
            self._made_empty.add(room_id)

    def knows_whole(self, room_id: str) -> bool:
        """Whether the device knows the room's encryption and members without a read."""
        return room_id in self._loaded

    def _session_ahead(self, client: CryptoClient, room_id: str) -> None:
        """The new room's Megolm session made now, not when its first message is sent:
        making one writes to the store, and a room made ahead's first message is a flagged
        member's notice. (Kept in memory, as nio keeps it: after a restart the first
        message makes one, as it always did.)"""
        assert client.olm is not None
        try:
            client.olm.create_outbound_group_session(room_id)
        except STORE_ERRORS as exc:
            client.olm.outbound_group_sessions.pop(room_id, None)
            self._fault(_store_fault(exc, self.store))

    def look_up_devices(self, user_id: str) -> bool:
        """Someone about to get an encrypted message (a flagged member, while their case
        is being opened): their devices read now, in the background, so the message's
        key goes to them without waiting for that read. Best effort: encrypting reads
        them itself if this has not finished or failed. Nothing is read for someone the
        device already follows (the sync says when their devices change). False: the
        device cannot read them now (not ready), so ask again later."""
        client = self.client
        if client is None or client.olm is None or not self.ready.is_set():
            return False
        olm = client.olm
        if user_id in olm.tracked_users and user_id not in olm.users_for_key_query:
            return True
        olm.users_for_key_query.add(user_id)
        task = asyncio.create_task(self._query_devices(client), name="crypto:look-up-devices")
        self._lookups.add(task)
        task.add_done_callback(self._lookups.discard)
        return True

    async def _query_devices(self, client: CryptoClient) -> None:
        try:
            async with (
                self._turn(None),
                _outage_as_unavailable("reading devices"),
                self._store_guard("keys query"),
            ):
                if client is self.client and client.should_query_keys:
                    self._check(await client.keys_query(), "keys query")
        except Exception as exc:  # the message reads them itself: nothing is lost here
            log.info("could not read devices ahead of a message: %s", exc)

    def invited(self, room_id: str, user_id: str) -> None:
        """The bot's own invite, answered: the room's members (as the device sees them)
        hold them now, as the next sync would show a moment later, so a message to them
        need not wait for that sync. Their devices are queried, and get the room key,
        when the message is encrypted. A room the sync has not shown yet is left to it."""
        client = self.client
        room = client.rooms.get(room_id) if client is not None else None
        if room is None or user_id in room.users:
            return
        room.add_member(user_id, None, None, invited=True)
        if room.encrypted and client is not None and client.olm is not None:
            client.olm.update_tracked_users(room)

    def not_invited(self, room_id: str, user_id: str) -> None:
        """An invite counted in ahead of its answer (`invited`) was refused: not a member."""
        client = self.client
        room = client.rooms.get(room_id) if client is not None else None
        if room is not None and user_id in room.invited_users:
            room.remove_member(user_id)

    @property
    def unusable_because(self) -> str | None:
        """Why the device cannot encrypt at all now: its store is broken, or it could not
        start (None: it can, or it is starting, which is work in progress)."""
        if self.broken is not None or not self.ready.is_set():
            return self.problem
        return self.sync_failing

    async def usable(self, *, by: dt.datetime | None = None) -> None:
        """Return once the device can encrypt; EncryptionUnavailable if it cannot now.

        A broken store answers at once. A device starting (or starting again) is waited
        for a little, never past `by`: a caller with a deadline goes plain then."""
        if self.broken is not None:
            raise EncryptionUnavailable(self.problem or self.broken.why)
        if self.ready.is_set():
            return
        try:
            await asyncio.wait_for(self.ready.wait(), _attempt_wait(by, ATTEMPT_WAIT))
        except TimeoutError:
            raise EncryptionUnavailable(
                self.problem or "end-to-end encryption is not ready yet", retry_after=1.0
            ) from None
        if self.broken is not None:
            raise EncryptionUnavailable(self.problem or self.broken.why)

    async def encrypt(
        self,
        room_id: str,
        event_type: str,
        content: dict[str, Any],
        *,
        members: list[str],
        by: dt.datetime | None = None,
    ) -> dict[str, Any]:
        """The m.room.encrypted content for a message: keys shared with every device of
        every joined and invited member first (trust on first use). EncryptionUnavailable
        when the store fails, or the room has not reached the sync in time (`by`)."""
        await self.usable(by=by)
        room = await self._known_room(room_id, members, by)
        client = self.client
        if client is None or client.olm is None:
            raise EncryptionUnavailable("end-to-end encryption is starting again")
        try:
            async with (
                self._turn(by),
                _outage_as_unavailable("encrypting"),
                self._store_guard("encrypting"),
            ):
                if client.should_query_keys:
                    self._check(await client.keys_query(), "keys query")
                _drop_stale_session(client, room_id)
                await self.key_sharing.before_share(client, room)
                if client.olm.should_share_group_session(room_id):
                    await client.share_group_session(room_id, ignore_unverified_devices=True)
                    self.key_sharing.shared(client, room_id)
                _, encrypted = client.encrypt(room.room_id, event_type, content)
        except EncryptionBroken as exc:
            raise EncryptionUnavailable(self.problem or exc.why) from exc
        except (EncryptionError, LocalProtocolError) as exc:
            raise EncryptionUnavailable(f"encrypting failed: {type(exc).__name__}: {exc}") from exc
        return encrypted

    @contextlib.asynccontextmanager
    async def _turn(self, by: dt.datetime | None) -> AsyncIterator[None]:
        """The device's lock (one key upload, share or claim at a time), waited for no
        longer than one attempt may wait: the sync's housekeeping may hold it for the
        length of a slow request."""
        try:
            async with asyncio.timeout(_attempt_wait(by, ROOM_KNOWN_WITHIN)):
                await self._lock.acquire()
        except TimeoutError:
            raise EncryptionUnavailable(
                "the bot's device is busy (its keys being fetched)", retry_after=1.0
            ) from None
        try:
            yield
        finally:
            self._lock.release()

    async def _known_room(self, room_id: str, members: list[str], by: dt.datetime | None) -> Any:
        """The room as nio must know it to encrypt: its encryption and everyone joined or
        invited, these members among them. A room nio does not know whole (no full-state
        sync tells it of every room) is read from the homeserver, as nio's own room_send
        reads the members of a room it knows only lazily; a member the bot just invited is
        there with its answer (`invited`), one invited by others may take a moment."""
        deadline = time.monotonic() + _attempt_wait(by, ROOM_KNOWN_WITHIN)
        while True:
            client = self.client
            if client is None:
                raise EncryptionUnavailable("end-to-end encryption is starting again")
            room = self._known_whole(client, room_id, members)
            if room is not None:
                return room
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._load_room(client, room_id)
            room = self._known_whole(client, room_id, members)
            if room is not None:
                return room
            if time.monotonic() >= deadline:
                raise EncryptionUnavailable(
                    f"the encrypted room {room_id} could not be read by the bot's device yet",
                    retry_after=1.0,
                )
            await asyncio.sleep(0.25)

    def _known_whole(self, client: CryptoClient, room_id: str, members: list[str]) -> Any:
        """The room if nio knows it whole (read from the homeserver, not only partly through
        the sync: nio will not encrypt to a room whose members it has not read), encrypted,
        with these members in it; else None."""
        room = client.rooms.get(room_id)
        if room is None or room_id not in self._loaded or not room.encrypted:
            return None
        return room if all(m in room.users for m in members) else None

    async def _load_room(self, client: CryptoClient, room_id: str) -> None:
        """nio's room read from the homeserver: its encryption, and its members (joined
        or invited; those who left or were banned taken out). Members the sync added
        meanwhile are kept: one read at a time, and only a leave removes."""
        lock = self._loading.setdefault(room_id, asyncio.Lock())
        async with lock, _outage_as_unavailable("reading the room"):
            path = f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}"
            (status, state), (members_status, body) = await asyncio.gather(
                self._raw("GET", f"{path}/state/m.room.encryption"),
                self._raw("GET", f"{path}/members"),
            )
            if status not in (200, 404):
                _unreadable(room_id, "encryption", status)
            if members_status != 200:
                _unreadable(room_id, "members", members_status)
        if client is not self.client:
            return
        room = client.rooms.get(room_id)
        if room is None:
            room = client.rooms[room_id] = MatrixRoom(
                room_id, client.user_id, room_id in client.encrypted_rooms
            )
        if status == 200 and state.get("algorithm") and not room.encrypted:
            room.encrypted = True
            client.encrypted_rooms.add(room_id)
            with contextlib.suppress(*STORE_ERRORS):  # remembered only to save this read
                if client.store is not None:
                    client.store.save_encrypted_rooms({room_id})
        for event in body.get("chunk") or []:
            if not isinstance(event, dict) or not isinstance(event.get("state_key"), str):
                continue
            user_id = event["state_key"]
            content = event.get("content") if isinstance(event.get("content"), dict) else {}
            membership = content.get("membership")
            if membership in ("leave", "ban"):
                if room.remove_member(user_id):
                    client.invalidate_outbound_session(room_id)
            elif membership in ("join", "invite"):
                user = room.users.get(user_id)
                if user is None:
                    room.add_member(
                        user_id,
                        content.get("displayname"),
                        content.get("avatar_url"),
                        invited=membership == "invite",
                    )
                elif membership == "join" and user.invited:
                    user.invited = False
                    room.invited_users.pop(user_id, None)
        room.members_synced = True
        if room.encrypted and client.olm is not None:
            # Their devices read afresh: a change while no room of theirs was known to
            # nio was never shown to it.
            client.olm.add_changed_users(set(room.users) - {client.user_id})
            client.olm.update_tracked_users(room)
        self._loaded.add(room_id)

    # ---- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        client = self.client
        olm = client.olm if client is not None else None
        status: dict[str, Any] = {
            "ok": self.problem is None and self.broken is None,
            "ready": self.ready.is_set(),
            "device_id": client.device_id if client is not None else None,
            "one_time_keys": olm.uploaded_key_count if olm else None,
            "encrypted_rooms": len(client.encrypted_rooms) if client is not None else 0,
            "key_requests": {
                "answered": self.key_sharing.answered,
                "refused": self.key_sharing.refused,
            },
        }
        if self.problem:
            status["problem"] = self.problem
        if self.broken is not None:
            status["what_to_do"] = self.broken.what_to_do
        return status


def _unreadable(room_id: str, what: str, status: int) -> None:
    """A room's read refused: the homeserver away (5xx) is an outage, any other refusal
    (the bot not in the room) means the room cannot be encrypted to now."""
    why = f"reading {room_id}'s {what}: HTTP {status}"
    if status >= 500 or status == 429:
        raise HomeserverUnavailable(why)
    raise EncryptionUnavailable(why)


def _attempt_wait(by: dt.datetime | None, default: float) -> float:
    """How long one attempt may wait for encryption: `default`, or less with a deadline."""
    if by is None:
        return default
    left = (by - dt.datetime.now(dt.UTC)).total_seconds()
    return max(0.0, min(left, ATTEMPT_WAIT))


async def offline_status(
    hs_url: str, as_token: str, bot_user_id: str, store: Path
) -> dict[str, Any]:
    """What `safeguard e2ee status` shows: read from the store (and, if the homeserver
    answers, the one-time keys it holds for the device); with `problem` and `what_to_do`
    when the store cannot be used."""
    crypto = BotCrypto(hs_url, as_token, bot_user_id, store)
    status: dict[str, Any] = {"device_id": None, "store": str(store)}
    try:
        device_id = crypto._recorded_device()
        if device_id is None:
            return status | {"note": "no device yet (first run)"}
        status["device_id"] = device_id
        if not crypto._store_file(device_id).exists():
            return status | {
                "problem": f"the crypto store of device {device_id} is missing",
                "what_to_do": "restore it from the backup taken with the database; otherwise "
                "the service makes a new device at its next start (and deletes this one)",
            }
        crypto.client = crypto._new_client()
        crypto.client.masquerade_device = device_id
        crypto._restore(device_id)  # reads the store, and proves it can be written
        olm = crypto.client.olm
        assert olm is not None
        status |= {
            "store": str(crypto._store_file(device_id)),
            "identity_key": olm.account.identity_keys["ed25519"],
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
    except EncryptionBroken as exc:
        return status | {"problem": exc.why, "what_to_do": exc.what_to_do}
    finally:
        await crypto.close()


async def reset_device(hs_url: str, as_token: str, bot_user_id: str, store: Path) -> dict[str, Any]:
    """`safeguard e2ee reset`: a new device, made deliberately (the service must be stopped).

    Every device of the bot's own on the homeserver (SAFEGUARD…) is deleted, so members'
    clients stop sharing keys with a device nobody holds, and the store is moved aside
    (kept, not deleted: `<store>.replaced-<time>`). The next start makes a new device.
    Messages encrypted to the old device stay unreadable to the bot."""
    crypto = BotCrypto(hs_url, as_token, bot_user_id, store)
    crypto.client = CryptoClient(hs_url, bot_user_id)  # no store: the homeserver only
    crypto.client.masquerade_user = bot_user_id
    try:
        deleted = await crypto.delete_devices(keep=None)
    finally:
        await crypto.close()
    moved_to = None
    if store.exists() or store.is_symlink():
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        moved_to = store.with_name(f"{store.name}.replaced-{stamp}")
        store.rename(moved_to)
    return {"deleted_devices": deleted, "store_moved_to": str(moved_to) if moved_to else None}


def _create_private(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
