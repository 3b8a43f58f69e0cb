"""Property-based fuzzing of the transaction endpoint, against the running service.

Whatever Synapse (or anyone holding the hs_token) sends: never a 5xx (a 503 would
only mean the database cannot record, which it can here), the service stays up,
and a real flag through the real Synapse afterwards is still acted on.

Hypothesis drives a plain HTTP client from a worker thread while the service runs
on the test's event loop.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.scene import (
    build_scene,
    health,
    open_group_room,
    running_service,
    scene_config,
    until,
)

pytestmark = pytest.mark.synapse

# Text as clients and attackers write it, lone UTF-16 surrogates included.
wild_text = st.one_of(
    st.text(
        alphabet=st.one_of(
            st.characters(codec="utf-8"),
            st.characters(categories=["Cs"]),
            st.sampled_from(["🚨", "\ufe0f", "\0", "$", "@", ":", "\\"]),
        ),
        max_size=40,
    ),
    st.sampled_from(["!safeguard", "!safeguard @member:localhost", "!case list", "🚨"]),
)
ids = st.one_of(
    wild_text,
    st.builds(lambda s: "$" + s, wild_text),
    st.text(string.ascii_letters, min_size=250, max_size=300),
    st.integers(),
    st.none(),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), wild_text),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(wild_text, children, max_size=4)
    ),
    max_leaves=20,
)
relations = st.fixed_dictionaries(
    {},
    optional={
        "rel_type": st.sampled_from(["m.annotation", "m.thread", "m.replace"]) | wild_text,
        "event_id": ids,
        "key": st.sampled_from(["🚨", "🚨\ufe0f", "✅", "✋"]) | wild_text,
        "m.in_reply_to": st.fixed_dictionaries({"event_id": ids}),
    },
)
contents = st.fixed_dictionaries(
    {},
    optional={
        "body": wild_text | st.builds(lambda s: "!safeguard " + s, wild_text),
        "formatted_body": wild_text,
        "m.relates_to": relations | json_values,
        "membership": st.sampled_from(["join", "leave", "invite", "ban"]) | wild_text,
        "m.mentions": st.fixed_dictionaries({"user_ids": st.lists(ids, max_size=2)}),
    },
)
events = st.fixed_dictionaries(
    {},
    optional={
        "event_id": ids,
        "room_id": ids,
        "sender": ids,
        "state_key": ids,
        "type": st.sampled_from(
            ["m.reaction", "m.room.message", "m.room.member", "m.room.encrypted"]
        )
        | wild_text,
        "content": contents | json_values,
        "origin_server_ts": st.integers() | json_values,
        "unsigned": json_values,
    },
)
bodies = st.one_of(
    st.builds(lambda evs: json.dumps({"events": evs}).encode(), st.lists(events, max_size=6)),
    st.builds(lambda value: json.dumps(value).encode(), json_values),
    st.binary(max_size=200),
    st.integers(min_value=1, max_value=5000).map(
        lambda depth: b'{"events": [' + b"[" * depth + b"]" * depth + b"]}"
    ),
)


def put(port: int, token: str, txn: int, body: bytes) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            "PUT",
            f"/_matrix/app/v1/transactions/fuzz-{txn}",
            body=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        response = connection.getresponse()
        payload: Any = response.read()
        if response.status != 200:
            assert json.loads(payload)["errcode"].startswith("M_"), "errors in Matrix's shape"
        return response.status
    finally:
        connection.close()


async def test_transaction_endpoint_fuzzed_then_a_real_flag_still_works(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    config = scene_config(
        scene,
    )
    async with running_service(config) as service:
        await open_group_room(scene)
        port, token = service.port, service.registration.hs_token
        assert port is not None
        statuses: list[int] = []

        @settings(
            max_examples=250,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(body=bodies)
        def fuzz(body: bytes) -> None:
            status = put(port, token, len(statuses), body)
            statuses.append(status)
            assert status in (200, 400), f"HTTP {status} for {body[:200]!r}"

        await asyncio.to_thread(fuzz)
        assert statuses.count(200) > 50, "the fuzz reached the recording path"
        _status, body = await health(service)
        assert body["checks"]["database"]["ok"] is True
        said = await scene.member.send_text(scene.group, "I can't keep going")
        await scene.moderator.react(scene.group, said, "🚨")

        async def removed() -> bool:
            return await scene.membership(scene.group, scene.member) == "leave"

        await until(removed, within=60, what="the real flag acted on after the fuzz")
