"""End-to-end encrypted rooms, against real Synapse, with real end-to-end clients
(matrix-nio with their own stores, trusting every device) as staff, moderator and member.

- an encrypted staff room: the alert decrypts to "Case #N"; an encrypted `!case list`
  gets an encrypted reply;
- an encrypted group room: an encrypted `!safeguard` reply removes the member;
- the member's DM and check-in room are created encrypted, and the member decrypts
  the notice and the check-in message;
- kill -9 while the encrypted alert is being sent: still exactly one alert;
- a message the bot cannot decrypt is not silent: staff are told.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import signal

import pytest

from bot.store import ready_rooms as ready_store
from tests.support.e2e_scene import (
    config_for,
    encrypted_scene,
    open_encrypted_group,
    staff_alerts,
)
from tests.support.processes import run_service_process
from tests.support.proxy import HoldingProxy
from tests.support.scene import (
    BOT,
    entries,
    export_json,
    health,
    running_service,
    safeguard_cli,
    until,
)

pytestmark = pytest.mark.synapse


async def test_encrypted_rooms_end_to_end(synapse, tmp_path):
    scene = await encrypted_scene(synapse, tmp_path)
    try:
        config = config_for(scene, tmp_path)
        async with running_service(config) as service:
            assert service.crypto is not None
            await until(service.crypto.ready.is_set, what="the bot's device")
            await until(lambda: service.ready_rooms.ready == 2 or None, what="DM rooms made ahead")
            # Each room made ahead has its Megolm session already (the notice waits for no
            # store write). Aged past nio's limit (a week) while waiting: the notice still
            # goes at its first attempt, under a fresh one, and decrypts.
            assert service.crypto.client is not None and service.crypto.client.olm is not None
            olm = service.crypto.client.olm
            ahead = [s for s in olm.outbound_group_sessions.values() if not s.shared]
            assert len(ahead) >= 2
            for session in ahead:
                session.creation_time -= dt.timedelta(days=8)
            # The member's devices, read before anything is sent to them (a flag does so
            # as it is accepted).
            assert scene.member.user_id not in olm.tracked_users
            service.crypto.look_up_devices(scene.member.user_id)

            def member_devices() -> set[str]:
                return {d.id for d in olm.device_store.active_user_devices(scene.member.user_id)}

            await until(
                lambda: scene.member.client.device_id in member_devices() or None,
                what="the member's devices read ahead",
            )
            await open_encrypted_group(scene)
            # Still known whole to the device once its sync has shown them (Synapse shows a
            # room just made with its timeline limited): the notice reads nothing first.
            async with service.engine.connect() as conn:
                made_ahead = [r.room_id for r in await ready_store.all_rooms(conn)]
            assert len(made_ahead) == 2
            client = service.crypto.client
            for _ in range(2):  # the second answer asked after the rooms were made
                seen = client.next_batch
                await scene.owner.send_text(scene.group, "hello all")
                await until(
                    lambda seen=seen: client.next_batch != seen or None, what="a sync answer"
                )
            assert all(service.crypto.knows_whole(room) for room in made_ahead)
            # A flag accepted reads the member's devices as it opens the case.
            looked_up: list[str] = []
            look_up = service.crypto.look_up_devices
            service.crypto.look_up_devices = lambda user: (looked_up.append(user), look_up(user))[1]
            said = await scene.member.send_text(scene.group, "I have a plan to end it tonight")
            await scene.moderator.send_text(
                scene.group, "!safeguard they said they have a plan", reply_to=said
            )

            async def removed() -> bool:
                return (await scene.owner.members(scene.group)).get(scene.member.user_id) == "leave"

            await until(removed, within=30, what="the member removed by an encrypted command")
            assert looked_up == [scene.member.user_id]
            alerts = await until(lambda: staff_alerts(scene, 1), within=30, what="the alert")
            assert "they said they have a plan" in alerts[0]
            # The member's DM: made ahead, encrypted from its first event, and the notice
            # (sent after they were invited into it) decrypts on their phone.
            dm = await until(scene.member.invited, what="the DM invite")
            await scene.member.join(dm[0])
            notice = await until(
                lambda: scene.member.texts_in(dm[0], BOT), within=30, what="the notice"
            )
            assert "worried about you" in notice[0]
            assert scene.member.encrypted(dm[0]), "the DM is encrypted"
            (case,) = (await export_json(config))["cases"]
            (notify,) = [e for e in case["entries"] if e["kind"] == "step.notify"]
            assert notify["facts"]["room_made_ahead"] is True
            assert notify["facts"]["attempts"] == 1 and "unencrypted" not in notify["facts"]
            # An encrypted command in the encrypted staff room, an encrypted reply.
            await scene.staff.send_text(scene.staff_room, "!case list")
            listing = await until(
                lambda: [t for t in scene.staff.texts_in(scene.staff_room, BOT) if "Cases (" in t],
                what="the reply to !case list",
            )
            assert "#1" in listing[0]
            # The check-in room: encrypted too.
            rooms = await until(
                lambda: [r for r in scene.member.client.invited_rooms if r != dm[0]],
                within=30,
                what="the check-in invite",
            )
            await scene.member.join(rooms[0])
            checkin = await until(
                lambda: scene.member.texts_in(rooms[0], BOT), within=30, what="the check-in"
            )
            assert "checking in" in checkin[0].lower()
            assert scene.member.encrypted(rooms[0])
            assert not scene.staff.undecryptable and not scene.member.undecryptable
        code, out, _ = await safeguard_cli("e2ee", "status", "-c", str(config))
        assert code == 0 and "device:" in out and "SAFEGUARD" in out and "encrypted rooms:" in out
    finally:
        await scene.close()


async def test_killed_while_sending_an_encrypted_alert_still_one_alert(synapse, tmp_path):
    scene = await encrypted_scene(synapse, tmp_path)
    try:
        async with HoldingProxy(synapse.url) as proxy:
            config = config_for(scene, tmp_path, homeserver_url=proxy.url)
            async with running_service(config):
                await open_encrypted_group(scene)
            proxy.hold(lambda r: scene.staff_room in r.path and "/send/m.room.encrypted/" in r.path)
            with open(tmp_path / "service.log", "wb") as log:
                process = await run_service_process(config, stdout=log, stderr=log)
            said = await scene.member.send_text(scene.group, "goodbye everyone")
            await scene.moderator.react(scene.group, said, "🚨")
            try:
                await asyncio.wait_for(proxy.held_event.wait(), 60)
            except TimeoutError:
                print("SERVICE LOG", (tmp_path / "service.log").read_text()[-5000:])
                raise
            # The alert reaches Synapse; the service dies before it hears back.
            proxy.release()
            await asyncio.sleep(0.3)
            process.send_signal(signal.SIGKILL)
            await process.wait()
            async with running_service(config):

                async def recorded_once() -> bool:
                    document = await export_json(config)
                    return bool(document["cases"]) and (
                        document["cases"][0]["steps"]["alert"] == "done"
                    )

                await until(recorded_once, within=60, what="the alert recorded")
                await asyncio.sleep(1)
            assert len(await staff_alerts(scene, 1)) == 1, "exactly one alert"
    finally:
        await scene.close()


async def test_homeserver_gone_is_an_encryption_problem_on_health(synapse, tmp_path):
    """Synapse stops answering (connection refused): the bot's encryption sync says so on
    /health, instead of retrying in silence, and recovers when Synapse is back."""
    scene = await encrypted_scene(synapse, tmp_path)
    proxy = HoldingProxy(synapse.url)
    await proxy.start()
    try:
        config = config_for(scene, tmp_path, homeserver_url=proxy.url)
        async with running_service(config) as service:

            async def encryption(ok: bool) -> bool:
                _status, body = await health(service)
                check = body["checks"]["encryption"]
                return check["ok"] is ok and (check["ready"] or not ok)

            await until(lambda: encryption(True), within=60, what="encryption ready")
            await proxy.stop()  # nothing listens: every connection is refused
            await until(lambda: encryption(False), within=60, what="the outage on /health")
            _status, body = await health(service)
            assert "sync" in body["checks"]["encryption"]["problem"], "named as what failed"
            proxy = HoldingProxy(synapse.url, port=proxy.port)
            await proxy.start()
            await until(lambda: encryption(True), within=90, what="encryption back")
    finally:
        await proxy.stop()
        await scene.close()


async def test_a_message_the_bot_cannot_read_is_told_to_staff(synapse, tmp_path):
    scene = await encrypted_scene(synapse, tmp_path)
    try:
        config = config_for(scene, tmp_path)
        async with running_service(config) as service:
            await until(service.crypto.ready.is_set, what="the bot's device")
            import datetime as dt

            service.dispatcher.undecryptable_after = dt.timedelta(seconds=2)
            plain = scene.owner
            await scene.staff.client.room_invite(scene.staff_room, plain.user_id)
            await until(lambda: _invited(plain, scene.staff_room), what="the invite")
            await plain.join(scene.staff_room)
            # Encrypted with a session nobody ever shared with the bot.
            await plain.send_event(
                scene.staff_room,
                "m.room.encrypted",
                {
                    "algorithm": "m.megolm.v1.aes-sha2",
                    "ciphertext": "AwgAEhAxxx",
                    "sender_key": "bogus",
                    "session_id": "never-shared",
                    "device_id": "NOPE",
                },
            )
            told = await until(
                lambda: [
                    t
                    for t in scene.staff.texts_in(scene.staff_room, BOT)
                    if "could not be read" in t
                ],
                within=30,
                what="staff told",
            )
            assert plain.user_id in told[0]
    finally:
        await scene.close()


async def _invited(user, room: str) -> bool:
    return room in await user.invited_rooms()


async def test_policy_is_explained_in_an_encrypted_dm(synapse, tmp_path):
    """`!policy` as a member sends it by default: encrypted in an encrypted group room, and
    answered in a DM encrypted from its first event, which their phone decrypts."""
    scene = await encrypted_scene(synapse, tmp_path)
    try:
        config = config_for(scene, tmp_path)
        async with running_service(config) as service:
            await until(service.crypto.ready.is_set, what="the bot's device")
            await open_encrypted_group(scene)
            await scene.member.send_text(scene.group, "!policy")
            (dm,) = await until(scene.member.invited, within=30, what="the policy DM's invite")
            await scene.member.join(dm)
            (text,) = await until(
                lambda: scene.member.texts_in(dm, BOT), within=30, what="the explanation"
            )
            assert "If a moderator is worried" in text
            assert scene.member.encrypted(dm), "the DM is encrypted"
            assert not scene.member.undecryptable
            # Recorded once the send is answered: the member's client may show it first.
            (explained,) = await until(
                lambda: entries(service, "policy_explained"), what="the record of it"
            )
            assert explained.facts == {"unencrypted": False}
    finally:
        await scene.close()
