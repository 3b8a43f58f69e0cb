"""The bare appservice: the physical limit of a referral made by an appservice.

A few lines of aiohttp, no project code, registered with the same Synapse as the service
(its own id, tokens and bot user). On a pushed reaction with its own key from the
moderator, it takes the flagged event's sender (remembered from the push that carried the
message, as the service does; read from Synapse when it was not pushed), then invites the
member into a DM room made ahead and sends the notice concurrently, then kicks. No
durable bookkeeping at all, so no exactly-once: what it costs is the floor of ours.

Encrypted DM rooms: the notice is Megolm-encrypted (vodozemac, one outbound session per
room, made with the room) after a /keys/query of the member made concurrently with the
invite; the members in the bench have no devices, so no key is shared (ours shares with
every device it finds, and there are none either).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

REMEMBERED = 1000  # message senders kept from the pushes, newest last


def q(value: str) -> str:
    return quote(value, safe="")


@dataclass
class Room:
    room_id: str
    session: Any = None  # vodozemac.GroupSession when encrypted


@dataclass
class Referred:
    """What the bare appservice did for one flag: its notice's event id (in `room`), and
    whether it had to read the flagged event to learn who sent it."""

    room: str
    notice: str
    read_sender: bool


@dataclass
class BareAppservice:
    homeserver: str
    server_name: str
    port: int
    moderator: str
    key: str
    notice: dict[str, Any]
    localpart: str = "bare"
    as_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    hs_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    ready: list[Room] = field(default_factory=list)
    done: dict[str, asyncio.Future[Referred]] = field(default_factory=dict)
    senders: OrderedDict[str, str] = field(default_factory=OrderedDict)
    reads: int = 0  # flags whose sender it had to read (the bench counts them)
    _http: aiohttp.ClientSession | None = None
    _runner: web.AppRunner | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def user_id(self) -> str:
        return f"@{self.localpart}:{self.server_name}"

    def registration(self) -> dict[str, Any]:
        return {
            "id": f"bare-{uuid.uuid4().hex[:8]}",
            "url": f"http://127.0.0.1:{self.port}",
            "as_token": self.as_token,
            "hs_token": self.hs_token,
            "sender_localpart": self.localpart,
            "namespaces": {
                "users": [{"exclusive": True, "regex": f"^@{self.localpart}:.*$"}],
                "aliases": [],
                "rooms": [],
            },
            "rate_limited": False,
        }

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.as_token}"})
        app = web.Application()
        app.router.add_put("/_matrix/app/v1/transactions/{txn}", self._transaction)
        app.router.add_post("/_matrix/app/v1/ping", self._ping)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        assert self._http is not None
        async with self._http.request(method, f"{self.homeserver}{path}", json=body) as response:
            answer = await response.json(content_type=None)
            assert response.status == 200, (path, response.status, answer)
            return answer

    # ---- ahead of any flag (untimed) ---------------------------------------------------------

    async def join(self, room: str) -> None:
        await self.request("POST", f"/_matrix/client/v3/join/{q(room)}", {})

    async def make_room(self, *, encrypted: bool) -> None:
        """A DM room made ahead, no one invited (encrypted: with its Megolm session)."""
        initial_state = []
        session = None
        if encrypted:
            import vodozemac

            initial_state.append(
                {
                    "type": "m.room.encryption",
                    "state_key": "",
                    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
                }
            )
            session = vodozemac.GroupSession()
        created = await self.request(
            "POST",
            "/_matrix/client/v3/createRoom",
            {"visibility": "private", "preset": "private_chat", "initial_state": initial_state},
        )
        self.ready.append(Room(created["room_id"], session))

    def expect(self, member: str) -> asyncio.Future[Referred]:
        future: asyncio.Future[Referred] = asyncio.get_running_loop().create_future()
        self.done[member] = future
        return future

    # ---- the push ----------------------------------------------------------------------------

    async def _ping(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _transaction(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.hs_token}":
            return web.json_response({"errcode": "M_FORBIDDEN"}, status=403)
        for event in (await request.json()).get("events", []):
            kind = event.get("type")
            if kind == "m.room.message":
                self.senders[event["event_id"]] = event["sender"]
                if len(self.senders) > REMEMBERED:
                    self.senders.popitem(last=False)
            elif kind == "m.reaction" and event.get("sender") == self.moderator:
                relation = (event.get("content") or {}).get("m.relates_to") or {}
                if relation.get("key") == self.key and relation.get("event_id"):
                    task = asyncio.create_task(self._refer(event["room_id"], relation["event_id"]))
                    self._tasks.add(task)
                    task.add_done_callback(self._finished)
        return web.json_response({})

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            for future in self.done.values():  # the bench's wait fails, saying why
                if not future.done():
                    future.set_exception(task.exception())

    async def _refer(self, group: str, flagged: str) -> None:
        rooms = "/_matrix/client/v3/rooms"
        member = self.senders.get(flagged)
        read = member is None
        if member is None:
            member = (await self.request("GET", f"{rooms}/{q(group)}/event/{q(flagged)}"))["sender"]
        room = self.ready.pop(0)
        _, notice = await asyncio.gather(
            self.request(
                "PUT",
                f"{rooms}/{q(room.room_id)}/state/m.room.member/{q(member)}",
                {"membership": "invite", "is_direct": True},
            ),
            self._send_notice(room, member),
        )
        await self.request(
            "POST", f"{rooms}/{q(group)}/kick", {"user_id": member, "reason": "Removed"}
        )
        future = self.done.pop(member, None)
        if future is not None and not future.done():
            future.set_result(Referred(room.room_id, notice, read))

    async def _send_notice(self, room: Room, member: str) -> str:
        path = f"/_matrix/client/v3/rooms/{q(room.room_id)}/send"
        txn = uuid.uuid4().hex
        if room.session is None:
            sent = await self.request("PUT", f"{path}/m.room.message/{txn}", self.notice)
            return sent["event_id"]
        # Who to share the room key with: the member's devices (none in the bench).
        await self.request("POST", "/_matrix/client/v3/keys/query", {"device_keys": {member: []}})
        plaintext = {"type": "m.room.message", "content": self.notice, "room_id": room.room_id}
        ciphertext = room.session.encrypt(json.dumps(plaintext).encode())
        content = {
            "algorithm": "m.megolm.v1.aes-sha2",
            "ciphertext": ciphertext.to_base64(),
            "session_id": room.session.session_id,
            "sender_key": "bare",
            "device_id": "BARE",
        }
        sent = await self.request("PUT", f"{path}/m.room.encrypted/{txn}", content)
        return sent["event_id"]
