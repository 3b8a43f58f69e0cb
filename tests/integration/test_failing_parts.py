"""When a part fails, people are still told: against a real Synapse, with the defaults a
charity gets (encryption on, an encrypted staff room, DM rooms made ahead), and real
end-to-end clients for staff, moderator and member.

- the crypto store restored with the wrong `pickle.key`: the member is told (in the
  clear, said so), never removed untold; staff hear at once that encryption failed, a
  plain "Case #1 needs you", and the whole alert once the store is mended, without a
  restart;
- the crypto store unusable (a file where its folder should be): the service starts and
  runs every case;
- a room the bot's device cannot read yet: the notice goes unencrypted by
  `encryption.fallback_after`; with `fallback: none` staff hear by `policy.alert_deadline`
  what waits and why, and each outcome in a reply when it comes;
- junk: 1,500 hostile transaction bodies, then a real flag: acted on at once;
- an encrypted group room busy with chat: its flags are not held up.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nio.rooms import MatrixRoom

from appservice.config import load_config
from appservice.service import Service
from bot.store import audit
from tests.support.appservice_api import put
from tests.support.e2e_scene import (
    EncryptedScene,
    config_for,
    encrypted_scene,
    open_encrypted_group,
    staff_alerts,
)
from tests.support.scene import BOT, export_json, health, running_service, safeguard_cli, until

pytestmark = pytest.mark.synapse


@pytest.fixture
async def scene(synapse: Any, tmp_path: Path) -> AsyncIterator[EncryptedScene]:
    """The rooms and people of a charity on Element: every client end-to-end."""
    scene = await encrypted_scene(synapse, tmp_path)
    try:
        yield scene
    finally:
        await scene.close()


@pytest.fixture(autouse=True)
def _service_log(caplog: pytest.LogCaptureFixture) -> None:
    """The service's own account (INFO) in a failing test's report: what each step did."""
    caplog.set_level(logging.INFO, logger="bot")
    caplog.set_level(logging.INFO, logger="appservice")


# Short enough for a test, the same mechanism as the defaults (20 s, 30 s).
FAST = {"fallback_after": "3s"}


async def removed(scene: EncryptedScene, user: Any) -> bool:
    return (await scene.owner.members(scene.group)).get(user.user_id) == "leave"


async def flag_member(scene: EncryptedScene, text: str = "I can't do this any more") -> None:
    said = await scene.member.send_text(scene.group, text)
    await scene.moderator.react(scene.group, said, "🚨")


async def the_notice(scene: EncryptedScene) -> tuple[str, str]:
    """(DM room, notice text), as the member's own client sees it."""
    invited = await until(scene.member.invited, within=60, what="the DM invite")
    await scene.member.join(invited[0])
    notice = await until(
        lambda: scene.member.texts_in(invited[0], BOT), within=60, what="the notice"
    )
    return invited[0], notice[0]


def staff_saw(scene: EncryptedScene, fragment: str) -> list[str]:
    return [text for text in scene.staff.texts_in(scene.staff_room, BOT) if fragment in text]


async def encryption_check(service: Service) -> dict[str, Any]:
    _status, body = await health(service)
    return body["checks"]["encryption"]


async def test_wrong_pickle_key_member_told_staff_told_and_mended_without_restart(
    scene: EncryptedScene, tmp_path: Path
):
    """Seen: the notice crashed, the member was removed 8.5 s later with no DM, and
    /health said ok throughout."""
    config = config_for(scene, tmp_path, encryption=FAST)
    async with running_service(config) as service:
        await until(service.crypto.ready.is_set, within=60, what="the bot's device")
        await open_encrypted_group(scene)
    key_file = load_config(config).crypto_store / "pickle.key"
    right_key = key_file.read_text()
    key_file.write_text(secrets.token_hex(32))  # a backup restored with another key

    async with running_service(config) as service:

        async def broken() -> dict[str, Any] | None:
            check = await encryption_check(service)
            return check if not check["ok"] and "pickle.key" in check.get("problem", "") else None

        check = await until(broken, within=30, what="/health to name the key")
        assert "e2ee reset" in check["what_to_do"]
        code, out, _ = await safeguard_cli("e2ee", "status", "-c", str(config))
        assert code == 1 and "what to do:" in out and "pickle.key" in out
        await until(
            lambda: staff_saw(scene, "encryption has stopped working"),
            within=30,
            what="staff told encryption failed (in the clear)",
        )

        await flag_member(scene)
        dm, notice = await the_notice(scene)
        assert "worried about you" in notice
        assert not scene.member.encrypted(dm), "a room made without encryption"
        await until(lambda: removed(scene, scene.member), within=30, what="the removal")
        await until(
            lambda: staff_saw(scene, "Case #1 needs you"),
            within=30,
            what="a plain word to staff in their encrypted room",
        )
        assert not await staff_alerts(scene, 1), "no case detail in the clear"

        key_file.write_text(right_key)  # the operator puts the right key back
        await until(service.crypto.ready.is_set, within=60, what="encryption again")
        alert = await until(
            lambda: staff_alerts(scene, 1), within=60, what="the whole alert, encrypted"
        )
        assert "sent UNENCRYPTED" in alert[0] and "pickle.key" in alert[0]
        # Told apart from the alert (the outbox), so in either order.
        await until(
            lambda: staff_saw(scene, "encryption works again"),
            within=30,
            what="staff told encryption works again",
        )
        assert (await encryption_check(service))["ok"]
    (case,) = (await export_json(config))["cases"]
    (notify,) = [e for e in case["entries"] if e["kind"] == "step.notify"]
    assert notify["facts"]["unencrypted"] is True
    kinds = [e["kind"] for e in case["entries"]]
    assert kinds.index("step.notify") < kinds.index("step.remove"), "told, then removed"


async def test_a_crypto_store_that_cannot_be_opened_stops_nothing(
    scene: EncryptedScene, tmp_path: Path
):
    """A file where the store's folder should be (a broken volume): the service used not to
    start at all."""
    store = tmp_path / "broken-volume"
    store.write_text("not a folder")
    config = config_for(scene, tmp_path, encryption=FAST | {"store": str(store)})
    async with running_service(config) as service:
        await open_encrypted_group(scene)
        check = await until(
            lambda: _not_ok(service), within=30, what="/health to say encryption is broken"
        )
        assert str(store) in check["problem"]
        await flag_member(scene)
        _dm, notice = await the_notice(scene)
        assert "worried about you" in notice
        await until(lambda: removed(scene, scene.member), within=30, what="the removal")


async def test_a_crypto_store_lost_means_a_new_device_and_members_still_read_it(
    scene: EncryptedScene, tmp_path: Path
):
    """The store deleted between two runs (a volume lost, no backup): a new device, the old
    one deleted on the homeserver, and members' clients encrypt to the new one."""
    config = config_for(scene, tmp_path, encryption=FAST)
    async with running_service(config) as service:
        await until(service.crypto.ready.is_set, within=60, what="the bot's device")
        old_device = service.crypto.client.device_id
        await open_encrypted_group(scene)
    shutil.rmtree(load_config(config).crypto_store)  # device.json with it: an orphan
    async with running_service(config) as service:
        await until(service.crypto.ready.is_set, within=60, what="a new device")
        new_device = service.crypto.client.device_id
        assert new_device != old_device
        assert await bot_devices(scene) == [new_device], "the lost store's device is deleted"
        await flag_member(scene)
        dm, notice = await the_notice(scene)
        assert "worried about you" in notice and scene.member.encrypted(dm)
        await until(lambda: removed(scene, scene.member), within=30, what="the removal")
        alert = await until(lambda: staff_alerts(scene, 1), within=30, what="the alert")
        assert "UNENCRYPTED" not in alert[0]


async def bot_devices(scene: EncryptedScene) -> list[str]:
    """The bot's devices as the homeserver holds them (its admin API)."""
    admin = await scene.synapse.new_user("admin", admin=True)
    answer = await admin.request("GET", f"/_synapse/admin/v2/users/{BOT}/devices")
    return sorted(d["device_id"] for d in answer["devices"])


async def test_e2ee_reset_makes_a_new_device_deliberately_only_when_asked(
    scene: EncryptedScene, tmp_path: Path
):
    config = config_for(scene, tmp_path, encryption=FAST)
    async with running_service(config) as service:
        await until(service.crypto.ready.is_set, within=60, what="the bot's device")
        old_device = service.crypto.client.device_id
        code, _out, err = await safeguard_cli("e2ee", "reset", "-c", str(config), "--yes")
        assert code == 2 and "already running" in err, "never beside a running service"
    code, _out, err = await safeguard_cli("e2ee", "reset", "-c", str(config))
    assert code == 2 and "--yes" in err, "only when asked"
    assert await bot_devices(scene) == [old_device]
    code, out, _err = await safeguard_cli("e2ee", "reset", "-c", str(config), "--yes")
    assert code == 0 and old_device in out and "kept at" in out
    assert await bot_devices(scene) == []
    async with running_service(config) as service:
        await until(service.crypto.ready.is_set, within=60, what="a new device")
        assert service.crypto.client.device_id != old_device
        assert await bot_devices(scene) == [service.crypto.client.device_id]


async def _not_ok(service: Service) -> dict[str, Any] | None:
    check = await encryption_check(service)
    return check if not check["ok"] and check.get("problem") else None


def stall_room_reads(service: Service, *, partly_known: tuple[str, ...] = ()) -> asyncio.Event:
    """The bot's device cannot read any room but the staff room until the event is set:
    a room it must encrypt to and does not know yet (made or joined since it started)
    stays unknown to it (the homeserver slow or stuck answering its reads).

    `partly_known`: meanwhile nio knows the room as the sync may tell it (encrypted, these
    members in it), but not whole: its members never read."""
    assert service.crypto is not None
    go_on = asyncio.Event()
    crypto = service.crypto
    reading = crypto._load_room

    async def stalled(client: Any, room_id: str) -> None:
        if room_id != service.staff_room.room_id:
            if partly_known and room_id not in client.rooms:
                room = client.rooms[room_id] = MatrixRoom(room_id, client.user_id, True)
                for user in partly_known:
                    room.add_member(user, None, None, invited=True)
            await go_on.wait()
        await reading(client, room_id)

    crypto._load_room = stalled  # type: ignore[method-assign]
    return go_on


async def test_a_room_the_device_cannot_read_yet_goes_unencrypted_by_the_fallback_time(
    scene: EncryptedScene, tmp_path: Path
):
    """The member's DM cannot be read by the bot's device in time, though the sync has
    told nio of it in part (as it may, racing the read): sent in the clear by the
    fallback time, and staff told why, truly."""
    config = config_for(scene, tmp_path, encryption=FAST)
    async with running_service(config) as service:
        await open_encrypted_group(scene)  # before the stall: the bot reads the room
    member = (scene.member.user_id,)
    async with running_service(
        config, prepare=lambda service: stall_room_reads(service, partly_known=member)
    ) as service:
        await until(service.crypto.ready.is_set, within=60, what="the bot's device")
        await flag_member(scene)
        dm, notice = await the_notice(scene)
        assert "worried about you" in notice
        await until(lambda: removed(scene, scene.member), within=30, what="the removal")
        alert = await until(lambda: staff_alerts(scene, 1), within=30, what="the alert")
        assert "sent UNENCRYPTED" in alert[0] and "read by the bot's device" in alert[0]
    (case,) = (await export_json(config))["cases"]
    (notify,) = [e for e in case["entries"] if e["kind"] == "step.notify"]
    assert notify["facts"]["unencrypted"] is True
    assert dm


async def test_staff_hear_by_the_deadline_what_waits_and_then_each_outcome(
    scene: EncryptedScene, tmp_path: Path
):
    """`encryption.fallback: none`: the notice waits for encryption; staff do not."""
    config = config_for(
        scene, tmp_path, encryption={"fallback": "none"}, policy={"alert_deadline": "5s"}
    )
    async with running_service(config):
        await open_encrypted_group(scene)
    released: list[asyncio.Event] = []
    async with running_service(
        config, prepare=lambda service: released.append(stall_room_reads(service))
    ) as service:
        await until(service.crypto.ready.is_set, within=60, what="the bot's device")
        loop = asyncio.get_running_loop()
        flagged = loop.time()
        await flag_member(scene)
        alert = await until(lambda: staff_saw(scene, "Flagged by "), within=30, what="the alert")
        # The deadline kept (5 s), with room for the push and the staff's sync.
        assert loop.time() - flagged < 9, "staff heard by the deadline"
        lines = alert[0].splitlines()
        assert "NOT notified yet" in lines[0]
        assert any(line.startswith("… Not removed yet (waiting until they") for line in lines)
        assert not await removed(scene, scene.member), "never removed before being told"
        released[0].set()  # the room can be read again
        await until(lambda: removed(scene, scene.member), within=60, what="the removal")
        told = await until(
            lambda: staff_saw(scene, "has now been notified"), within=30, what="update"
        )
        assert told[0].startswith("Case #1: the member has now been notified by DM")
        await until(lambda: staff_saw(scene, "now been removed"), within=30, what="removal update")
        _dm, notice = await the_notice(scene)
        assert "worried about you" in notice


def junk_bodies(group: str) -> list[dict[str, Any]]:
    """1,500 hostile or broken transaction bodies: 1,200 🚨 in rooms the bot is not in (each
    one a room to read, were it decided like a real flag), 250 `!safeguard` from people who
    are no moderators, 50 bodies that are not transactions at all."""
    bodies: list[dict[str, Any]] = []
    for n in range(1200):
        relation = {"rel_type": "m.annotation", "event_id": f"$x{n}", "key": "🚨"}
        event = {
            "event_id": f"$junk-{uuid.uuid4().hex}",
            "room_id": f"!nowhere{n % 60}:localhost",
            "type": "m.reaction",
            "sender": f"@stranger{n % 60}:localhost",
            "origin_server_ts": 1,
            "content": {"m.relates_to": relation},
        }
        bodies.append({"events": [event]})
    for n in range(250):
        event = {
            "event_id": f"$junk-{uuid.uuid4().hex}",
            "room_id": group,
            "type": "m.room.message",
            "sender": f"@troll{n % 5}:localhost",
            "origin_server_ts": 1,
            "content": {"msgtype": "m.text", "body": "!safeguard @someone:localhost"},
        }
        bodies.append({"events": [event]})
    bodies += [{"events": [{"type": "m.reaction", "content": "🚨"}, 7, None]}] * 50
    return bodies


async def test_a_real_flag_is_never_queued_behind_junk(scene: EncryptedScene, tmp_path: Path):
    """Seen: after 1,500 junk bodies /health said ok with a backlog of 1,902, and a real
    moderator's 🚨 had not removed the member 10 s later."""
    config = config_for(scene, tmp_path, encryption=FAST)
    async with running_service(config) as service:
        await until(service.crypto.ready.is_set, within=60, what="the bot's device")
        await open_encrypted_group(scene)
        bodies = junk_bodies(scene.group)
        for start in range(0, len(bodies), 100):
            await asyncio.gather(
                *(
                    put(service, f"junk-{start + n}", body)
                    for n, body in enumerate(bodies[start : start + 100])
                )
            )
        await flag_member(scene)
        await until(
            lambda: removed(scene, scene.member),
            within=10,
            what="the member removed, within 10 s, whatever junk came first",
        )
        _status, body = await health(service)
        inbox = body["checks"]["inbox"]
        assert inbox["ok"] and inbox["lanes"]["flags"]["backlog"] == 0
        # The junk is not dropped: each refusal is recorded, in its own time.
        await until(lambda: _lane_empty(service, "refusals"), within=120, what="refusals")
        async with service.engine.connect() as conn:
            refused = [e for e in await audit.entries(conn) if e.kind == "refused"]
        assert len(refused) == 1450, "1,200 from rooms not moderated, 250 from no moderator"
        codes = {e.facts["code"] for e in refused}
        assert codes == {"room_not_moderated", "not_moderator"}


async def test_an_encrypted_room_busy_with_chat_acts_on_its_flags_at_once(
    scene: EncryptedScene, tmp_path: Path
):
    config = config_for(scene, tmp_path, encryption=FAST)
    async with running_service(config) as service:
        await until(service.crypto.ready.is_set, within=60, what="the bot's device")
        await open_encrypted_group(scene)
        for n in range(150):
            await scene.moderator.send_text(scene.group, f"chat {n}")
        await flag_member(scene)
        await until(lambda: removed(scene, scene.member), within=15, what="the removal")
        # The chat was decrypted apart, and nothing of it is kept or acted on.
        await until(lambda: _lane_empty(service, "decrypt"), within=60, what="chat read")


async def _lane_empty(service: Service, lane: str) -> bool:
    _status, body = await health(service)
    return body["checks"]["inbox"]["lanes"][lane]["backlog"] == 0
