"""A real end-to-end client for tests: matrix-nio with its own store, a device, a sync loop.

It trusts every device on first use (as the bot does), sends encrypted in encrypted
rooms, decrypts what it receives, and joins the rooms it is invited to when told.
Deliberately not the project's own code: it stands for Element on a member's phone.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote

import vodozemac
from nio import (
    Api,
    AsyncClient,
    AsyncClientConfig,
    Event,
    MatrixRoom,
    MegolmEvent,
    RoomCreateResponse,
    RoomMessageNotice,
    RoomMessageText,
    RoomSendResponse,
    ToDeviceResponse,
)
from nio.crypto import OutgoingKeyRequest
from nio.store.models import MegolmInboundSessions

from appservice.synapse_local import register_user
from tests.support.scene import until

ENCRYPTION = {
    "type": "m.room.encryption",
    "state_key": "",
    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
}


class E2EUser:
    def __init__(self, hs_url: str, user_id: str, password: str, store: Path) -> None:
        store.mkdir(parents=True, exist_ok=True)
        self.user_id = user_id
        self._password = password
        self.client = AsyncClient(
            hs_url,
            user_id,
            store_path=str(store),
            config=AsyncClientConfig(store_sync_tokens=True, encryption_enabled=True),
        )
        # (room, sender, body, event_id), decrypted (or never encrypted).
        self.received: list[tuple[str, str, str, str]] = []
        self.undecryptable: list[str] = []
        self._task: asyncio.Task[None] | None = None
        # The account's cross-signing keys, once set up (set_up_cross_signing).
        self._master: vodozemac.Account | None = None
        self._self_signing: vodozemac.Account | None = None
        self.client.add_event_callback(self._text, (RoomMessageText, RoomMessageNotice))
        self.client.add_event_callback(self._megolm, MegolmEvent)

    async def _text(self, room: MatrixRoom, event: RoomMessageText | RoomMessageNotice) -> None:
        self.received.append((room.room_id, event.sender, event.body, event.event_id))

    async def _megolm(self, room: MatrixRoom, event: MegolmEvent) -> None:
        self.undecryptable.append(event.event_id)

    async def start(self) -> None:
        await self.client.login(self._password, device_name="e2e-test")
        self._take_keys_back_from_their_sender()
        await self.client.sync(timeout=0, full_state=True)
        if self.client.should_upload_keys:
            await self.client.keys_upload()
        self._task = asyncio.create_task(self.client.sync_forever(timeout=500))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.client.close()

    async def another_device(self, store: Path) -> E2EUser:
        """The same account logged in on a new device (a new phone, or whoever has the
        password), with a store of its own."""
        device = E2EUser(self.client.homeserver, self.user_id, self._password, store)
        await device.start()
        return device

    # ---- keys ---------------------------------------------------------------------------

    def _take_keys_back_from_their_sender(self) -> None:
        """Accept a forwarded room key from the device that made the session itself.

        nio (like Element's matrix-rust-sdk) takes forwarded keys only from its own user's
        verified devices. A session's own sender handing it back proves nothing new (it
        could as well send it again as m.room_key), so this client takes that too: it is
        how a member's device gets back a key it lost from the bot."""
        olm = self.client.olm
        assert olm is not None
        nio_rule = olm._should_accept_forward

        def accept(sender: str, sender_key: str, event: Any) -> bool:
            content = event.source.get("content", {})
            requested = event.session_id in olm.outgoing_key_requests
            from_its_sender = content.get("sender_key") == sender_key and not content.get(
                "forwarding_curve25519_key_chain"
            )
            return (requested and from_its_sender) or nio_rule(sender, sender_key, event)

        olm._should_accept_forward = accept  # type: ignore[method-assign]

    def has_session(self, room_id: str, session_id: str, sender_key: str) -> bool:
        olm = self.client.olm
        return (
            olm is not None
            and olm.inbound_group_store.get(room_id, sender_key, session_id) is not None
        )

    def forget_session(self, room_id: str, session_id: str, sender_key: str) -> None:
        """Lose a room key, as a device does (a cleared cache, a reinstall with a restored
        store), from memory and from the store."""
        olm = self.client.olm
        assert olm is not None
        olm.inbound_group_store[room_id][sender_key].pop(session_id, None)
        store = self.client.store
        with store.database.bind_ctx([MegolmInboundSessions]):
            MegolmInboundSessions.delete().where(
                MegolmInboundSessions.session_id == session_id
            ).execute()

    async def encrypted_event(self, room_id: str, event_id: str) -> MegolmEvent:
        """The event as the homeserver has it (nio's room_get_event decrypts it)."""
        path = f"/_matrix/client/v3/rooms/{quote(room_id)}/event/{quote(event_id)}"
        response = await self.client.send(
            "GET", path, headers={"Authorization": f"Bearer {self.client.access_token}"}
        )
        event = Event.parse_event(await response.json())
        assert isinstance(event, MegolmEvent), event
        event.room_id = room_id
        return event

    def decrypted(self, event: MegolmEvent) -> str | None:
        """The event's text, if this device has its key."""
        if not self.has_session(event.room_id, event.session_id, event.sender_key):
            return None
        return getattr(self.client.decrypt_event(event), "body", None)

    async def ask_for_key(self, event: MegolmEvent, user_id: str, device_id: str) -> None:
        """Ask a device of another user for the key of an event (m.room_key_request), as
        Element's older crypto did of the event's sender; nio itself asks only its own
        user's devices."""
        message = event.as_key_request(user_id, self.client.device_id, device_id=device_id)
        olm = self.client.olm
        assert olm is not None
        olm.outgoing_key_requests[event.session_id] = OutgoingKeyRequest.from_message(message)
        response = await self.client.to_device(message)
        assert isinstance(response, ToDeviceResponse), response

    # ---- cross-signing (what "verify this device" in Element leaves behind) ------------

    async def _api(self, method: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        response = await self.client.send(
            method,
            path,
            Api.to_json(body),
            headers={"Authorization": f"Bearer {self.client.access_token}"},
        )
        return response.status, await response.json()

    async def set_up_cross_signing(self) -> None:
        """Give the account a master key and a self-signing key signed by it, and sign
        this device with it. (vodozemac accounts serve as the key pairs: nio 0.26 has no
        cross-signing of its own.)"""
        self._master, self._self_signing = vodozemac.Account(), vodozemac.Account()
        master = self._master.ed25519_key.to_base64()
        self_signing = self._self_signing.ed25519_key.to_base64()
        master_key = {"user_id": self.user_id, "usage": ["master"], "keys": {}}
        master_key["keys"][f"ed25519:{master}"] = master
        self_signing_key = {"user_id": self.user_id, "usage": ["self_signing"], "keys": {}}
        self_signing_key["keys"][f"ed25519:{self_signing}"] = self_signing
        self_signing_key["signatures"] = {
            self.user_id: {f"ed25519:{master}": _sign(self._master, self_signing_key)}
        }
        body: dict[str, Any] = {"master_key": master_key, "self_signing_key": self_signing_key}
        path = "/_matrix/client/v3/keys/device_signing/upload"
        status, answer = await self._api("POST", path, body)
        if status == 401:  # user-interactive auth: the account's password
            body["auth"] = {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": self.user_id},
                "password": self._password,
                "session": answer.get("session"),
            }
            status, answer = await self._api("POST", path, body)
        assert status == 200, (status, answer)
        await self.cross_sign(self.client.device_id)

    async def cross_sign(self, device_id: str) -> None:
        """Sign one of the account's devices with its self-signing key."""
        assert self._self_signing is not None, "set_up_cross_signing first"
        query = {"device_keys": {self.user_id: [device_id]}}
        status, answer = await self._api("POST", "/_matrix/client/v3/keys/query", query)
        assert status == 200, answer
        keys = answer["device_keys"][self.user_id][device_id]
        keys = {k: v for k, v in keys.items() if k not in ("signatures", "unsigned")}
        self_signing = self._self_signing.ed25519_key.to_base64()
        keys["signatures"] = {
            self.user_id: {f"ed25519:{self_signing}": _sign(self._self_signing, keys)}
        }
        upload = {self.user_id: {device_id: keys}}
        status, answer = await self._api(
            "POST", "/_matrix/client/v3/keys/signatures/upload", upload
        )
        assert status == 200 and not answer.get("failures"), answer

    # ---- rooms --------------------------------------------------------------------------

    async def create_encrypted_room(
        self,
        *,
        name: str,
        invite: list[str],
        power_levels: dict[str, Any] | None = None,
    ) -> str:
        response = await self.client.room_create(
            name=name,
            invite=invite,
            initial_state=[ENCRYPTION],
            power_level_override=power_levels,
        )
        assert isinstance(response, RoomCreateResponse), response
        await until(lambda: response.room_id in self.client.rooms, what="the room in sync")
        return response.room_id

    async def join(self, room_id: str) -> None:
        await self.client.join(room_id)
        await until(lambda: room_id in self.client.rooms, what=f"{room_id} joined")

    async def invited(self) -> list[str]:
        return list(self.client.invited_rooms)

    async def send_text(self, room_id: str, body: str, *, reply_to: str | None = None) -> str:
        content: dict[str, Any] = {"msgtype": "m.text", "body": body}
        if reply_to:
            content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
        await until(lambda: room_id in self.client.rooms, what="the room in sync")
        if self.client.should_query_keys:
            await self.client.keys_query()
        return await self._room_send(room_id, "m.room.message", content)

    async def react(self, room_id: str, event_id: str, key: str) -> str:
        relation = {"rel_type": "m.annotation", "event_id": event_id, "key": key}
        return await self._room_send(room_id, "m.reaction", {"m.relates_to": relation})

    async def _room_send(self, room_id: str, event_type: str, content: dict[str, Any]) -> str:
        # nio drops a room's outbound Megolm session when its sync loop sees a member leave;
        # if that lands while room_send is sharing the session, room_send raises KeyError.
        # A client sends again (Element does): so does this one, with a fresh session.
        for attempt in range(3):
            try:
                response = await self.client.room_send(
                    room_id, event_type, content, ignore_unverified_devices=True
                )
            except KeyError:
                if attempt == 2:
                    raise
                await asyncio.sleep(0.2)
                continue
            assert isinstance(response, RoomSendResponse), response
            return response.event_id
        raise AssertionError("unreachable")

    def texts_in(self, room_id: str, sender: str | None = None) -> list[str]:
        return [
            body
            for room, who, body, _ in self.received
            if room == room_id and (sender is None or who == sender)
        ]

    def encrypted(self, room_id: str) -> bool:
        room = self.client.rooms.get(room_id)
        return bool(room and room.encrypted)


def _sign(key: vodozemac.Account, signed: dict[str, Any]) -> str:
    body = {k: v for k, v in signed.items() if k not in ("signatures", "unsigned")}
    return key.sign(Api.to_canonical_json(body).encode()).to_base64()


async def new_e2e_user(synapse: Any, prefix: str, store_root: Path) -> E2EUser:
    import uuid

    localpart = f"{prefix}-{uuid.uuid4().hex[:8]}"
    password = secrets.token_urlsafe(12)
    user_id, _ = await register_user(synapse.url, synapse.shared_secret, localpart, password)
    user = E2EUser(synapse.url, user_id, password, store_root / localpart)
    await user.start()
    return user
