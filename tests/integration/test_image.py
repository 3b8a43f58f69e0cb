"""The OCI image (deploy/Containerfile), built with deploy/build-image.sh --debootstrap and
run with `buildah run --isolation chroot` (podman cannot run containers here): the first
start writes the config, the second the registration, the third runs the service and
answers /live, against the test Synapse.

Slow (it builds an image from Debian's packages): `make test-image`, a step of its own in
.ci/run after the main suite; skipped where buildah or debootstrap is not installed."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.support.scene import until

pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(
        shutil.which("buildah") is None or shutil.which("debootstrap") is None,
        reason="buildah and debootstrap are needed to build the image",
    ),
]
ROOT = Path(__file__).resolve().parents[2]
TAG = "localhost/matrix-safeguard:latest"
UID = 1337  # the image's `safeguard` user


@pytest.fixture(scope="module")
def image() -> str:
    subprocess.run([str(ROOT / "deploy" / "build-image.sh"), "--debootstrap"], cwd=ROOT, check=True)
    return TAG


@pytest.fixture
def container(image: str):
    name = f"safeguard-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["buildah", "from", "--name", name, image], check=True, capture_output=True)
    # buildah run (1.28) mounts the image's own VOLUME /data over a -v bind of the same
    # path, so the test's folder would go unseen; podman and docker bind over it as asked.
    subprocess.run(["buildah", "config", "--volume", "/data-", name], check=True)
    yield name
    subprocess.run(["buildah", "rm", name], capture_output=True)


def in_container(container: str, data: Path, *command: str) -> list[str]:
    return [
        "buildah",
        "run",
        "--isolation",
        "chroot",
        "-v",
        f"{data}:/data",
        container,
        "--",
        *command,
    ]


def start(container: str, data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        in_container(container, data, "safeguard", "start", "-c", "/data/config.yaml"),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_image_is_what_the_issue_asks(image, container):
    inspected = subprocess.run(
        ["buildah", "inspect", "--type", "image", image], check=True, capture_output=True, text=True
    )
    config = json.loads(inspected.stdout)["Docker"]["config"]
    assert config["User"] == "safeguard"
    assert "/data" in config["Volumes"]
    assert "29333/tcp" in config["ExposedPorts"]
    assert "/live" in " ".join(config["Healthcheck"]["Test"])
    for flag in ("-u", "-g"):
        ids = subprocess.run(
            ["buildah", "run", "--isolation", "chroot", container, "--", "id", flag, "safeguard"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert ids.stdout.strip() == str(UID), f"id {flag}"


async def test_first_start_second_start_then_it_runs(synapse, container, tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    os.chown(data, UID, UID)

    first = await asyncio.to_thread(start, container, data)
    assert first.returncode == 0, first.stderr
    assert "wrote /data/config.yaml" in first.stdout
    assert (data / "config.yaml").exists()

    # The operator edits it: this Synapse, its staff room, the port Synapse pushes to.
    config = yaml.safe_load((data / "config.yaml").read_text())
    config["homeserver"] = {"url": synapse.url, "domain": synapse.server_name}
    config["appservice"]["url"] = f"http://127.0.0.1:{synapse.as_port}"
    config["appservice"]["listen"] = {"host": "127.0.0.1", "port": synapse.as_port}
    config["policy"]["staff_room"] = "!not-yet:localhost"
    config["policy"]["ready_dm_rooms"] = 0
    (data / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))

    second = await asyncio.to_thread(start, container, data)
    assert second.returncode == 0, second.stderr
    assert "add it to Synapse's app_service_config_files" in second.stdout
    written = yaml.safe_load((data / "registration.yaml").read_text())
    assert written["url"] == f"http://127.0.0.1:{synapse.as_port}"

    # Synapse has the test session's registration loaded: the service runs with that one.
    shutil.copy(synapse.registration_path, data / "registration.yaml")
    os.chown(data / "registration.yaml", UID, UID)
    process = await asyncio.create_subprocess_exec(
        *in_container(container, data, "safeguard", "start", "-c", "/data/config.yaml"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        async def live() -> bool:
            if process.returncode is not None:
                output = await process.stdout.read()
                raise AssertionError(f"the service stopped: {output.decode()}")
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"http://127.0.0.1:{synapse.as_port}/live") as response,
                ):
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await until(live, within=90, interval=0.5, what="the image's service to answer /live")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
