"""A moderated group room with its people, and the service running beside the test Synapse."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml

from appservice.config import load_config
from appservice.service import Service
from bot.store import audit
from tests.support.synapse import appservice_delivering

T = TypeVar("T")
log = logging.getLogger(__name__)
BOT = "@safeguard:localhost"


async def until(
    probe: Callable[[], Awaitable[T] | T],
    *,
    within: float = 20.0,
    interval: float = 0.1,
    what: str = "condition",
) -> T:
    """Poll until `probe` returns something truthy; fail the test after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if loop.time() > deadline:
            # What the service was doing meanwhile, so a failure on a busy CI machine can
            # be read from its log alone (a task stuck on an await shows where).
            log.error("waiting for %s timed out; the running tasks:\n%s", what, _task_stacks())
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)


def _task_stacks(frames: int = 6) -> str:
    """Every task of the loop but the caller's, each with the innermost frames of its
    chain of awaits (what it waits on, and why)."""
    lines = []
    current = asyncio.current_task()
    for task in sorted(asyncio.all_tasks(), key=lambda t: t.get_name()):
        if task is current or task.done():
            continue
        chain = []
        awaited: Any = task.get_coro()
        while awaited is not None:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is not None:
                chain.append(frame)
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        where = " <- ".join(
            f"{frame.f_code.co_name} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})"
            for frame in reversed(chain[-frames:])
        )
        lines.append(f"  {task.get_name()}: {where or '(not started)'}")
    return "\n".join(lines)


# The operators' token for /health's detail, in every test config.
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"


def service_config(
    synapse: Any,
    directory: Path,
    *,
    database_url: str,
    staff_room: str,
    staff: list[str],
    policy: dict[str, Any] | None = None,
    checkin: dict[str, Any] | None = None,
    listen_port: int | None = None,
    homeserver_url: str | None = None,
    **sections: dict[str, Any],
) -> Path:
    """A service config for the test Synapse; `listen_port` when a proxy sits on the AS port."""
    data: dict[str, Any] = {
        "homeserver": {"url": homeserver_url or synapse.url, "domain": synapse.server_name},
        "appservice": {
            "url": f"http://127.0.0.1:{synapse.as_port}",
            "listen": {"host": "127.0.0.1", "port": listen_port or synapse.as_port},
            "registration": str(synapse.registration_path),
            "admin_token": ADMIN_TOKEN,
        },
        "database": {"url": database_url},
        "policy": {"staff_room": staff_room, "staff": staff, **(policy or {})},
        "checkin": checkin or {"after": "1h"},
        # The test users here are plain clients that read no encrypted messages; the
        # encrypted rooms are tested with real end-to-end clients (test_encryption.py).
        "encryption": {"private_rooms": False},
        **sections,
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


@asynccontextmanager
async def running_service(
    config_path: Path, *, prepare: Callable[[Service], None] = lambda service: None
) -> AsyncIterator[Service]:
    """The service in this process, started and delivered to; `prepare` sees it before it
    starts (a fault test puts its fault in place there)."""
    config = load_config(config_path)
    service = Service(config, connect_retry_seconds=0.5)
    prepare(service)
    await service.start()
    try:
        await asyncio.wait_for(service.connected.wait(), 30)
        await appservice_delivering(config.registration_path, config.homeserver.url)
        yield service
    finally:
        await service.stop()


@dataclass
class Scene:
    """owner (a v12 creator), moderator (PL 50), member (PL 0) in a group room; staff in theirs."""

    synapse: Any
    owner: Any
    moderator: Any
    member: Any
    staff: Any
    group: str
    staff_room: str
    directory: Path

    async def bot_joined(self, room: str) -> bool:
        return (await self.owner.members(room)).get(BOT) == "join"

    async def membership(self, room: str, user: Any) -> str | None:
        return (await self.owner.members(room)).get(user.user_id)

    async def bot_messages(self, viewer: Any, room: str) -> list[dict[str, Any]]:
        return [
            e
            for e in await viewer.messages(room)
            if e.get("sender") == BOT and e.get("type") == "m.room.message"
        ]

    async def staff_messages(self) -> list[str]:
        return [
            e["content"].get("body", "")
            for e in await self.bot_messages(self.staff, self.staff_room)
        ]

    async def staff_matching(self, predicate: Callable[[str], bool]) -> list[str]:
        return [text for text in await self.staff_messages() if predicate(text)]

    async def last_staff_event(self, predicate: Callable[[str], bool]) -> dict[str, Any] | None:
        """The bot's latest staff-room message whose body matches."""
        for event in reversed(await self.bot_messages(self.staff, self.staff_room)):
            if predicate(event["content"].get("body", "")):
                return event
        return None

    async def dm_room_of_member(self) -> str | None:
        """The room the bot invited the member to (or that they joined with the bot)."""
        for room in await self.member.invited_rooms():
            return room
        return None


async def build_scene(
    synapse: Any, directory: Path, *, encrypted: bool = False, staff_room: bool = True
) -> Scene:
    """With staff_room=False the test makes the staff room itself (scene.staff_room is '')."""
    owner = await synapse.new_user("owner")
    moderator = await synapse.new_user("moderator")
    member = await synapse.new_user("member")
    staff = await synapse.new_user("staff")
    staff_room = await staff.create_room(name="Staff", invite=[BOT]) if staff_room else ""
    return Scene(synapse, owner, moderator, member, staff, "", staff_room, directory)


async def open_group_room(
    scene: Scene, *, encrypted: bool = False, power: dict[str, int] | None = None
) -> str:
    """Created by `owner` (a v12 creator), with the moderator at 50 and the bot able to kick
    (and anyone in `power` at their level).

    Staff join it and invite the bot: by default only staff can put the bot in a room.
    """
    owner = scene.owner
    room = await owner.create_room(
        name="Group chat",
        preset="private_chat",
        invite=[scene.moderator.user_id, scene.member.user_id, scene.staff.user_id],
        power_levels={"users": {scene.moderator.user_id: 50, BOT: 50, **(power or {})}},
        encrypted=encrypted,
    )
    await scene.moderator.join(room)
    await scene.member.join(room)
    await scene.staff.join(room)
    await scene.staff.invite(room, BOT)
    await until(lambda: scene.bot_joined(room), what="the bot to join the group room")
    scene.group = room
    return room


async def entries(service: Service, kind: str) -> list[audit.AuditEntry]:
    """The running service's audit entries of this kind, oldest first."""
    async with service.engine.connect() as conn:
        return [e for e in await audit.entries(conn) if e.kind == kind]


async def recorded(config_path: Path, kind: str) -> bool:
    """Whether the exported audit trail holds an entry of this kind."""
    document = await export_json(config_path)
    return any(e["kind"] == kind for case in document["cases"] for e in case["entries"])


async def safeguard_cli(*args: str) -> tuple[int, str, str]:
    """Run the `safeguard` command line as operators do: a separate process."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "appservice.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


async def export_json(config_path: Path, *extra: str) -> dict[str, Any]:
    """The export, as `safeguard cases export` makes it: read in this process (tests poll
    it; a process per look is slow), or through the command line itself when given options."""
    if extra:
        return await export_via_cli(config_path, *extra)
    from appservice.database import create_engine
    from bot.cases import records

    engine = create_engine(load_config(config_path).database_url)
    try:
        async with engine.connect() as conn:
            document = await records.export(conn)
    finally:
        await engine.dispose()
    return json.loads(json.dumps(document))


async def export_via_cli(config_path: Path, *extra: str) -> dict[str, Any]:
    code, out, err = await safeguard_cli("cases", "export", "-c", str(config_path), *extra)
    assert code == 0, err
    return json.loads(out)


async def fetch(
    service: Service, path: str, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """GET one of the service's own endpoints (/health, /metrics)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{service.port}{path}", headers=headers) as response,
    ):
        return response.status, await response.text()


async def health(service: Service) -> tuple[int, dict[str, Any]]:
    """/health in detail, as an operator reads it (with the admin token)."""
    status, text = await fetch(
        service, "/health?detail=1", {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    return status, json.loads(text)


def scene_config(
    scene: Scene,
    *,
    staff: list[str] | None = None,
    staff_room: str | None = None,
    database: Path | None = None,
    **options: Any,
) -> Path:
    """The service config for a scene: its Synapse, staff room and staff, and a SQLite
    database in its directory, unless given; `options` (policy, checkin, homeserver_url,
    sections) as `service_config` takes them."""
    database = database or scene.directory / "safeguard.db"
    # No DM rooms made ahead unless the test is about them: each service start would
    # make rooms whose events Synapse pushes on after a short test has stopped the
    # service, and the session's Synapse backs off pushing to the next test's.
    options["policy"] = {"ready_dm_rooms": 0, **(options.get("policy") or {})}
    return service_config(
        scene.synapse,
        scene.directory,
        database_url=f"sqlite+aiosqlite:///{database}",
        staff_room=scene.staff_room if staff_room is None else staff_room,
        staff=[scene.staff.user_id] if staff is None else staff,
        **options,
    )
