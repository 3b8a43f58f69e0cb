"""What the service keeps, kept as privately as the machine allows: files readable by the
service's own user only, and what is deleted overwritten (never left in free pages)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from appservice.config import load_config
from appservice.database import create_engine
from tests.support.processes import run_service_process
from tests.support.scene import (
    build_scene,
    health,
    open_group_room,
    running_service,
    safeguard_cli,
    scene_config,
    until,
)

pytestmark = pytest.mark.synapse


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_database_and_the_crypto_store_are_the_services_own(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    config = scene_config(scene)
    database = tmp_path / "safeguard.db"
    database.touch(mode=0o644)  # an older install's file, more open than it should be
    database.chmod(0o644)
    process = await run_service_process(config)
    try:

        async def started() -> bool:
            store = load_config(config).crypto_store
            return store.is_dir() and any(store.glob("*.db"))

        await until(started, within=60, what="the service and its crypto store")
        assert mode(database) == 0o600, "tightened at start"
        assert mode(database.with_name("safeguard.db-wal")) == 0o600, "made private"
        store = load_config(config).crypto_store
        assert mode(store) == 0o700
        assert all(mode(file) == 0o600 for file in store.iterdir() if file.is_file())
    finally:
        process.terminate()
        await process.wait()
    engine = create_engine(load_config(config).database_url)
    try:
        async with engine.connect() as conn:
            secure = (await conn.exec_driver_sql("PRAGMA secure_delete")).scalar_one()
        assert secure == 1, "deleted content is overwritten"
        raw = engine.plain_connection()  # type: ignore[attr-defined]
        try:
            assert raw.execute("PRAGMA secure_delete").fetchone()[0] == 1, "the intake's too"
        finally:
            raw.close()
    finally:
        await engine.dispose()


async def test_a_staff_room_in_the_clear_is_warned_of(synapse, tmp_path):
    """Members' replies in their encrypted DMs are relayed to staff at once (safety first),
    so a staff room that is not encrypted copies them in the clear: never silently."""
    scene = await build_scene(synapse, tmp_path)
    config = scene_config(scene, encryption={"private_rooms": True})
    async with running_service(config) as service:

        async def warned() -> str | None:
            _status, body = await health(service)
            return body["checks"]["staff_room"].get("warning")

        warning = await until(warned, within=30, what="the warning on /health")
        assert "not encrypted" in warning and "in the clear" in warning
        code, out, _ = await safeguard_cli("check-config", "-c", str(config))
        assert code == 0 and "keep the staff room encrypted" in out


async def test_a_writers_devices_are_read_before_any_flag(synapse, tmp_path):
    """With members' DMs encrypted (the default), whoever writes in a room the bot
    moderates has their devices read as the message arrives: a flag on it later sends
    the encrypted notice without waiting for that read."""
    scene = await build_scene(synapse, tmp_path)
    config = scene_config(scene, encryption={"private_rooms": True})
    async with running_service(config) as service:
        assert service.crypto is not None
        await until(service.crypto.ready.is_set, what="the bot's device")
        await open_group_room(scene)
        olm = service.crypto.client.olm
        assert scene.member.user_id not in olm.tracked_users
        await scene.member.send_text(scene.group, "hello all")
        await until(
            lambda: scene.member.user_id in olm.tracked_users,
            what="the writer's devices read, with no flag",
        )
