"""A test user's Client-Server calls, in raw aiohttp: deliberately not the project's own code."""

from __future__ import annotations

import itertools
import uuid
from typing import Any
from urllib.parse import quote

import aiohttp


def q(value: str) -> str:
    return quote(value, safe="")


class MatrixError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class MatrixUser:
    def __init__(self, hs_url: str, user_id: str, access_token: str) -> None:
        self.hs_url = hs_url
        self.user_id = user_id
        self.access_token = access_token
        self._txn = itertools.count()
        self._session: aiohttp.ClientSession | None = None

    async def request(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self.access_token}"}
            )
        async with self._session.request(
            method, f"{self.hs_url}{path}", json=body, params=params or None
        ) as response:
            payload = await response.json(content_type=None)
            if response.status >= 400:
                raise MatrixError(response.status, payload or {})
            return payload

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # ---- rooms ----

    async def create_room(
        self,
        *,
        name: str | None = None,
        invite: list[str] | tuple[str, ...] = (),
        preset: str = "private_chat",
        power_levels: dict[str, Any] | None = None,
        room_version: str | None = None,
        initial_state: list[dict[str, Any]] | tuple[()] = (),
        encrypted: bool = False,
        is_direct: bool = False,
        alias: str | None = None,
        creation_content: dict[str, Any] | None = None,
    ) -> str:
        body: dict[str, Any] = {"preset": preset, "invite": list(invite), "is_direct": is_direct}
        if creation_content:
            body["creation_content"] = creation_content
        if name:
            body["name"] = name
        if alias:
            body["room_alias_name"] = alias
        if power_levels:
            body["power_level_content_override"] = power_levels
        if room_version:
            body["room_version"] = room_version
        state = list(initial_state)
        if encrypted:
            state.append(
                {
                    "type": "m.room.encryption",
                    "state_key": "",
                    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
                }
            )
        if state:
            body["initial_state"] = state
        return (await self.request("POST", "/_matrix/client/v3/createRoom", body))["room_id"]

    async def invite(self, room: str, user: str) -> None:
        await self.request("POST", f"/_matrix/client/v3/rooms/{q(room)}/invite", {"user_id": user})

    async def join(self, room: str) -> None:
        await self.request("POST", f"/_matrix/client/v3/join/{q(room)}", {})

    async def leave(self, room: str) -> None:
        await self.request("POST", f"/_matrix/client/v3/rooms/{q(room)}/leave", {})

    async def kick(self, room: str, user: str, reason: str = "") -> None:
        body = {"user_id": user, "reason": reason}
        await self.request("POST", f"/_matrix/client/v3/rooms/{q(room)}/kick", body)

    async def state(self, room: str, event_type: str, key: str = "") -> dict[str, Any]:
        return await self.request(
            "GET", f"/_matrix/client/v3/rooms/{q(room)}/state/{q(event_type)}/{q(key)}"
        )

    async def put_state(
        self, room: str, event_type: str, content: dict[str, Any], key: str = ""
    ) -> str:
        result = await self.request(
            "PUT", f"/_matrix/client/v3/rooms/{q(room)}/state/{q(event_type)}/{q(key)}", content
        )
        return result["event_id"]

    async def set_power_level(self, room: str, user: str, level: int) -> None:
        levels = await self.state(room, "m.room.power_levels")
        levels.setdefault("users", {})[user] = level
        await self.put_state(room, "m.room.power_levels", levels)

    async def members(self, room: str) -> dict[str, str]:
        """user id -> membership, from the room's current state."""
        chunk = (await self.request("GET", f"/_matrix/client/v3/rooms/{q(room)}/members"))["chunk"]
        return {event["state_key"]: event["content"].get("membership") for event in chunk}

    async def joined_rooms(self) -> list[str]:
        return (await self.request("GET", "/_matrix/client/v3/joined_rooms"))["joined_rooms"]

    async def invites(self) -> dict[str, dict[str, Any]]:
        """Pending invites: room id -> {state type: content} from the invite's stripped state."""
        # Synapse caches identical /sync requests for minutes: make each one unique.
        nonce = uuid.uuid4().hex
        sync = await self.request(
            "GET",
            "/_matrix/client/v3/sync",
            filter=f'{{"room":{{"timeline":{{"limit":1,"not_types":["x.{nonce}"]}}}}}}',
            timeout="0",
        )
        return {
            room: {e["type"]: e.get("content", {}) for e in invite["invite_state"]["events"]}
            for room, invite in sync.get("rooms", {}).get("invite", {}).items()
        }

    async def invited_rooms(self) -> list[str]:
        return list(await self.invites())

    # ---- events ----

    async def send_event(self, room: str, event_type: str, content: dict[str, Any]) -> str:
        txn = f"{uuid.uuid4().hex}-{next(self._txn)}"
        result = await self.request(
            "PUT", f"/_matrix/client/v3/rooms/{q(room)}/send/{q(event_type)}/{txn}", content
        )
        return result["event_id"]

    async def send_text(
        self,
        room: str,
        body: str,
        *,
        formatted_body: str | None = None,
        reply_to: str | None = None,
        mentions: list[str] | None = None,
    ) -> str:
        content: dict[str, Any] = {"msgtype": "m.text", "body": body}
        if formatted_body is not None:
            content |= {"format": "org.matrix.custom.html", "formatted_body": formatted_body}
        if reply_to is not None:
            content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
        if mentions is not None:
            content["m.mentions"] = {"user_ids": mentions}
        return await self.send_event(room, "m.room.message", content)

    async def react(self, room: str, event_id: str, key: str) -> str:
        return await self.send_event(
            room,
            "m.reaction",
            {"m.relates_to": {"rel_type": "m.annotation", "event_id": event_id, "key": key}},
        )

    async def messages(self, room: str, limit: int = 100) -> list[dict[str, Any]]:
        """The room's recent events, oldest first."""
        result = await self.request(
            "GET", f"/_matrix/client/v3/rooms/{q(room)}/messages", dir="b", limit=str(limit)
        )
        return list(reversed(result.get("chunk", [])))

    async def override_ratelimit(self, user_id: str) -> None:
        """Admin API: exempt a user from rate limits (for test users on a strict server)."""
        await self.request(
            "POST",
            f"/_synapse/admin/v1/users/{q(user_id)}/override_ratelimit",
            {"messages_per_second": 0, "burst_count": 0},
        )
