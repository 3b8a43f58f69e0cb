"""Who gets the bot's room keys (appservice/key_sharing.py), against real Synapse, with
real end-to-end clients (matrix-nio with their own stores).

When a device asks for one again (m.room_key_request):

- a staff device the bot shared a session with, that lost its copy, asks and gets it
  back, and decrypts the bot's message — also after the service restarts;
- a new device of the same staff account (logged in after the message: a new phone,
  or whoever has the password) asks and gets nothing, and the refusal is logged;
- someone who joins the staff room after the message asks and gets nothing.

With `encryption.verified_only`, a staff device its owner has not cross-signed gets no
key for the bot's message (the cross-signed one reads it), and does for the next
message once it is cross-signed.

The message is the bot's reply to `!case list` in the encrypted staff room: a session
of the bot's like an alert's (what is in it does not change who may have its key).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tests.support.e2e_scene import EncryptedScene, config_for, encrypted_scene
from tests.support.e2e_user import E2EUser, new_e2e_user
from tests.support.scene import BOT, running_service, until

pytestmark = pytest.mark.synapse

REPLY = "No open cases."


@pytest.fixture(autouse=True)
def _service_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="appservice")


async def bot_message_in_staff_room(scene: EncryptedScene, service) -> str:
    """The bot's encrypted reply to staff, as its event id."""
    await until(service.crypto.ready.is_set, what="the bot's device")
    room = scene.staff.client.rooms[scene.staff_room]
    await until(lambda: BOT in room.users and BOT not in room.invited_users, what="the bot in")
    await scene.staff.send_text(scene.staff_room, "!case list")
    replies = await until(
        lambda: [e for r, s, body, e in scene.staff.received if s == BOT and body == REPLY],
        what="the bot's reply",
    )
    return replies[0]


async def lose_and_ask(user: E2EUser, room_id: str, event_id: str) -> None:
    """The device forgets the message's key (if it had it) and asks the bot's device."""
    event = await user.encrypted_event(room_id, event_id)
    user.forget_session(room_id, event.session_id, event.sender_key)
    assert user.decrypted(event) is None
    await user.ask_for_key(event, BOT, event.device_id)


async def decrypted(user: E2EUser, room_id: str, event_id: str) -> str | None:
    return user.decrypted(await user.encrypted_event(room_id, event_id))


async def test_a_device_that_lost_a_key_gets_it_back_also_after_a_restart(synapse, tmp_path):
    scene = await encrypted_scene(synapse, tmp_path)
    try:
        config = config_for(scene, tmp_path)
        async with running_service(config) as service:
            message = await bot_message_in_staff_room(scene, service)
            await lose_and_ask(scene.staff, scene.staff_room, message)
            back = await until(
                lambda: decrypted(scene.staff, scene.staff_room, message),
                what="the key given back",
            )
            assert back == REPLY
            assert service.crypto.key_sharing.answered == 1
            assert service.crypto.key_sharing.refused == 0
        # A new BotCrypto on the same store: who the session went to was kept with it.
        async with running_service(config) as service:
            await until(service.crypto.ready.is_set, what="the bot's device again")
            await lose_and_ask(scene.staff, scene.staff_room, message)
            back = await until(
                lambda: decrypted(scene.staff, scene.staff_room, message),
                what="the key given back after a restart",
            )
            assert back == REPLY
            # Given back, not refused. (The request from before the restart may come again
            # too: the homeserver keeps a to-device message until a sync moves past the
            # answer that brought it, and a service stopped before storing that answer
            # takes it again. Answering it again gives the same key to the same device.)
            requests = service.crypto.status()["key_requests"]
            assert requests["refused"] == 0 and requests["answered"] >= 1, requests
    finally:
        await scene.close()


async def test_a_new_device_or_a_later_member_gets_no_old_key(synapse, tmp_path, caplog):
    scene = await encrypted_scene(synapse, tmp_path)
    new_phone = late = None
    try:
        config = config_for(scene, tmp_path)
        async with running_service(config) as service:
            crypto = service.crypto
            message = await bot_message_in_staff_room(scene, service)
            # The same staff account on a device logged in after the message.
            new_phone = await scene.staff.another_device(Path(tmp_path) / "new-phone")
            await until(lambda: scene.staff_room in new_phone.client.rooms, what="its sync")
            await lose_and_ask(new_phone, scene.staff_room, message)
            await until(lambda: crypto.key_sharing.refused == 1, what="the new device refused")
            # Someone invited into the staff room (and joined) after the message.
            late = await new_e2e_user(synapse, "late", Path(tmp_path) / "stores")
            await scene.staff.client.room_invite(scene.staff_room, late.user_id)
            await until(lambda: scene.staff_room in late.client.invited_rooms, what="the invite")
            await late.join(scene.staff_room)
            await lose_and_ask(late, scene.staff_room, message)
            await until(lambda: crypto.key_sharing.refused == 2, what="the later member refused")
            await asyncio.sleep(3)  # time enough for a key that should not come
            assert await decrypted(new_phone, scene.staff_room, message) is None
            assert await decrypted(late, scene.staff_room, message) is None
            assert crypto.key_sharing.answered == 0
        refusals = [
            r for r in caplog.records if r.levelno == logging.WARNING and "room key" in r.message
        ]
        assert len(refusals) == 2, [r.message for r in refusals]
        assert all("never given" in r.message for r in refusals)
        # Ids go to DEBUG only: the WARNING names no one and no room.
        for record in refusals:
            assert "@" not in record.message and "!" not in record.message
    finally:
        for user in (new_phone, late):
            if user is not None:
                await user.close()
        await scene.close()


async def test_verified_only_gives_keys_to_cross_signed_devices_only(synapse, tmp_path, caplog):
    scene = await encrypted_scene(synapse, tmp_path)
    unverified = None
    try:
        await scene.staff.set_up_cross_signing()  # this device: verified
        unverified = await scene.staff.another_device(Path(tmp_path) / "unverified-phone")
        await until(lambda: scene.staff_room in unverified.client.rooms, what="its sync")
        config = config_for(scene, tmp_path, encryption={"verified_only": True})
        async with running_service(config) as service:
            message = await bot_message_in_staff_room(scene, service)
            assert await decrypted(scene.staff, scene.staff_room, message) == REPLY
            await until(lambda: message in unverified.undecryptable, what="the message seen")
            assert await decrypted(unverified, scene.staff_room, message) is None
            assert any("not verified" in r.message for r in caplog.records)
            # Asking does not help: it was never given the key.
            await lose_and_ask(unverified, scene.staff_room, message)
            await until(lambda: service.crypto.key_sharing.refused == 1, what="refused")
            # Verified from the first device: the bot's next message reaches it too.
            await scene.staff.cross_sign(unverified.client.device_id)
            # The bot hears of it from its sync (device_lists), one answer later.
            await until(
                lambda: (
                    service.crypto.key_sharing.cross_signed(
                        scene.staff.user_id, unverified.client.device_id
                    )
                    is not False
                ),
                what="the bot aware of the new signature",
            )
            scene.staff.received.clear()
            later = await bot_message_in_staff_room(scene, service)
            await until(
                lambda: decrypted(unverified, scene.staff_room, later),
                within=30,
                what="the next message on the device verified since",
            )
            assert await decrypted(unverified, scene.staff_room, message) is None
    finally:
        if unverified is not None:
            await unverified.close()
        await scene.close()
