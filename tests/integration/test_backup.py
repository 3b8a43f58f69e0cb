"""`safeguard backup` and `safeguard restore` on a deployment with encryption on (the
default): back up while a case is open, lose everything, restore, start — the same
device, the case finishes, the audit chain verifies, old encrypted messages decrypt."""

from __future__ import annotations

import datetime as dt
import json
import shutil

import pytest

from appservice.config import load_config
from appservice.database import create_engine, upgrade
from appservice.digest_key import digest_key_path
from bot.store import pins
from tests.support.databases import BACKENDS, fresh_database, offline_config
from tests.support.e2e_scene import config_for, encrypted_scene, open_encrypted_group, staff_alerts
from tests.support.scene import BOT, export_json, running_service, safeguard_cli, until

CHECKIN = {"after": "40s"}  # due after the restore: the open case finishes on the restored data


async def test_backup_wipe_restore_start_finishes_every_case(synapse, tmp_path):
    scene = await encrypted_scene(synapse, tmp_path)
    live = tmp_path / "live"
    live.mkdir()
    config_path = config_for(scene, live, checkin=CHECKIN)
    config = load_config(config_path)
    backups = tmp_path / "backups"
    try:
        async with running_service(config_path) as service:
            assert service.crypto is not None
            await until(service.crypto.ready.is_set, within=60, what="the bot's device")
            device = service.crypto.client.device_id
            await open_encrypted_group(scene)
            said = await scene.member.send_text(scene.group, "nobody would notice if I was gone")
            await scene.moderator.react(scene.group, said, "🚨")
            await until(lambda: staff_alerts(scene, 1), within=30, what="the alert")
            # An encrypted message in the staff room the bot read (its key is in the store).
            asked = await scene.staff.send_text(scene.staff_room, "!case list")
            await until(
                lambda: [t for t in scene.staff.texts_in(scene.staff_room, BOT) if "Cases (" in t],
                what="the reply to !case list",
            )
            (case,) = (await export_json(config_path))["cases"]
            assert case["steps"]["checkin"] != "done", "the check-in is still to come"

            # Online: the service keeps running while it is copied.
            code, out, err = await safeguard_cli(
                "backup", str(backups / "one"), "-c", str(config_path)
            )
            assert code == 0, err
            # The service's data cannot be restored over while it runs.
            code, _, err = await safeguard_cli(
                "restore", str(backups / "one"), "-c", str(config_path)
            )
            assert code == 1 and "stop the service first" in err, err

        manifest = json.loads((backups / "one" / "manifest.json").read_text())
        kinds = {entry["what"] for entry in manifest["files"].values()}
        assert kinds == {"database", "crypto store", "digest key", "config", "registration"}

        # A damaged copy is refused before anything is touched.
        damaged = backups / "damaged"
        shutil.copytree(backups / "one", damaged)
        key_copy = damaged / "digest.key"
        key_copy.write_text(key_copy.read_text()[::-1])
        code, _, err = await safeguard_cli("restore", str(damaged), "-c", str(config_path))
        assert code == 1 and "digest.key does not match the manifest" in err, err
        assert config.sqlite_path.exists(), "nothing touched"

        # Everything lost.
        config.sqlite_path.unlink()
        for journal in config.sqlite_path.parent.glob(config.sqlite_path.name + "-*"):
            journal.unlink()
        shutil.rmtree(config.crypto_store)
        digest_key_path(config).unlink()

        code, out, err = await safeguard_cli(
            "restore", str(backups / "one"), "-c", str(config_path)
        )
        assert code == 0, err
        code, out, _ = await safeguard_cli("audit", "verify", "-c", str(config_path))
        assert code == 0, out

        async with running_service(config_path) as service:
            assert service.crypto is not None
            await until(service.crypto.ready.is_set, within=60, what="the bot's device again")
            assert service.crypto.client.device_id == device, "the same device, not a new one"
            # The staff's message from before the backup still decrypts for the bot.
            old = await scene.staff.encrypted_event(scene.staff_room, asked)
            decrypted = service.crypto.decrypt(old.source | {"room_id": scene.staff_room})
            assert decrypted is not None and decrypted["content"]["body"] == "!case list"
            # The open case finishes: its check-in opens, encrypted, once.
            invites = await until(
                lambda: [r for r in scene.member.client.invited_rooms if r != scene.group],
                within=90,
                what="the check-in invite after the restore",
            )

            async def checked_in() -> bool:
                (case,) = (await export_json(config_path))["cases"]
                return case["steps"]["checkin"] == "done"

            # After a restore the device first mends the Olm sessions that moved on since
            # the backup (its peers' messages to it meanwhile cannot be read): under load
            # (the suite on two cores) that has taken more than 30 s once.
            await until(checked_in, within=60, what="the check-in recorded")
            assert len(invites) >= 1
        code, out, _ = await safeguard_cli("audit", "verify", "-c", str(config_path))
        assert code == 0, out
    finally:
        await scene.close()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_backup_restores_the_database_it_was_taken_from(backend, tmp_path):
    """Each backend's own copy (SQLite's backup API, pg_dump): what was recorded at the
    backup is there after a restore, what came after is gone, and the part replaced on
    SQLite is kept aside, not deleted."""
    async with fresh_database(backend, tmp_path) as url:
        config_path = offline_config(tmp_path, url)
        config = load_config(config_path)
        engine = create_engine(config.database_url)
        try:
            await upgrade(engine)
            async with engine.begin() as conn:
                await pins.put(conn, "kept", "before the backup", "test", dt.datetime.now(dt.UTC))
            code, _, err = await safeguard_cli(
                "backup", str(tmp_path / "b"), "-c", str(config_path)
            )
            assert code == 0, err
            async with engine.begin() as conn:
                await pins.put(conn, "kept", "after the backup", "test", dt.datetime.now(dt.UTC))
            await engine.dispose()
            code, out, err = await safeguard_cli(
                "restore", str(tmp_path / "b"), "-c", str(config_path)
            )
            assert code == 0, err
            async with engine.connect() as conn:
                pin = await pins.get(conn, "kept")
            assert pin is not None and pin.value == "before the backup"
            if backend == "sqlite":
                assert "moved the database that was there to" in out
        finally:
            await engine.dispose()
