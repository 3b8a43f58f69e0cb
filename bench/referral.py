"""Referral latency against a real Synapse: from the moderator's 🚨 to the DM notice and to
the kick, ours against the raw Client-Server calls.

Measured with Synapse's own clock (origin_server_ts of the reaction, the notice and the
kick), for:
  - ours:  the running service, Synapse pushing the reaction to it, at rest (its DM rooms
    made ahead all there: `policy.ready_dm_rooms`, default 2);
  - floor: the Client-Server calls a referral makes when nothing is known ahead, as fast
    as raw aiohttp makes them, as the bot, no project code: every independent call at
    once (asyncio.gather) —
      1. the flagged event, the room's create event and power levels, the staff room's,
         the bot's m.direct, together;
      2. the flagged member's membership (it needs the event's sender);
      3. createRoom, with the same body as ours (marker, alias, the member invited);
      4. the notice;
      5. the kick and the m.direct update, together —
    started the moment the reaction is accepted (its PUT answered): no push delay at
    all. It runs while the service is up (the service ignores its 👀 key), in
    alternating halves with ours, so both meet the same Synapse, busy pushing
    transactions to an appservice;
  - floor, same calls as ours: what the service itself calls on a flag, raw — the DM
    invite into a room made ahead (made, untimed, before the member is even in the
    group), the notice, then the kick and the m.direct update together; no reads. Ours
    against it is what our own code costs (Synapse's push to us included).
Six parts, one run:
  1. DMs in the clear (`encryption: {private_rooms: false}`: the floor sends in the
     clear): `--cases` of ours and as many of each floor, in alternating halves;
  2. the same with no rooms made ahead (`ready_dm_rooms: 0`): one half each;
  3. encrypted DMs (the service restarted with `private_rooms: true`): one half each;
  4. flags amid a flood: 2,000 chat messages sent through Synapse's Client-Server API by
     several users at once, with flags (ours and the floor's, alternately) in the middle;
  5. the same flood in an end-to-end encrypted group room, sent by real end-to-end clients
     (matrix-nio, their own devices), so every chat message is an encrypted event the
     service must decrypt to know it is no `!safeguard`: our 🚨→kick there against ours in
     the plain room's flood, same run (target <= 1.5x).
  6. against the bare appservice (bench/bare_appservice.py): a second appservice, a few
     lines of aiohttp registered with the same Synapse, that on its own pushed reaction
     (🛑) invites the member into a DM room made ahead and sends the notice at once, then
     kicks, keeping nothing durable: the physical limit of an appservice. Rounds
     interleaved with ours, same room, DMs in the clear and encrypted (its notice
     Megolm-encrypted too), target <= 1.1x.
The first three parts start with one untimed case of each (cold caches on both sides).
`--parts` runs some of them only (e.g. `--parts bare`).
Synapse's clock makes the figures, so the bench polls gently: polling is load on Synapse.
Usage: python bench/referral.py [--cases 20] [--flood 2000] [--parts clear,bare,...]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bare_appservice import BareAppservice
from tests.support.scene import (
    BOT,
    Scene,
    build_scene,
    open_group_room,
    running_service,
    service_config,
    until,
)
from tests.support.synapse import free_port, start_synapse

CHATTERS = 8
FLAGS_AMID_FLOOD = 6  # of each, at most: as many as fit while the flood lasts
SETTLE = 0.7  # seconds after a case, so the service's follow-up steps overlap no measurement
# What our requests carry (literals: the floor runs no project code).
ROOM_MARKER_KEY = "org.matrix.safeguard.marker"
MESSAGE_MARKER_KEY = "org.matrix.safeguard"
ALIAS_PREFIX = "_safeguard_"
NOTICE = (
    "We're worried about you.\nBecause of what you shared, we think you may be at immediate "
    "risk.\n\nFor your safety, we're moving you out of the group chat for now.\nThis is not "
    "a punishment, and you are not in trouble.\n\nIf your life is in danger right now, call "
    "999 or go to A&E.\n\n" + "• A crisis service: call 116 123 (free, any time)\n" * 5
)


def q(value: str) -> str:
    return quote(value, safe="")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


@dataclass
class Timings:
    dm: list[float] = field(default_factory=list)
    kick: list[float] = field(default_factory=list)

    def add(self, other: Timings) -> None:
        self.dm += other.dm
        self.kick += other.kick


# ---- what Synapse recorded ------------------------------------------------------------------


async def kick_ts(scene: Scene, member: str, by: str = BOT) -> int | None:
    """Origin timestamp of `by`'s kick of `member` (their membership, read cheaply)."""
    event = await scene.owner.request(
        "GET",
        f"/_matrix/client/v3/rooms/{q(scene.group)}/state/m.room.member/{q(member)}",
        format="event",
    )
    content = event.get("content") or {}
    if event.get("sender") == by and content.get("membership") == "leave":
        return event["origin_server_ts"]
    return None


async def notice_ts(user: Any) -> int | None:
    """Origin timestamp of the bot's first message to `user` (joining its invite first);
    in the clear or encrypted, it is the same event."""
    for room in await user.invited_rooms():
        await user.join(room)
    for room in await user.joined_rooms():
        for event in await user.messages(room, limit=20):
            if event.get("sender") == BOT and event["type"] in (
                "m.room.message",
                "m.room.encrypted",
            ):
                return event["origin_server_ts"]
    return None


async def event_ts(user: Any, room: str, event_id: str) -> int:
    event = await user.request("GET", f"/_matrix/client/v3/rooms/{q(room)}/event/{q(event_id)}")
    return event["origin_server_ts"]


async def new_member(scene: Scene, name: str) -> Any:
    user = await scene.synapse.new_user(name)
    await scene.owner.invite(scene.group, user.user_id)
    await user.join(scene.group)
    return user


# ---- ours ---------------------------------------------------------------------------------


async def ours_flag(scene: Scene, member: Any, said: str) -> tuple[int, int]:
    """The moderator reacts 🚨; (reaction, kick) on Synapse's clock."""
    reaction = await scene.moderator.react(scene.group, said, "🚨")
    kick = await until(
        lambda: kick_ts(scene, member.user_id), within=60, interval=0.2, what="the kick"
    )
    return await event_ts(scene.moderator, scene.group, reaction), kick


async def at_rest(service: Any) -> None:
    """As a flag usually finds the service: every DM room it keeps made ahead is there
    (one is made two seconds after one is taken), and the making of it has settled."""
    pool = service.ready_rooms
    if pool.ready < pool.wanted:
        await until(lambda: pool.ready >= pool.wanted, within=30, interval=0.05, what="rooms")
        await asyncio.sleep(0.3)


async def measure_ours(scene: Scene, service: Any, cases: int, tag: str) -> Timings:
    timings = Timings()
    for number in range(cases):
        member = await new_member(scene, f"ours-{tag}{number}")
        said = await member.send_text(scene.group, "I don't feel safe")
        await at_rest(service)
        reacted, kick = await ours_flag(scene, member, said)
        dm = await until(
            lambda member=member: notice_ts(member), within=30, interval=0.25, what="the DM"
        )
        timings.kick.append(kick - reacted)
        timings.dm.append(dm - reacted)
        await asyncio.sleep(SETTLE)
    return timings


# ---- the floor ------------------------------------------------------------------------------


class Floor:
    """The referral's Client-Server calls from raw aiohttp, as the bot, none waiting for
    another it does not need."""

    def __init__(self, scene: Scene, http: aiohttp.ClientSession) -> None:
        self._scene = scene
        self._http = http
        self._direct: dict[str, Any] | None = None  # m.direct, once read (untimed)

    async def request(
        self, method: str, path: str, body: Any = None, *, missing: Any = None
    ) -> Any:
        """The answer's JSON; `missing` when given and the homeserver has none (404)."""
        separator = "&" if "?" in path else "?"
        url = f"{self._scene.synapse.url}{path}{separator}user_id={q(BOT)}"
        async with self._http.request(method, url, json=body) as response:
            answer = await response.json(content_type=None)
            if response.status == 404 and missing is not None:
                return missing
            assert response.status == 200, (path, response.status, answer)
            return answer

    async def referral(self, flagged: str) -> tuple[str, str]:
        """From the flagged event's id to the kick; returns (DM room, notice event id)."""
        group, staff = q(self._scene.group), q(self._scene.staff_room)
        rooms = "/_matrix/client/v3/rooms"
        direct = f"/_matrix/client/v3/user/{q(BOT)}/account_data/m.direct"
        event, *_, m_direct = await asyncio.gather(
            self.request("GET", f"{rooms}/{group}/event/{q(flagged)}"),
            self.request("GET", f"{rooms}/{group}/state/m.room.create/?format=event"),
            self.request("GET", f"{rooms}/{group}/state/m.room.power_levels/"),
            self.request("GET", f"{rooms}/{staff}/state/m.room.create/?format=event"),
            self.request("GET", f"{rooms}/{staff}/state/m.room.power_levels/"),
            self.request("GET", direct, missing={}),
        )
        member = event["sender"]
        await self.request("GET", f"{rooms}/{group}/state/m.room.member/{q(member)}?format=event")
        marker = uuid.uuid4().hex
        created = await self.request(
            "POST",
            "/_matrix/client/v3/createRoom",
            {
                "visibility": "private",
                "preset": "private_chat",
                "invite": [member],
                "is_direct": True,
                "creation_content": {ROOM_MARKER_KEY: marker},
                "room_alias_name": f"{ALIAS_PREFIX}{marker}",
                "initial_state": [
                    {"type": "m.room.canonical_alias", "state_key": "", "content": {}}
                ],
            },
        )
        dm = created["room_id"]
        notice = await self.send_notice(dm)
        await asyncio.gather(
            self.request(
                "POST",
                f"{rooms}/{group}/kick",
                {"user_id": member, "reason": "Removed by a moderator"},
            ),
            # Behind the service's back (it keeps the m.direct it wrote): harmless here,
            # every flagged member is new, so neither side needs the other's entries.
            self.request("PUT", direct, m_direct | {member: [dm]}),
        )
        return dm, notice

    async def make_room(self) -> str:
        """Untimed, ahead of any flag: a room as the service makes them ahead (no one
        invited), and the bot's m.direct read once, as the service keeps it."""
        if self._direct is None:
            direct = f"/_matrix/client/v3/user/{q(BOT)}/account_data/m.direct"
            self._direct = await self.request("GET", direct, missing={})
        marker = f"ready:{uuid.uuid4().hex}"
        created = await self.request(
            "POST",
            "/_matrix/client/v3/createRoom",
            {
                "visibility": "private",
                "preset": "private_chat",
                "invite": [],
                "is_direct": False,
                "creation_content": {ROOM_MARKER_KEY: marker},
                "room_alias_name": f"{ALIAS_PREFIX}{uuid.uuid4().hex}",
                "initial_state": [
                    {"type": "m.room.canonical_alias", "state_key": "", "content": {}}
                ],
            },
        )
        return created["room_id"]

    async def referral_into(self, room: str, member: str) -> tuple[str, str]:
        """The service's own calls on a flag, raw: the DM invite into a room made ahead,
        the notice, then the kick and the m.direct update together."""
        rooms, group = "/_matrix/client/v3/rooms", q(self._scene.group)
        await self.request(
            "PUT",
            f"{rooms}/{q(room)}/state/m.room.member/{q(member)}",
            {"membership": "invite", "is_direct": True},
        )
        sent = await self.send_notice(room)
        assert self._direct is not None
        self._direct = self._direct | {member: [room]}
        await asyncio.gather(
            self.request(
                "POST",
                f"{rooms}/{group}/kick",
                {"user_id": member, "reason": "Removed by a moderator"},
            ),
            self.request(
                "PUT", f"/_matrix/client/v3/user/{q(BOT)}/account_data/m.direct", self._direct
            ),
        )
        return room, sent

    async def send_notice(self, room: str) -> str:
        marker = uuid.uuid4().hex
        sent = await self.request(
            "PUT",
            f"/_matrix/client/v3/rooms/{q(room)}/send/m.room.message/{marker}",
            {
                "msgtype": "m.text",
                "body": NOTICE,
                "format": "org.matrix.custom.html",
                "formatted_body": NOTICE.replace("\n", "<br>"),
                MESSAGE_MARKER_KEY: {"marker": marker},
            },
        )
        return sent["event_id"]

    async def flag(self, member: Any, said: str, room: str | None = None) -> tuple[int, int, int]:
        """The moderator reacts 👀 (ignored by the service); the floor acts the moment the
        reaction is accepted — into `room` if one was made ahead, with the service's own
        calls. (reaction, notice, kick) on Synapse's clock."""
        scene = self._scene
        reaction = await scene.moderator.react(scene.group, said, "👀")
        if room is not None:
            dm, notice = await self.referral_into(room, member.user_id)
        else:
            dm, notice = await self.referral(said)
        kick = await kick_ts(scene, member.user_id)
        assert kick is not None, "the floor's kick"
        return (
            await event_ts(scene.moderator, scene.group, reaction),
            await event_ts(self, dm, notice),
            kick,
        )


async def measure_floor(
    floor: Floor, scene: Scene, cases: int, tag: str, *, ahead: bool = False
) -> Timings:
    """The floor's cases; `ahead`: with the service's own calls, into a room made ahead."""
    timings = Timings()
    for number in range(cases):
        room = await floor.make_room() if ahead else None
        member = await new_member(scene, f"floor-{tag}{number}")
        said = await member.send_text(scene.group, "I don't feel safe")
        reacted, notice, kick = await floor.flag(member, said, room)
        timings.kick.append(kick - reacted)
        timings.dm.append(notice - reacted)
        await asyncio.sleep(SETTLE)
    return timings


async def alternating(
    scene: Scene, service: Any, floor: Floor, cases: int, halves: int, tag: str, *, same: bool
) -> tuple[Timings, Timings, Timings]:
    """One untimed case of each, then `halves` halves of each, ours first: (ours, the
    floor, the floor with the same calls as ours — empty unless `same`)."""
    await measure_ours(scene, service, 1, f"{tag}warm")
    await measure_floor(floor, scene, 1, f"{tag}warm")
    ours, raw, raw_same = Timings(), Timings(), Timings()
    for half in range(halves):
        ours.add(await measure_ours(scene, service, cases, f"{tag}{half}-"))
        raw.add(await measure_floor(floor, scene, cases, f"{tag}{half}-"))
        if same:
            raw_same.add(await measure_floor(floor, scene, cases, f"{tag}{half}a-", ahead=True))
    return ours, raw, raw_same


# ---- the bare appservice --------------------------------------------------------------------


BARE_KEY = "🛑"  # the bare appservice's flag (the service ignores it)


def notice_content() -> dict[str, Any]:
    """The notice as the floors send it: ours' text and marker, no project code."""
    return {
        "msgtype": "m.text",
        "body": NOTICE,
        "format": "org.matrix.custom.html",
        "formatted_body": NOTICE.replace("\n", "<br>"),
        MESSAGE_MARKER_KEY: {"marker": uuid.uuid4().hex},
    }


async def bare_flag(scene: Scene, bare: BareAppservice, tag: str, *, encrypted: bool) -> Timings:
    """One flag the bare appservice answers, into a DM room it made ahead (untimed)."""
    await bare.make_room(encrypted=encrypted)
    member = await new_member(scene, f"bare-{tag}")
    said = await member.send_text(scene.group, "I don't feel safe")
    done = bare.expect(member.user_id)
    reaction = await scene.moderator.react(scene.group, said, BARE_KEY)
    referred = await asyncio.wait_for(done, 30)
    bare.reads += referred.read_sender
    kick = await kick_ts(scene, member.user_id, by=bare.user_id)
    assert kick is not None, "the bare appservice's kick"
    reacted = await event_ts(scene.moderator, scene.group, reaction)
    notice = await event_ts(bare, referred.room, referred.notice)
    await asyncio.sleep(SETTLE)
    return Timings(dm=[notice - reacted], kick=[kick - reacted])


async def against_bare(
    scene: Scene, service: Any, bare: BareAppservice, cases: int, tag: str, *, encrypted: bool
) -> tuple[Timings, Timings]:
    """Rounds interleaved, one of ours then one of the bare appservice's, in the group
    room, after one untimed round: (ours, the bare appservice's). The bare bot is in the
    room only meanwhile (Synapse pushes it the room's events only then)."""
    await scene.owner.set_power_level(scene.group, bare.user_id, 50)
    await scene.owner.invite(scene.group, bare.user_id)
    await bare.join(scene.group)
    ours, floor = Timings(), Timings()
    for number in range(cases + 1):
        mine = await measure_ours(scene, service, 1, f"{tag}{number}-")
        theirs = await bare_flag(scene, bare, f"{tag}{number}", encrypted=encrypted)
        if number:
            ours.add(mine)
            floor.add(theirs)
    await bare.request("POST", f"/_matrix/client/v3/rooms/{q(scene.group)}/leave", {})
    return ours, floor


# ---- a flag amid a flood --------------------------------------------------------------------


@dataclass
class Flood:
    messages: int
    seconds: float
    ours: list[float]
    floor: list[float]


async def flags_amid_flood(scene: Scene, floor: Floor, messages: int) -> Flood:
    """`messages` chat messages from CHATTERS users at once, through Synapse; flags, ours
    and the floor's alternately, while it lasts (only those whose reaction it surrounds)."""
    chatters = [await new_member(scene, f"chatty{n}") for n in range(CHATTERS)]
    flagged = [await new_member(scene, f"flood{n}") for n in range(2 * FLAGS_AMID_FLOOD)]
    said = [await user.send_text(scene.group, "I can't cope any more") for user in flagged]
    sent = 0

    async def chat(user: Any, count: int) -> None:
        nonlocal sent
        for number in range(count):
            await user.send_text(scene.group, f"lol same {number} " * 5)
            sent += 1

    share, extra = divmod(messages, CHATTERS)
    started = time.perf_counter()
    flood = asyncio.gather(*(chat(user, share + (n < extra)) for n, user in enumerate(chatters)))
    ours: list[float] = []
    raw: list[float] = []
    await until(lambda: sent >= messages // 10, within=60, interval=0.01, what="the flood")
    for number in range(FLAGS_AMID_FLOOD):
        for side in ("ours", "floor"):
            if flood.done():
                break
            index = 2 * number + (side == "floor")
            member, message = flagged[index], said[index]
            if side == "ours":
                reacted, kick = await ours_flag(scene, member, message)
                ours.append(kick - reacted)
            else:
                reacted, _notice, kick = await floor.flag(member, message)
                raw.append(kick - reacted)
    await flood
    return Flood(sent, time.perf_counter() - started, ours, raw)


def encrypted_chatter_process(
    hs_url: str,
    room: str,
    accounts: list[tuple[str, str]],
    messages: int,
    stores: str,
    sent: Any,
    joined: Any,
) -> None:
    """The encrypted flood's clients, in a process of their own: their encryption work must
    not share the event loop of the service being measured (as 8 phones would not)."""
    import logging

    logging.getLogger("nio").setLevel(logging.ERROR)  # each new device, logged once per send

    async def flood() -> None:
        from tests.support.e2e_user import E2EUser

        users = [
            E2EUser(hs_url, user_id, password, Path(stores) / user_id)
            for user_id, password in accounts
        ]
        try:
            for user in users:
                await user.start()
                await user.join(room)
            joined.set()

            async def chat(user: Any, count: int) -> None:
                for number in range(count):
                    for _ in range(3):
                        try:
                            await user.send_text(room, f"lol same {number} " * 5)
                            break
                        except KeyError:
                            # nio's own race: the room's members changed (a kick) while it
                            # shared the session; the next try makes a new one.
                            continue
                    with sent.get_lock():
                        sent.value += 1

            share, extra = divmod(messages, len(users))
            await asyncio.gather(*(chat(user, share + (n < extra)) for n, user in enumerate(users)))
        finally:
            for user in users:
                await user.close()

    asyncio.run(flood())


async def flags_amid_encrypted_flood(scene: Scene, messages: int, work: Path) -> Flood:
    """The flood in an encrypted group room, from end-to-end clients (in a process of their
    own); ours flag amid it (the floor has no encrypted counterpart: ours in the plain
    room's flood is the comparison). The moderator's 🚨 is a reaction, in the clear as
    Element sends them."""
    import multiprocessing

    from appservice.synapse_local import register_user

    room = await scene.owner.create_room(
        name="Encrypted group chat",
        preset="private_chat",
        invite=[scene.moderator.user_id, scene.staff.user_id],
        power_levels={"users": {scene.moderator.user_id: 50, BOT: 50}},
        encrypted=True,
    )
    await scene.moderator.join(room)
    await scene.staff.join(room)
    await scene.staff.invite(room, BOT)
    encrypted = replace(scene, group=room)
    await until(lambda: encrypted.bot_joined(room), within=30, what="the bot in the room")
    accounts = []
    for n in range(CHATTERS):
        password = uuid.uuid4().hex
        user_id, _ = await register_user(
            scene.synapse.url,
            scene.synapse.shared_secret,
            f"e2e-chatty{n}-{password[:6]}",
            password,
        )
        await scene.owner.invite(room, user_id)
        accounts.append((user_id, password))
    flagged = [await new_member(encrypted, f"eflood{n}") for n in range(FLAGS_AMID_FLOOD)]
    said = [await user.send_text(room, "I can't cope any more") for user in flagged]
    context = multiprocessing.get_context("spawn")
    sent, joined = context.Value("i", 0), context.Event()
    chatters = context.Process(
        target=encrypted_chatter_process,
        args=(scene.synapse.url, room, accounts, messages, str(work / "stores"), sent, joined),
    )
    chatters.start()
    try:
        await until(joined.is_set, within=120, interval=0.2, what="the chatters in the room")
        started = time.perf_counter()
        ours: list[float] = []
        await until(
            lambda: sent.value >= messages // 10, within=120, interval=0.01, what="the flood"
        )
        for member, message in zip(flagged, said, strict=True):
            if not chatters.is_alive():
                break
            reacted, kick = await ours_flag(encrypted, member, message)
            ours.append(kick - reacted)
        await asyncio.to_thread(chatters.join)
        return Flood(sent.value, time.perf_counter() - started, ours, [])
    finally:
        if chatters.is_alive():
            chatters.kill()


# ---- the run ------------------------------------------------------------------------------


def row(label: str, values: list[float], *against: tuple[str, list[float], float]) -> None:
    """p50 and p95, and the p50's ratio to each (name, floor, target: 0 for none) given."""
    line = f"{label:40} {statistics.median(values):>6.0f} {percentile(values, 0.95):>6.0f}"
    for name, floor, target in against:
        ratio = statistics.median(values) / max(statistics.median(floor), 1)
        line += f"   {ratio:.2f}x {name}"
        if target:
            line += f" (target <= {target:.2f}: {'OK' if ratio <= target else 'ABOVE'})"
    print(line)


PARTS = ("clear", "none", "encrypted", "flood", "bare")


async def run(cases: int, flood_messages: int, parts: set[str]) -> None:
    work = Path(tempfile.mkdtemp(prefix="safeguard-bench-referral-"))
    bare = BareAppservice(
        homeserver="",
        server_name="localhost",
        port=free_port(),
        moderator="",
        key=BARE_KEY,
        notice=notice_content(),
    )
    bare_registration = work / "bare-registration.yaml"
    bare_registration.parent.mkdir(parents=True, exist_ok=True)
    bare_registration.write_text(yaml.safe_dump(bare.registration()))
    await bare.start()  # before Synapse: it must never find the bare appservice down
    synapse = await start_synapse(work / "synapse", other_registrations=[bare_registration])
    half = max(1, cases // 2)
    clear = none_ahead = encrypted = bare_clear = bare_encrypted = None
    flood = encrypted_flood = None

    def config(private_rooms: bool, ready: int = 2) -> Path:
        return service_config(
            synapse,
            work,
            database_url=f"sqlite+aiosqlite:///{work / 'bench.db'}",
            staff_room=scene.staff_room,
            staff=[scene.staff.user_id],
            policy={"room_notice": False, "ready_dm_rooms": ready},
            encryption={"private_rooms": private_rooms},
        )

    try:
        scene = await build_scene(synapse, work)
        bare.homeserver, bare.moderator = synapse.url, scene.moderator.user_id
        as_token = yaml.safe_load(synapse.registration_path.read_text())["as_token"]
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {as_token}"}) as http:
            floor = Floor(scene, http)
            async with running_service(config(private_rooms=False)) as service:
                await open_group_room(scene)
                await scene.owner.set_power_level(scene.group, scene.moderator.user_id, 50)
                if "clear" in parts:
                    clear = await alternating(scene, service, floor, half, 2, "c", same=True)
                if "bare" in parts:
                    bare_clear = await against_bare(
                        scene, service, bare, cases, "bc", encrypted=False
                    )
                if "flood" in parts:
                    flood = await flags_amid_flood(scene, floor, flood_messages)
                    encrypted_flood = await flags_amid_encrypted_flood(scene, flood_messages, work)
            if "none" in parts:
                async with running_service(config(private_rooms=False, ready=0)) as service:
                    none_ahead = await alternating(scene, service, floor, half, 1, "n", same=False)
            if parts & {"encrypted", "bare"}:
                async with running_service(config(private_rooms=True)) as service:
                    if "encrypted" in parts:
                        encrypted = await alternating(
                            scene, service, floor, half, 1, "e", same=False
                        )
                    if "bare" in parts:
                        bare_encrypted = await against_bare(
                            scene, service, bare, cases, "be", encrypted=True
                        )
    finally:
        await synapse.close()
        await bare.close()

    title = "referral benchmark against a real Synapse (ms, Synapse's clock)"
    print(f"{title:72} {'p50':>6} {'p95':>6}")
    targets = {"dm": 0.85, "kick": 1.0}
    parts_run = (
        ("DMs in the clear (private_rooms: false)", clear, targets),
        ("no DM rooms made ahead (ready_dm_rooms: 0)", none_ahead, {}),
        ("encrypted DMs (private_rooms: true; the floor's in the clear)", encrypted, {}),
    )
    for title, measured, part_targets in parts_run:
        if measured is None:
            continue
        ours, raw, same = measured
        print(f"{title}, {len(ours.kick)} cases each:")
        for what, label in (("dm", "🚨→DM notice"), ("kick", "🚨→kick")):
            mine, floor, floor_same = (getattr(t, what) for t in (ours, raw, same))
            row(f"  floor: {label}", floor)
            against = [("floor", floor, part_targets.get(what, 0.0))]
            if floor_same:
                row(f"  floor, same calls as ours: {label}", floor_same)
                against.append(("same calls", floor_same, 0.0))
            row(f"  ours:  {label}", mine, *against)
    bare_parts = (
        ("DMs in the clear", bare_clear),
        ("encrypted DMs (the bare one's Megolm-encrypted too)", bare_encrypted),
    )
    for title, measured in bare_parts:
        if measured is None:
            continue
        ours, theirs = measured
        print(
            f"against the bare appservice, {title}, {len(ours.kick)} rounds each, interleaved "
            f"(it read the flagged event {bare.reads} times in all, else it knew the sender "
            "from the push):"
        )
        for what, label in (("dm", "🚨→DM notice"), ("kick", "🚨→kick")):
            row(f"  bare appservice: {label}", getattr(theirs, what))
            row(
                f"  ours:            {label}",
                getattr(ours, what),
                ("bare", getattr(theirs, what), 1.1),
            )
    if flood is not None:
        print_floods(flood, encrypted_flood)


def print_floods(flood: Flood, encrypted_flood: Flood) -> None:
    rate = flood.messages / flood.seconds
    print(
        f"flags amid a flood: {flood.messages:,} messages from {CHATTERS} users through "
        f"Synapse in {flood.seconds:.1f} s ({rate:.0f}/s); "
        f"{len(flood.ours)} of ours, {len(flood.floor)} of the floor's inside it:"
    )
    if flood.ours and flood.floor:
        row("  floor: 🚨→kick", flood.floor)
        row("  ours:  🚨→kick", flood.ours, ("floor", flood.floor, 1.5))
    rate = encrypted_flood.messages / encrypted_flood.seconds
    print(
        f"flags amid an encrypted flood: {encrypted_flood.messages:,} encrypted messages from "
        f"{CHATTERS} end-to-end clients in {encrypted_flood.seconds:.1f} s ({rate:.0f}/s); "
        f"{len(encrypted_flood.ours)} of ours inside it:"
    )
    if encrypted_flood.ours and flood.ours:
        row("  ours, plain room's flood: 🚨→kick", flood.ours)
        row(
            "  ours, encrypted room: 🚨→kick",
            encrypted_flood.ours,
            ("ours in the plain flood", flood.ours, 1.5),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20, help="of ours (and of each floor's)")
    parser.add_argument("--flood", type=int, default=2000, help="chat messages in the flood")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"which parts, comma-separated (default all: {','.join(PARTS)})",
    )
    arguments = parser.parse_args()
    parts = set(arguments.parts.split(","))
    if unknown := parts - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    asyncio.run(run(arguments.cases, arguments.flood, parts))


if __name__ == "__main__":
    main()
