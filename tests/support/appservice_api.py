"""Talking to the service as Synapse does: the Application Service API, with its token."""

from __future__ import annotations

import json

import aiohttp

from appservice.service import Service


def base(service: Service) -> str:
    return f"http://127.0.0.1:{service.port}"


def auth(service: Service) -> dict[str, str]:
    return {"Authorization": f"Bearer {service.registration.hs_token}"}


def reaction(event_id: str, key: str = "🚨") -> dict:
    return {
        "event_id": event_id,
        "room_id": "!nowhere:localhost",
        "type": "m.reaction",
        "sender": "@someone:localhost",
        "origin_server_ts": 1,
        "content": {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$x", "key": key}},
    }


async def put(service, txn, body, headers=None, raw=False):
    async with (
        aiohttp.ClientSession() as session,
        session.put(
            f"{base(service)}/_matrix/app/v1/transactions/{txn}",
            data=body if raw else json.dumps(body),
            headers=auth(service) if headers is None else headers,
        ) as response,
    ):
        return response.status, await response.json(content_type=None)
