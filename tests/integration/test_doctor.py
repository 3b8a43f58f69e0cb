"""`safeguard doctor` against the real Synapse: a healthy setup passes, and each broken
variant fails on its own line, naming what is wrong (and the room, where it is a room)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import yaml

from appservice.config import load_config
from appservice.doctor import Report, diagnose, rooms_to_check
from appservice.registration import write_registration
from tests.support.scene import (
    BOT,
    build_scene,
    open_group_room,
    running_service,
    safeguard_cli,
    scene_config,
    until,
)


def failed(report: Report) -> list[str]:
    return [f.line() for f in report.findings if f.status == "fail"]


def edited(config_path: Path, directory: Path, change) -> Path:
    """A copy of the config (in `directory`), changed by `change(data)`."""
    data = yaml.safe_load(config_path.read_text())
    change(data)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


async def test_a_healthy_setup_passes_and_each_fault_fails_on_its_own_line(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    config_path = scene_config(scene)
    async with running_service(config_path):
        group = await open_group_room(scene)
        # A room the bot was put in without the power to act there.
        weak = await scene.owner.create_room(
            name="Weak room",
            invite=[scene.staff.user_id],
            power_levels={"users": {BOT: 0, scene.staff.user_id: 50}},
        )
        await scene.staff.join(weak)
        await scene.staff.invite(weak, BOT)
        await until(lambda: scene.bot_joined(weak), what="the bot to join the weak room")

        async def in_staff_room() -> bool:
            return (await scene.staff.members(scene.staff_room)).get(BOT) == "join"

        await until(in_staff_room, what="the bot in the staff room")

        async def recorded() -> bool:
            _, moderated, _ = await rooms_to_check(load_config(config_path))
            return {group, weak} <= set(moderated)

        await until(recorded, what="both rooms recorded as moderated")

        # With the service running, Synapse's ping reaches the service itself.
        report = await diagnose(str(config_path))
        lines = [f.line() for f in report.findings]
        fails = failed(report)
        assert len(fails) == 1, lines
        assert fails[0].startswith(f"✗ room {weak} (Weak room): the bot cannot kick, redact ")
        assert any(line.startswith(f"✓ room {group} (Group chat)") for line in lines), lines
        assert any(line.startswith("✓ appservice ping") and "the service" in line for line in lines)
        assert any(line.startswith("✓ registration loaded") for line in lines), lines
        assert any(line.startswith("✓ database") for line in lines), lines
        assert any(
            line.startswith(f"⚠ staff room {scene.staff_room} (Staff): not encrypted")
            for line in lines
        )

    # The weak room fixed; the service stopped: the doctor answers Synapse's ping itself.
    await scene.owner.set_power_level(weak, BOT, 50)
    code, out, _ = await safeguard_cli("doctor", "-c", str(config_path))
    assert code == 0, out
    assert "✗" not in out
    assert "✓ appservice ping: Synapse reached the doctor" in out, out
    code, out, _ = await safeguard_cli("doctor", "-c", str(config_path), "--json")
    assert code == 0
    document = json.loads(out)
    assert document["ok"] is True
    weak_check = next(c for c in document["checks"] if c.get("room_id") == weak)
    assert weak_check == {
        "status": "ok",
        "check": "room",
        "message": "joined; the bot can kick, redact and invite",
        "room_id": weak,
        "room_name": "Weak room",
    }

    # A registration written again (new tokens) that Synapse has not loaded.
    fresh = tmp_path / "not-loaded"
    fresh.mkdir()
    not_loaded = edited(
        config_path,
        fresh,
        lambda data: data["appservice"].update(registration=str(fresh / "registration.yaml")),
    )
    write_registration(load_config(not_loaded), fresh / "registration.yaml")
    report = await diagnose(str(not_loaded))
    assert [line.split(":")[0] for line in failed(report)] == ["✗ registration loaded"], failed(
        report
    )
    assert "restart Synapse" in failed(report)[0]

    # The registration's hs_token is not the one Synapse holds.
    wrong = tmp_path / "wrong-hs-token"
    wrong.mkdir()
    registration = yaml.safe_load(Path(synapse.registration_path).read_text())
    registration["hs_token"] = secrets.token_hex(16)
    (wrong / "registration.yaml").write_text(yaml.safe_dump(registration))
    wrong_token = edited(
        config_path,
        wrong,
        lambda data: data["appservice"].update(registration=str(wrong / "registration.yaml")),
    )
    report = await diagnose(str(wrong_token))
    assert [line.split(":")[0] for line in failed(report)] == ["✗ appservice ping"], failed(report)
    assert "hs_token" in failed(report)[0]

    # A staff room the bot was never invited to.
    elsewhere = await scene.staff.create_room(name="Other staff room")
    not_joined = edited(
        config_path,
        tmp_path / "not-joined",
        lambda data: data["policy"].update(staff_room=elsewhere),
    )
    report = await diagnose(str(not_joined))
    assert [line.split(":")[0] for line in failed(report)] == [f"✗ staff room {elsewhere}"], failed(
        report
    )

    # A check-in time zone that does not exist.
    no_zone = edited(
        config_path,
        tmp_path / "no-zone",
        lambda data: data.update(checkin={"at": "10:00", "timezone": "Mars/Olympus_Mons"}),
    )
    code, out, _ = await safeguard_cli("doctor", "-c", str(no_zone))
    assert code == 1, out
    assert [line for line in out.splitlines() if line.startswith("✗")] == [
        line for line in out.splitlines() if line.startswith("✗ config: checkin.timezone")
    ], out
    assert "Mars/Olympus_Mons" in out


async def test_a_config_that_cannot_be_read_is_a_failed_check(tmp_path):
    code, out, _ = await safeguard_cli("doctor", "-c", str(tmp_path / "missing.yaml"))
    assert code == 1
    assert out.startswith("✗ config: ") and "not found" in out
