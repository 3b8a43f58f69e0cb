"""`safeguard doctor`: a preflight an operator runs after setup and after every change.

Each check says what it found, one line, `✓`, `⚠` or `✗`, with what to do when it is
not well. It asks what the running service would need, the way the service asks it:
the homeserver with the as_token (so a registration Synapse has not loaded fails
here), Synapse's appservice ping (so Synapse's own hs_token and the URL it calls are
proved, against the running service or, when none listens, against a listener of the
doctor's own on the configured port), the database (without creating or migrating
it), the crypto store against the device the homeserver holds, and every room the
service relies on: the staff room and each room it moderates, read fresh, named by
id and name. Checks that do not depend on each other run at once, so twenty rooms
take about as long as one.

Exit status: 0 when nothing failed (warnings alone leave it 0), 1 when a check failed,
2 when the doctor itself could not run.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp
from aiohttp import web

from appservice.config import Community, Config, check_runnable, load_config
from appservice.errors import ConfigError
from appservice.registration import Registration, load_registration
from bot.moderation.authorization import event_level, moderation_level, power_level, room_powers
from bot.moderation.room_state import Snapshot, snapshot
from bot.rooms.staff_room import not_staffs_room

Status = Literal["ok", "warn", "fail"]
MARKS: dict[Status, str] = {"ok": "✓", "warn": "⚠", "fail": "✗"}
# One request to the homeserver, the service or the webhook waits at most this long.
REQUEST_SECONDS = 5.0
# Rooms read at once: twenty rooms well under the doctor's 5 s, Synapse not flooded.
ROOMS_AT_ONCE = 10
# Synapse's ping, again after a failed connection (one it had kept may be stale).
PING_ATTEMPTS = 3


@dataclass(frozen=True)
class Finding:
    status: Status
    check: str
    message: str
    fix: str | None = None
    room_id: str | None = None
    room_name: str | None = None

    def line(self) -> str:
        where = ""
        if self.room_id is not None:
            where = f" {self.room_id}" + (f" ({self.room_name})" if self.room_name else "")
        text = f"{MARKS[self.status]} {self.check}{where}: {self.message}"
        return f"{text} — {self.fix}" if self.fix else text


def ok(check: str, message: str, **room: Any) -> Finding:
    return Finding("ok", check, message, **room)


def warn(check: str, message: str, fix: str | None = None, **room: Any) -> Finding:
    return Finding("warn", check, message, fix, **room)


def fail(check: str, message: str, fix: str | None = None, **room: Any) -> Finding:
    return Finding("fail", check, message, fix, **room)


@dataclass
class Report:
    findings: list[Finding]

    @property
    def failed(self) -> bool:
        return any(f.status == "fail" for f in self.findings)

    def text(self) -> str:
        failures = sum(f.status == "fail" for f in self.findings)
        warnings = sum(f.status == "warn" for f in self.findings)
        lines = [f.line() for f in self.findings]
        lines.append(
            f"{failures} failed, {warnings} warning(s), "
            f"{len(self.findings) - failures - warnings} ok"
        )
        return "\n".join(lines)

    def json(self) -> str:
        return json.dumps(
            {
                "ok": not self.failed,
                "checks": [
                    {k: v for k, v in asdict(f).items() if v is not None} for f in self.findings
                ],
            },
            ensure_ascii=False,
            indent=2,
        )


# ---- the homeserver, as the bot ----------------------------------------------------------


class Homeserver:
    """The few Client-Server calls the doctor makes, as the bot, through the as_token."""

    def __init__(self, session: aiohttp.ClientSession, url: str, token: str, bot: str) -> None:
        self._session = session
        self._url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._bot = bot

    async def call(
        self, method: str, path: str, body: Any = None, *, as_bot: bool = True, authed: bool = True
    ) -> tuple[int, Any]:
        params = {"user_id": self._bot} if as_bot else {}
        headers = self._headers if authed else {}
        async with self._session.request(
            method, self._url + path, params=params, json=body, headers=headers
        ) as response:
            try:
                answer = await response.json(content_type=None)
            except (json.JSONDecodeError, aiohttp.ContentTypeError):
                answer = None
            return response.status, answer


def _errcode_of(answer: Any) -> str | None:
    return answer.get("errcode") if isinstance(answer, dict) else None


def _errcode(answer: Any) -> str:
    if isinstance(answer, dict):
        return f"{answer.get('errcode', '?')}: {answer.get('error', '')}".rstrip(": ")
    return "no JSON answer"


# ---- the checks ------------------------------------------------------------------------


def check_config_file(path: str) -> tuple[Config | None, list[Finding]]:
    try:
        config = load_config(path)
    except ConfigError as exc:
        return None, [
            fail("config", problem, "fix it and run the doctor again") for problem in exc.problems
        ]
    findings = []
    try:
        check_runnable(config)
    except ConfigError as exc:
        findings.extend(fail("config", problem) for problem in exc.problems)
    if not findings:
        findings.append(ok("config", f"{config.path} is valid"))
    return config, findings


def check_timezone(config: Config) -> Finding:
    checkin = config.file.checkin
    if checkin.after is not None and checkin.at is None:
        return ok("check-in time", f"{checkin.after} after the flag")
    name = checkin.timezone or "Europe/London"
    try:
        zone = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return fail(
            "check-in timezone",
            f"{name!r} is not a time zone this machine knows",
            "install the system's tzdata (or `pip install tzdata`), or correct checkin.timezone",
        )
    offset = dt.datetime.now(zone).strftime("%z")
    return ok("check-in timezone", f"{name} (now UTC{offset[:3]}:{offset[3:]})")


def check_language(config: Config) -> Finding:
    if warnings := config.language_warnings:
        return warn(
            "language", "; ".join(warnings), "list it under messages.reviewed_locales once read"
        )
    languages = sorted({community.language for community in config.communities})
    return ok("language", f"{', '.join(languages)}, reviewed")


def check_resources(config: Config) -> Finding:
    resources = config.resources
    if not resources:
        return fail("crisis resources", "none configured", "list them under resources:")
    stale = config.stale_resources()
    if stale:
        names = ", ".join(repr(r.name) for r in stale)
        return warn(
            "crisis resources",
            f"{names} last verified more than {config.file.resources_max_age_days} days ago",
            "check each number and website, then update verified_on",
        )
    if unchosen := config.resources_unchosen:
        return warn("crisis resources", "none chosen", "; ".join(unchosen))
    oldest = min(r.verified_on for r in resources)
    where = f" (region {config.file.region})" if config.file.resources is None else ""
    return ok("crisis resources", f"{len(resources)}{where}, all verified since {oldest}")


async def check_database(config: Config) -> Finding:
    from appservice.database import create_engine, schema_problem

    sqlite = config.sqlite_path
    if sqlite is not None and not sqlite.exists():
        return warn(
            "database", f"{sqlite} does not exist yet: the service makes it at its first start"
        )
    engine = create_engine(config.database_url)
    try:
        try:
            async with engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
        except Exception as exc:
            return fail(
                "database",
                f"cannot connect ({type(exc).__name__}: {exc})",
                "check database.url and that the database server runs",
            )
        problem = await schema_problem(engine)
        if problem is None:
            return ok("database", "reachable, its schema up to date")
        if "cannot be read" in problem:
            return fail("database", problem)
        return warn("database", f"{problem} (the service also upgrades it when it starts)")
    finally:
        await engine.dispose()


async def check_homeserver(hs: Homeserver, config: Config) -> list[Finding]:
    """The homeserver answers, and has loaded this registration (it knows its as_token)."""
    url = config.homeserver.url
    try:
        status, answer = await hs.call(
            "GET", "/_matrix/client/versions", as_bot=False, authed=False
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        return [
            fail(
                "homeserver",
                f"{url} does not answer ({type(exc).__name__}: {exc})",
                "check homeserver.url and that Synapse runs",
            )
        ]
    if status != 200:
        return [fail("homeserver", f"{url} answered {status} to /versions")]
    findings = [ok("homeserver", f"{url} answers")]
    status, answer = await hs.call("GET", "/_matrix/client/v3/account/whoami")
    if status == 200 and isinstance(answer, dict) and answer.get("user_id") == config.bot_user_id:
        findings.append(
            ok(
                "registration loaded",
                f"Synapse knows its as_token; the bot is {config.bot_user_id}",
            )
        )
    elif status == 401:
        findings.append(
            fail(
                "registration loaded",
                f"Synapse does not know the registration's as_token ({_errcode(answer)})",
                f"list {config.registration_path} in Synapse's app_service_config_files and "
                "restart Synapse (a registration written again needs a restart too)",
            )
        )
    else:
        findings.append(
            fail(
                "registration loaded",
                f"Synapse does not let the registration act as {config.bot_user_id} "
                f"({status} {_errcode(answer)})",
                "the users namespace must hold the bot: run `safeguard registration` and "
                "restart Synapse",
            )
        )
    return findings


async def check_ping(
    hs: Homeserver, session: aiohttp.ClientSession, config: Config, registration: Registration
) -> Finding:
    """Synapse's appservice ping: Synapse calls the service at the registration's URL with
    its hs_token. When no service listens, the doctor answers on the configured port itself
    (checking the token as the service does), so the ping proves the setup before a start."""
    listen = config.file.appservice.listen
    running = await _service_live(session, listen.host, listen.port)
    stand_in: web.AppRunner | None = None
    if not running:
        stand_in = await _stand_in(listen.host, listen.port, registration.hs_token)
    try:
        for attempt in range(PING_ATTEMPTS):
            status, answer = await hs.call(
                "POST",
                f"/_matrix/client/v1/appservice/{quote(registration.id, safe='')}/ping",
                {"transaction_id": f"safeguard-doctor-{secrets.token_hex(4)}"},
                as_bot=False,
            )
            # Synapse may first try a connection it kept to a service since stopped.
            if _errcode_of(answer) != "M_CONNECTION_FAILED" or attempt == PING_ATTEMPTS - 1:
                break
            await asyncio.sleep(0.3)
    finally:
        if stand_in is not None:
            await stand_in.cleanup()
    who = (
        "the service"
        if running
        else f"the doctor (on {listen.host}:{listen.port}, no service running)"
    )
    if status == 200:
        took = answer.get("duration_ms") if isinstance(answer, dict) else None
        return ok(
            "appservice ping",
            f"Synapse reached {who} at {registration.url} with the right hs_token"
            + (f" ({took} ms)" if took is not None else ""),
        )
    errcode = _errcode_of(answer)
    if (
        errcode == "M_BAD_STATUS"
        and isinstance(answer, dict)
        and answer.get("status") in (401, 403)
    ):
        return fail(
            "appservice ping",
            f"{who} refused Synapse's hs_token: Synapse holds another registration than "
            f"{config.registration_path}",
            "restart Synapse so it loads the registration as written (or write it again with "
            "`safeguard registration`, then restart Synapse)",
        )
    if errcode in ("M_CONNECTION_FAILED", "M_CONNECTION_TIMEOUT"):
        return fail(
            "appservice ping",
            f"Synapse cannot reach {registration.url} ({_errcode(answer)})",
            "appservice.url must be an address Synapse can open (from Synapse's host or "
            "container), and appservice.listen where the service listens for it",
        )
    if status in (401, 403):
        return fail(
            "appservice ping",
            f"Synapse refused the ping ({status} {_errcode(answer)})",
            "the registration's id or as_token is not the one Synapse loaded: restart Synapse",
        )
    return fail("appservice ping", f"{status} {_errcode(answer)}")


async def _service_live(session: aiohttp.ClientSession, host: str, port: int) -> bool:
    try:
        async with session.get(f"http://{_host(host)}:{port}/live") as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


def _host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def _stand_in(host: str, port: int, hs_token: str) -> web.AppRunner | None:
    """A listener answering Synapse's ping as the service would, hs_token checked."""

    async def ping(request: web.Request) -> web.Response:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not secrets.compare_digest(given.encode(), hs_token.encode()):
            return web.json_response({"errcode": "M_FORBIDDEN"}, status=403)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/_matrix/app/v1/ping", ping)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        await runner.cleanup()
        return None
    return runner


async def check_crypto(hs: Homeserver, config: Config, registration: Registration) -> Finding:
    from appservice.crypto import offline_status

    if not config.file.encryption.enabled:
        return ok("encryption", "off (encryption.enabled: false)")
    if problem := registration.encryption_problem(config):
        return fail("encryption", problem)
    status = await offline_status(
        config.homeserver.url, registration.as_token, config.bot_user_id, config.crypto_store
    )
    if status.get("problem"):
        return fail("crypto store", status["problem"], status.get("what_to_do"))
    device = status.get("device_id")
    if device is None:
        return warn("crypto store", "no device yet: the service makes one at its first start")
    code, answer = await hs.call(
        "POST", "/_matrix/client/v3/keys/query", {"device_keys": {config.bot_user_id: [device]}}
    )
    keys = (
        ((answer or {}).get("device_keys") or {}).get(config.bot_user_id, {}).get(device)
        if code == 200 and isinstance(answer, dict)
        else None
    )
    if not isinstance(keys, dict):
        return fail(
            "crypto store",
            f"the homeserver holds no keys for the store's device {device}",
            "restore the crypto store taken with this database, or run `safeguard e2ee reset`",
        )
    published = (keys.get("keys") or {}).get(f"ed25519:{device}")
    if published != status.get("identity_key"):
        return fail(
            "crypto store",
            f"the store's keys for device {device} are not the ones the homeserver holds",
            "restore the crypto store taken with this database, or run `safeguard e2ee reset`",
        )
    return ok("crypto store", f"readable; device {device} matches the homeserver's")


# ---- rooms -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoomRead:
    room_id: str
    state: list[dict[str, Any]] | None  # None: the bot cannot read it (not joined)
    why: str = ""

    def content(self, event_type: str, state_key: str = "") -> dict[str, Any] | None:
        for event in self.state or []:
            if event.get("type") == event_type and event.get("state_key") == state_key:
                content = event.get("content")
                return content if isinstance(content, dict) else None
        return None

    @property
    def name(self) -> str | None:
        name = (self.content("m.room.name") or {}).get("name")
        return name if isinstance(name, str) and name else None


async def read_room(hs: Homeserver, room_id: str) -> RoomRead:
    status, answer = await hs.call(
        "GET", f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/state"
    )
    if status == 200 and isinstance(answer, list):
        return RoomRead(room_id, [e for e in answer if isinstance(e, dict)])
    return RoomRead(room_id, None, f"{status} {_errcode(answer)}")


def _joined(read: RoomRead, user: str) -> bool:
    return (read.content("m.room.member", user) or {}).get("membership") == "join"


def _state_if_joined(
    read: RoomRead, bot: str, check: str, not_joined: str, fix: str
) -> Snapshot | Finding:
    """The room's state, read as the policy reads it; or the finding that it cannot be."""
    where = {"room_id": read.room_id, "room_name": read.name}
    if read.state is None or not _joined(read, bot):
        return fail(check, f"{not_joined} ({read.why or 'not a member'})", fix, **where)
    found = snapshot(read.room_id, read.state)
    if found is None:
        return fail(check, "its state cannot be read as a room's", **where)
    return found


def judge_staff_room(
    read: RoomRead, config: Config, staff: Sequence[str] | None = None
) -> list[Finding]:
    """`staff`: the staff of the community whose room it is (the install's policy.staff)."""
    bot = config.bot_user_id
    staff = config.policy.staff if staff is None else staff
    where = {"room_id": read.room_id, "room_name": read.name}
    found = _state_if_joined(
        read,
        bot,
        "staff room",
        "the bot is not joined",
        f"invite {bot} to the staff room (staff's invites are accepted)",
    )
    if isinstance(found, Finding):
        return [found]
    findings = []
    kind = "m.room.encrypted" if read.content("m.room.encryption") else "m.room.message"
    needed = event_level(found.state, kind, state_event=False)
    has = power_level(bot, found.state)
    if has < needed:
        findings.append(
            fail(
                "staff room",
                f"the bot cannot send messages (needs power {needed}, has {has:g})",
                f"give {bot} power level {needed} there",
                **where,
            )
        )
    if (why := not_staffs_room(read.state, staff)) is not None:
        findings.append(
            fail(
                "staff room",
                f"not a room staff made theirs: {why}",
                "make it invite-only, created by someone named in policy.staff (or with one "
                "of them as an admin who has joined it)",
                **where,
            )
        )
    if read.content("m.room.encryption") is None:
        findings.append(
            warn(
                "staff room",
                "not encrypted: alerts (names, reasons) are stored on the homeserver in the clear",
                "turn on encryption in the room's settings",
                **where,
            )
        )
    if not findings:
        findings.append(ok("staff room", "joined; the bot can send; encrypted", **where))
    return findings


def judge_group_room(read: RoomRead, config: Config) -> list[Finding]:
    bot = config.bot_user_id
    where = {"room_id": read.room_id, "room_name": read.name}
    found = _state_if_joined(
        read,
        bot,
        "room",
        "moderated, but the bot is not joined",
        "invite the bot again, or tell the service to let it go (`!rooms leave` in the staff room)",
    )
    if isinstance(found, Finding):
        return [found]
    state = found.state
    can_kick, can_redact = room_powers(bot, state)
    levels = state.power_levels if isinstance(state.power_levels, dict) else {}
    invite_needed = int(levels.get("invite", 0)) if str(levels.get("invite", 0)).isdigit() else 0
    can_invite = power_level(bot, state) >= invite_needed
    missing = [
        what
        for what, able in (("kick", can_kick), ("redact", can_redact), ("invite", can_invite))
        if not able
    ]
    findings = []
    if missing:
        needed = max(moderation_level(state), invite_needed)
        findings.append(
            fail(
                "room",
                f"the bot cannot {', '.join(missing)} (it has power {power_level(bot, state):g})",
                f"give {bot} power level {needed} there (above the members')",
                **where,
            )
        )
    moderation = config.moderation_user_id
    if moderation is not None:
        level = moderation_level(state)
        if not _joined(read, moderation) or power_level(moderation, state) < level:
            findings.append(
                warn(
                    "room",
                    f"{moderation} is not seated (joined with power {level}): the bot acts "
                    "there itself",
                    "the bot seats it where it may change power levels; else give it that level",
                    **where,
                )
            )
    if not findings:
        findings.append(ok("room", "joined; the bot can kick, redact and invite", **where))
    return findings


async def rooms_to_check(
    config: Config,
) -> tuple[list[tuple[Community, str | None]], list[str], list[Finding]]:
    """Each community's staff room (the pinned id if the service pinned its alias) and
    the moderated rooms, from the service's database."""
    from appservice.communities import staff_room_of
    from appservice.database import create_engine
    from bot.store import rooms

    staff_rooms = [(c, c.policy.staff_room) for c in config.communities]
    moderated: list[str] = []
    findings: list[Finding] = []
    sqlite = config.sqlite_path
    if sqlite is not None and not sqlite.exists():
        return staff_rooms, moderated, findings
    engine = create_engine(config.database_url)
    try:
        pinned = []
        for community, _ in staff_rooms:
            room = staff_room_of(community, engine)
            await room.load_pin()
            pinned.append((community, room.room_id or room.configured))
        staff_rooms = pinned
        async with engine.connect() as conn:
            moderated = [room.room_id for room in await rooms.moderated(conn)]
    except Exception:  # the database check says what is wrong with it
        pass
    finally:
        await engine.dispose()
    return staff_rooms, moderated, findings


async def resolve_alias(hs: Homeserver, alias: str) -> tuple[str | None, str]:
    status, answer = await hs.call(
        "GET", f"/_matrix/client/v3/directory/room/{quote(alias, safe='')}", as_bot=False
    )
    if status == 200 and isinstance(answer, dict) and isinstance(answer.get("room_id"), str):
        return answer["room_id"], ""
    return None, f"{status} {_errcode(answer)}"


async def check_rooms(hs: Homeserver, config: Config) -> list[Finding]:
    staff_rooms, moderated, findings = await rooms_to_check(config)
    limit = asyncio.Semaphore(ROOMS_AT_ONCE)

    async def read(room_id: str) -> RoomRead:
        async with limit:
            return await read_room(hs, room_id)

    async def staff_room(community: Community, address: str | None) -> list[Finding]:
        if address and address.startswith("#"):
            resolved, why = await resolve_alias(hs, address)
            if resolved is None:
                problem = config.about(community, f"{address} points to no room ({why})")
                fix = "create the staff room with that address, or give its room id"
                return [fail("staff room", problem, fix)]
            address = resolved
        return judge_staff_room(await read(address or ""), config, community.policy.staff)

    judged = await asyncio.gather(
        *(staff_room(community, address) for community, address in staff_rooms)
    )
    findings.extend(finding for each in judged for finding in each)
    reads = await asyncio.gather(*(read(r) for r in moderated))
    for room in reads:
        findings.extend(judge_group_room(room, config))
    if not moderated:
        findings.append(
            warn(
                "rooms",
                "the service moderates no room yet",
                f"staff invite {config.bot_user_id} to each group room",
            )
        )
    return findings


async def check_webhook(session: aiohttp.ClientSession, config: Config) -> Finding:
    from appservice.webhook import Webhook

    url = config.policy.alert_webhook
    if url is None:
        return warn("webhook", "--webhook given, but policy.alert_webhook is not set")
    payload = {
        "type": "org.matrix.safeguard.test",
        "text": "A test call from `safeguard doctor`: no case, nothing to do.",
        "sent_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    refused = await Webhook(config.policy.alert_webhook_secret, timeout=REQUEST_SECONDS).post_json(
        url, payload
    )
    if refused is not None:
        return fail("webhook", f"{url}: {refused}", "check the receiver and its address")
    signed = (
        "signed" if config.policy.alert_webhook_secret else "unsigned (no alert_webhook_secret)"
    )
    return ok("webhook", f"{url} accepted a test call, {signed}")


# ---- running them ------------------------------------------------------------------------


async def _guarded(check: str, work: Awaitable[Finding | list[Finding]]) -> list[Finding]:
    """A check that raised is that check failing, never the doctor stopping."""
    try:
        found = await work
    except (aiohttp.ClientError, TimeoutError) as exc:
        return [fail(check, f"the homeserver did not answer ({type(exc).__name__}: {exc})")]
    except Exception as exc:
        return [fail(check, f"could not be checked ({type(exc).__name__}: {exc})")]
    return found if isinstance(found, list) else [found]


async def diagnose(config_path: str, *, webhook: bool = False) -> Report:
    config, findings = check_config_file(config_path)
    if config is None:
        return Report(findings)
    findings += [check_timezone(config), check_resources(config), check_language(config)]
    try:
        registration = load_registration(config.registration_path)
    except ConfigError:
        return Report(findings)  # check_runnable has said what is wrong with it
    problems = registration.mismatches(config)
    if not problems:
        findings.append(ok("registration", f"{config.registration_path} matches the config"))
    timeout = aiohttp.ClientTimeout(total=REQUEST_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        hs = Homeserver(session, config.homeserver.url, registration.as_token, config.bot_user_id)
        homeserver = await _guarded("homeserver", check_homeserver(hs, config))
        findings += homeserver
        reachable = all(f.status == "ok" for f in homeserver)
        work: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("database", lambda: check_database(config))
        ]
        if reachable:
            work += [
                ("appservice ping", lambda: check_ping(hs, session, config, registration)),
                ("crypto store", lambda: check_crypto(hs, config, registration)),
                ("rooms", lambda: check_rooms(hs, config)),
            ]
        if webhook:
            work.append(("webhook", lambda: check_webhook(session, config)))
        for found in await asyncio.gather(*(_guarded(name, run()) for name, run in work)):
            findings += found
    return Report(findings)


def run(config_path: str, *, as_json: bool, webhook: bool) -> int:
    began = time.monotonic()
    try:
        report = asyncio.run(diagnose(config_path, webhook=webhook))
    except Exception as exc:  # the doctor itself broke: say so, distinctly from a failed check
        print(f"error: the doctor could not run: {type(exc).__name__}: {exc}")
        return 2
    if as_json:
        print(report.json())
    else:
        print(report.text() + f" ({time.monotonic() - began:.1f}s)")
    return 1 if report.failed else 0
