"""One /sync, with encryption on (the default), against a real Synapse with real
end-to-end clients: the bot's sync is both the safety net (bot/intake/safety_net.py) and the
encryption device's (appservice/crypto.py).

- The service holds one /sync at a time, and no sync it makes asks for full state (the
  device's own sync used to start with the full state of every room the bot is in).
- A room key a member's device sends while the service is down is received after the
  restart: the device's to-device inbox is not acknowledged by the sync it now shares.
- A room key sent while the crypto store is broken (the sync goes on without the
  device) is received once the store is repaired, without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import Path
from typing import Any

import pytest

from appservice.config import load_config
from tests.support.e2e_scene import EncryptedScene, config_for, encrypted_scene
from tests.support.proxy import HoldingProxy
from tests.support.scene import BOT, running_service, until

pytestmark = pytest.mark.synapse

SYNC = "/_matrix/client/v3/sync"
REPLY = "No open cases."
FAST = {"fallback_after": "5s"}
IDLE_SECONDS = 10  # more than one long poll (`short_long_poll`)


@pytest.fixture(autouse=True)
def _service_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="appservice")


@pytest.fixture
async def scene(synapse: Any, tmp_path: Path) -> Any:
    scene = await encrypted_scene(synapse, tmp_path)
    yield scene
    await scene.close()


def replies(scene: EncryptedScene) -> list[str]:
    return [
        event
        for _room, sender, body, event in scene.staff.received
        if sender == BOT and body == REPLY
    ]


async def bot_in_staff_room(scene: EncryptedScene) -> None:
    room = scene.staff.client.rooms[scene.staff_room]
    await until(lambda: BOT in room.users and BOT not in room.invited_users, what="the bot in")


def syncs(proxy: HoldingProxy) -> list[str]:
    return [asked for asked in proxy.requested if asked.startswith(SYNC)]


async def test_one_sync_at_a_time_and_none_asks_for_full_state(scene, tmp_path, short_long_poll):
    async with HoldingProxy(scene.synapse.url, cancel_with_caller=True) as proxy:
        config = config_for(scene, tmp_path, encryption=FAST, homeserver_url=proxy.url)
        for run in ("first start", "restart"):
            async with running_service(config) as service:
                await until(service.crypto.ready.is_set, within=60, what="the bot's device")
                await bot_in_staff_room(scene)
                await scene.staff.send_text(scene.staff_room, "!case list")
                await until(lambda: replies(scene), within=30, what="the bot's encrypted reply")
                scene.staff.received.clear()
                before = len(syncs(proxy))
                # Over one long poll: a second sync beside it would show by now.
                await asyncio.sleep(IDLE_SECONDS)
                idle = len(syncs(proxy)) - before
                print(f"{run}: /sync requests in an idle {IDLE_SECONDS} s: {idle}")
                print(f"{run}: most /sync requests at once: {proxy.most_in_flight[SYNC]}")
        assert proxy.most_in_flight[SYNC] == 1, "one /sync at a time"
        full = [asked for asked in syncs(proxy) if "full_state=true" in asked.lower()]
        assert not full, f"syncs asking for full state: {full}"


async def test_a_room_key_sent_while_the_service_is_down_is_received(scene, tmp_path):
    config = config_for(scene, tmp_path, encryption=FAST)
    async with running_service(config) as service:
        await until(service.crypto.ready.is_set, within=60, what="the bot's device")
        await bot_in_staff_room(scene)
    # The staff device shares a new session with the bot's device (to-device) now.
    scene.staff.client.olm.outbound_group_sessions.pop(scene.staff_room, None)
    await scene.staff.send_text(scene.staff_room, "!case list")
    async with running_service(config) as service:
        await until(lambda: replies(scene), within=90, what="the command read and answered")


async def test_a_room_key_sent_while_the_store_is_broken_is_received_once_repaired(scene, tmp_path):
    config = config_for(scene, tmp_path, encryption=FAST)
    async with running_service(config) as service:
        await until(service.crypto.ready.is_set, within=60, what="the bot's device")
        await bot_in_staff_room(scene)
    key_file = load_config(config).crypto_store / "pickle.key"
    right_key = key_file.read_text()
    key_file.write_text(secrets.token_hex(32))  # a backup restored with another key
    async with running_service(config) as service:
        await until(lambda: service.crypto.broken is not None, within=30, what="the store broken")
        rounds = service.catch_up.rounds
        scene.staff.client.olm.outbound_group_sessions.pop(scene.staff_room, None)
        await scene.staff.send_text(scene.staff_room, "!case list")
        # The safety net syncs on meanwhile (without the device), past the key's message.
        await until(lambda: service.catch_up.rounds > rounds + 1, within=90, what="syncs")
        assert not replies(scene), "nothing to read it with yet"
        key_file.write_text(right_key)  # the operator puts the right key back
        await until(service.crypto.ready.is_set, within=60, what="encryption again")
        await until(lambda: replies(scene), within=60, what="the command read and answered")
