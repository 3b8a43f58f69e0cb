"""The `safeguard` command line: the operator's interface, whose names and outputs are stable."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import faulthandler
import importlib.util
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

from appservice.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    check_runnable,
    load_config,
)
from appservice.database import opened
from appservice.digest_key import digest_key_path, load_digest_key, require_digest_key
from appservice.errors import ConfigError
from appservice.logs import Pseudonyms, log_key, setup_logging
from appservice.registration import write_registration

EXIT_CONFIG = 2


def _age(since: dt.datetime) -> str:
    seconds = int((dt.datetime.now(dt.UTC) - since).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _date_argument(text: str) -> dt.datetime:
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (write YYYY-MM-DD)") from None
    return dt.datetime.combine(day, dt.time(), dt.UTC)


# ---- commands ---------------------------------------------------------------------------


def cmd_registration(args: argparse.Namespace, config: Config) -> int:
    output = Path(args.output) if args.output else config.registration_path
    content = write_registration(config, output)
    print(f"wrote {output} (id {content['id']}, bot {config.bot_user_id})")
    print("add it to Synapse's app_service_config_files and restart Synapse")
    return 0


def cmd_check_config(args: argparse.Namespace, config: Config) -> int:
    # Neither the homeserver nor the database is needed: `run` does the same checks first.
    check_runnable(config)
    from appservice.registration import load_registration

    for warning in load_registration(config.registration_path).warnings(config):
        print(f"warning: appservice.registration: {warning}")
    for community in config.communities:
        staff_room = community.policy.staff_room
        if staff_room and not staff_room.startswith("!"):
            note = (
                "its staff_room is an alias: it is pinned to the room it first resolves to; "
                "a room id leaves no doubt about which room gets the alerts"
            )
            print(f"note: {config.about(community, note)}")
    for warning in [
        *config.resources_unchosen,
        *config.language_warnings,
        *config.alias_warnings,
    ]:
        print(f"warning: {warning}")
    for resource in config.stale_resources():
        print(
            f"warning: resources: {resource.name!r} was verified on {resource.verified_on}; "
            f"older than resources_max_age_days ({config.file.resources_max_age_days})"
        )
    encryption = config.file.encryption
    if encryption.enabled and encryption.private_rooms:
        print(
            "note: members' replies in their encrypted DMs are relayed into the staff room: "
            "keep the staff room encrypted, or they are copied there in the clear (/health "
            "warns if it is not)"
        )
    if encryption.enabled and encryption.verified_only:
        print(
            "note: encryption.verified_only: the bot's encrypted messages (alerts included) "
            "reach only devices their owner has verified (cross-signed); staff must verify "
            "every device they read alerts on"
        )
    if (moderation := config.moderation_user_id) is not None:
        print(
            f"note: appservice.moderation_localpart: {moderation} removes members, redacts "
            "flags and posts the room notice in group rooms. In each it needs the power to "
            "kick, redact and post: the bot gives it that where the bot may change power "
            "levels; elsewhere give it the room's kick and redact level yourself. Where it "
            "cannot act, the bot does (/health?detail=1: checks.moderation_user)"
        )
    for pattern in config.choosable_inviters():
        print(
            f"warning: appservice.allowed_inviters: {pattern!r} matches names a user can "
            "choose when registering: if your homeserver lets people register, anyone can "
            "become one and put the bot in a room of theirs (list user ids instead)"
        )
    print(f"{config.path}: OK")
    return 0


async def _run(config: Config) -> int:
    from appservice.service import Service

    service = Service(config)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, service.stopped.set)
    await service.start()
    try:
        await service.stopped.wait()
    finally:
        await service.stop()
    if service.fatal:
        print(f"error: {service.fatal}", file=sys.stderr)
        return 1
    return 0


def _pseudonyms(config: Config, *, create: bool) -> Pseudonyms:
    key = load_digest_key(config, create=create) if create else require_digest_key(config)
    return Pseudonyms(log_key(key or b""))


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    setup_logging(config.logging.level, config.logging.format, _pseudonyms(config, create=True))
    return asyncio.run(_run(config))


def config_template() -> bytes:
    """The documented example config, as installed with the package."""
    return (Path(__file__).parent / "config.example.yaml").read_bytes()


def cmd_start(args: argparse.Namespace, config: Config | None) -> int:
    """`run`, with a first start as a container has it: no config yet writes the example
    and stops; the example not yet edited stops; no registration yet writes it and stops."""
    path = Path(args.config)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(config_template())
        print(
            f"wrote {path}, a new config: edit it (homeserver, appservice.url as Synapse "
            "reaches this service, policy.staff_room, policy.staff, resources), or set its "
            "keys by environment (SAFEGUARD_POLICY__STAFF_ROOM=…), then start again"
        )
        return 0
    config = load_config(path)
    placeholder = yaml.safe_load(config_template())["policy"]["staff_room"]
    if config.policy.staff_room == placeholder:
        print(
            f"error: {path} still has the example's policy.staff_room ({placeholder}): edit "
            "the config (or set SAFEGUARD_POLICY__STAFF_ROOM) first",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if not config.registration_path.exists():
        content = write_registration(config, config.registration_path)
        print(
            f"wrote {config.registration_path} (id {content['id']}): add it to Synapse's "
            "app_service_config_files, restart Synapse, then start this again"
        )
        return 0
    return cmd_run(args, config)


def cmd_log_id(args: argparse.Namespace, config: Config) -> int:
    """The pseudonym each id has in this deployment's logs (to find the lines about it)."""
    pseudonyms = _pseudonyms(config, create=False)
    for matrix_id in args.ids:
        print(f"{pseudonyms.of(matrix_id)}  {matrix_id}")
    return 0


def cmd_doctor(args: argparse.Namespace, config: Config | None) -> int:
    from appservice.doctor import run

    return run(args.config, as_json=args.json, webhook=args.webhook)


def cmd_backup(args: argparse.Namespace, config: Config) -> int:
    from appservice.backup import BackupError, backup, restore

    folder = Path(args.folder)
    try:
        if args.command == "backup":
            manifest = backup(config, folder)
            print(f"backed up {len(manifest['files'])} files to {folder} (manifest.json)")
            if manifest["database"] == "postgresql":
                print("the database: pg_dump --format=custom (database.pgdump)")
            return 0
        for line in asyncio.run(restore(config, folder)):
            print(line)
        print("restored: start the service, then run `safeguard doctor`")
        return 0
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def cmd_db_upgrade(args: argparse.Namespace, config: Config) -> int:
    async def upgrade() -> None:
        async with opened(config.database_url, migrate=True):
            pass

    asyncio.run(upgrade())
    print("database is at the latest schema")
    return 0


async def _with_db(config: Config, work: Callable[[Any], Awaitable[int]]) -> int:
    """Read-only commands never migrate: they say to run `safeguard db upgrade` instead."""
    async with opened(config.database_url) as engine, engine.connect() as conn:
        return await work(conn)


def cmd_cases(args: argparse.Namespace, config: Config) -> int:
    from bot.cases import records
    from bot.store import cases

    async def listing(conn: Any) -> int:
        found = await cases.listing(conn, args.state, community=args.community)
        if args.json:
            rows = [records.case_summary(c, await cases.steps_of(conn, c.id)) for c in found]
            print(json.dumps({"cases": rows}, indent=2, ensure_ascii=False))
            return 0
        print(f"{'CASE':>5}  {'STATE':<7} {'AGE':>5}  {'MEMBER':<28} {'ROOM':<28} CHECK-IN DUE")
        for case in found:
            due = case.due_at.strftime("%Y-%m-%d %H:%M UTC") if case.due_at else "-"
            print(
                f"{case.id:>5}  {case.state:<7} {_age(case.received_at):>5}  "
                f"{case.member_id or '(purged)':<28} {case.room_id or '(purged)':<28} {due}"
            )
        return 0

    async def show(conn: Any) -> int:
        document = await records.export(conn, case_id=args.number, community=args.community)
        if not document["cases"]:
            print(f"no case #{args.number}", file=sys.stderr)
            return 1
        print(json.dumps(document["cases"][0], indent=2, ensure_ascii=False))
        return 0

    async def export(conn: Any) -> int:
        since = args.since
        document = await records.export(
            conn, since=since, case_id=args.case, community=args.community
        )
        text = (
            json.dumps(document, indent=2, ensure_ascii=False)
            if args.format == "json"
            else records.export_csv(document)
        )
        if args.output:
            Path(args.output).write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return 0

    action = {"list": listing, "show": show, "export": export}[args.action]
    return asyncio.run(_with_db(config, action))


def cmd_audit(args: argparse.Namespace, config: Config) -> int:
    from bot.core.audit_chain import ChainVerifier
    from bot.store import audit

    anchor = None
    if getattr(args, "head", None):
        seq, _, digest = args.head.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            raise ConfigError("--head must be N:HASH as posted in the staff room")
        anchor = (int(seq), digest)

    async def verify(conn: Any) -> int:
        # Streamed: the log is read a batch at a time, never held whole.
        verifier = ChainVerifier(anchor=anchor, key=load_digest_key(config, create=False))
        async for row in audit.chain_rows(conn):
            if not verifier.feed(*row):
                break
        result = verifier.result()
        if result.ok:
            # The chain read whole must end where its head row says: entries cut off the
            # end leave a chain that verifies, but not this.
            head_seq, head_hash = await audit.head(conn)
            if (head_seq, head_hash) != (result.head_seq, result.head_hash):
                print(
                    f"audit log FAILED at its end: it ends at entry {result.head_seq} "
                    f"({result.head_hash}), but its head says {head_seq} ({head_hash}): "
                    "entries were removed from the end"
                )
                return 1
            print(
                f"audit log OK: {result.entries} entries, head {result.head_seq}:{result.head_hash}"
            )
            if verifier.unchecked_personal:
                print(
                    f"note: the personal fields of {verifier.unchecked_personal} entries were "
                    f"not checked: the digest key ({digest_key_path(config)}) is missing"
                )
            return 0
        print(f"audit log FAILED at entry {result.first_bad_seq}: {result.problem}")
        return 1

    async def purge_now() -> int:
        from bot.cases.retention import purge
        from bot.store.audit import Provenance

        days = args.days if args.days is not None else config.retention_days
        if days <= 0:
            print("policy.retention_days is 0 (keep for ever): nothing to purge")
            return 0
        provenance = Provenance(
            config.policy.policy_version, config.config_hash, require_digest_key(config)
        )
        async with opened(config.database_url) as engine:
            result = await purge(engine, provenance, days)
        print(
            f"purged {result.cases} case(s), {result.entries} entries' personal fields "
            f"(closed more than {days} days ago, not on hold), and {result.caseless} "
            "entries outside cases"
        )
        if result.scheduled:
            numbers = ", ".join(f"#{number}" for number in result.scheduled)
            print(
                f"handed {len(result.scheduled)} case(s) to the service to purge ({numbers}): "
                "they left messages or rooms on the homeserver, which the running service "
                "redacts and leaves (the member told where to get help now) before it erases "
                "them; `safeguard cases show N` says when it has"
            )
        return 0

    if args.action == "purge":
        return asyncio.run(purge_now())
    return asyncio.run(_with_db(config, verify))


def cmd_e2ee(args: argparse.Namespace, config: Config) -> int:
    from appservice.crypto import offline_status, reset_device
    from appservice.registration import load_registration

    if not config.file.encryption.enabled:
        print("end-to-end encryption is off (encryption.enabled: false)")
        return 0
    registration = load_registration(config.registration_path)
    where = (config.homeserver.url, registration.as_token, config.bot_user_id, config.crypto_store)
    if args.action == "reset":
        return _e2ee_reset(args, config, lambda: reset_device(*where))
    status = asyncio.run(offline_status(*where))
    print(f"bot:              {config.bot_user_id}")
    print(f"device:           {status.get('device_id') or '(none yet)'}")
    print(f"crypto store:     {status.get('store')}")
    if status.get("identity_key"):
        print(f"identity key:     {status['identity_key']}")
    if "one_time_keys" in status:
        print(f"one-time keys:    {status['one_time_keys']} on the homeserver")
    rooms = status.get("encrypted_rooms")
    if rooms is not None:
        print(f"encrypted rooms:  {len(rooms)}")
        for room in rooms:
            print(f"  {room}")
    if status.get("note"):
        print(status["note"])
    if status.get("problem"):
        print(f"PROBLEM:          {status['problem']}")
        print(f"what to do:       {status['what_to_do']}")
        return 1
    return 0


def _e2ee_reset(
    args: argparse.Namespace, config: Config, reset: Callable[[], Awaitable[dict[str, Any]]]
) -> int:
    """A new device, made deliberately: only with the service stopped, and only if asked."""
    from appservice.database import InstanceLock

    if not args.yes:
        print(
            "This deletes the bot's device(s) on the homeserver and moves the crypto store "
            f"({config.crypto_store}) aside; the next start makes a new device. Messages "
            "encrypted to the old device stay unreadable to the bot. Run it again with --yes "
            "to go ahead.",
            file=sys.stderr,
        )
        return EXIT_CONFIG

    async def locked() -> dict[str, Any]:
        lock = InstanceLock(config.database_url)
        await lock.acquire()  # ConfigError while the service runs: stop it first
        try:
            return await reset()
        finally:
            await lock.release()

    done = asyncio.run(locked())
    deleted = ", ".join(done["deleted_devices"]) or "none"
    print(f"deleted device(s) on the homeserver: {deleted}")
    if done["store_moved_to"]:
        print(f"the old crypto store is kept at {done['store_moved_to']}")
    print("start the service: it makes a new device; run `safeguard e2ee status` to check it")
    return 0


def cmd_dev(args: argparse.Namespace, config: Config | None) -> int:
    from appservice.devstack import run_dev

    # The dev stack runs Synapse from this same environment; a production install
    # (no [dev] extra) has none, and the failure would otherwise be a traceback.
    if importlib.util.find_spec("synapse") is None:
        print(
            "safeguard dev needs matrix-synapse in this environment: "
            "run `make run`, or pip install 'matrix-safeguard[dev]'",
            file=sys.stderr,
        )
        return 2
    setup_logging("INFO", "text")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            run_dev(Path(args.dir), synapse_port=args.synapse_port, service_port=args.service_port)
        )
    return 0


# ---- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safeguard", description="Matrix safeguarding application service"
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c", "--config", default=DEFAULT_CONFIG_PATH, help="config file (default: config.yaml)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("registration", parents=[common], help="write the registration file")
    p.add_argument("-o", "--output", help="where to write it (default: appservice.registration)")
    p.set_defaults(handler=cmd_registration, needs="registration")

    p = sub.add_parser("run", parents=[common], help="run the service")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser(
        "start",
        parents=[common],
        help="run, after a first start: writes the config, then the registration, if missing",
    )
    p.set_defaults(handler=cmd_start, needs="nothing")

    p = sub.add_parser("check-config", parents=[common], help="validate the config; exit 2 if bad")
    p.set_defaults(handler=cmd_check_config)

    p = sub.add_parser(
        "doctor",
        parents=[common],
        help="check a setup end to end: one line per check; exit 1 if any fails",
    )
    p.add_argument("--json", action="store_true", help="the same checks as JSON")
    p.add_argument(
        "--webhook", action="store_true", help="also send the webhook a signed test call"
    )
    # The doctor reads the config itself: a config that does not load is one of its findings.
    p.set_defaults(handler=cmd_doctor, needs="nothing")

    for name, what in (
        (
            "backup",
            "copy the database, crypto store, digest key, config and registration to a new "
            "folder, with a manifest of checksums (the service may be running)",
        ),
        (
            "restore",
            "put a backup back where the config keeps each part (the service stopped); "
            "what it replaces is moved aside",
        ),
    ):
        p = sub.add_parser(name, parents=[common], help=what)
        p.add_argument("folder", metavar="DIR")
        p.set_defaults(handler=cmd_backup)

    p = sub.add_parser("db", parents=[common], help="database maintenance")
    db = p.add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", parents=[common], help="apply migrations").set_defaults(
        handler=cmd_db_upgrade
    )

    # Every case command reads one community's cases with --community (default: all).
    community = argparse.ArgumentParser(add_help=False)
    community.add_argument(
        "--community", metavar="ID", help="only this community's cases (and refusals)"
    )
    p = sub.add_parser("cases", parents=[common], help="read the case records")
    actions = p.add_subparsers(dest="action", required=True)
    q = actions.add_parser("list", parents=[common, community], help="one line per case")
    q.add_argument("state", nargs="?", default="all", choices=["open", "closed", "all"])
    q.add_argument("--json", action="store_true", help="JSON instead of a table")
    q.set_defaults(handler=cmd_cases)
    q = actions.add_parser(
        "show", parents=[common, community], help="one case with its whole timeline"
    )
    q.add_argument("number", type=int)
    q.set_defaults(handler=cmd_cases)
    q = actions.add_parser("export", parents=[common, community], help="export the audit trail")
    q.add_argument("--format", choices=["json", "csv"], default="json")
    q.add_argument(
        "--since", type=_date_argument, help="only cases received on/after this date (YYYY-MM-DD)"
    )
    q.add_argument("--case", type=int, help="only this case")
    q.add_argument("-o", "--output", help="write to this file instead of stdout")
    q.set_defaults(handler=cmd_cases)

    p = sub.add_parser("audit", parents=[common], help="check the audit log")
    audits = p.add_subparsers(dest="action", required=True)
    q = audits.add_parser("verify", parents=[common], help="recompute the hash chain")
    q.add_argument("--head", help="N:HASH posted in the staff room; the log must contain it")
    q.set_defaults(handler=cmd_audit)
    q = audits.add_parser("purge", parents=[common], help="apply policy.retention_days now")
    q.add_argument("--days", type=int, help="override policy.retention_days for this run")
    q.set_defaults(handler=cmd_audit)

    p = sub.add_parser("e2ee", parents=[common], help="the bot's end-to-end encryption")
    e2ee = p.add_subparsers(dest="action", required=True)
    e2ee.add_parser(
        "status",
        parents=[common],
        help="device id, one-time keys, encrypted rooms; what is wrong and what to do (exit 1)",
    ).set_defaults(handler=cmd_e2ee)
    q = e2ee.add_parser(
        "reset",
        parents=[common],
        help="a new device: delete the old one(s) on the homeserver, move the store aside",
    )
    q.add_argument("--yes", action="store_true", help="go ahead (the service must be stopped)")
    q.set_defaults(handler=cmd_e2ee)

    p = sub.add_parser(
        "log-id", parents=[common], help="the pseudonym of a user, room or event id in the logs"
    )
    p.add_argument("ids", nargs="+", metavar="ID", help="e.g. @alice:example.org")
    p.set_defaults(handler=cmd_log_id)

    p = sub.add_parser("dev", help="local Synapse + the service + demo users, one command")
    p.add_argument("--dir", default=".dev", help="where the dev stack lives (default: .dev)")
    p.add_argument("--synapse-port", type=int, default=8008, help="first run only (default 8008)")
    p.add_argument("--service-port", type=int, default=29333, help="first run only (default 29333)")
    p.set_defaults(handler=cmd_dev, needs="nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    # What the service and its commands write (the database, its journal, the crypto
    # store, exports) names people at risk: readable by the service's own user only.
    os.umask(0o077)
    # `kill -USR1 <pid>`: every thread's stack to stderr, for a process that will not
    # stop or seems stuck (nothing else changes; the process carries on).
    # (Not where stderr is no file: the commands run inside another program's capture.)
    with contextlib.suppress(OSError, ValueError, AttributeError):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "needs", None) == "nothing":
            return args.handler(args, None)
        config = load_config(args.config)
        return args.handler(args, config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
