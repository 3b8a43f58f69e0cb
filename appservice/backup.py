"""`safeguard backup DIR` and `safeguard restore DIR`: what must be kept together, kept together.

A deployment is four things that are useless apart: the database (cases, audit chain),
the crypto store (the bot's device: without it, every encrypted message the bot was
sent is unreadable to it and a new device must be made), the digest key (without it,
the personal fields still held cannot be checked against their digests), and the
config with its registration (the tokens Synapse knows the service by).

A backup copies each while the service runs: SQLite files (the database and the
crypto store's) through SQLite's online backup API, so each copy is consistent on
its own; PostgreSQL through `pg_dump` (custom format). `manifest.json` lists every
file with its size and SHA-256. Restore checks the manifest before it touches
anything, refuses while a service runs against the database (it holds the same
instance lock the service takes), moves whatever it replaces aside (never deletes),
and puts each file where the *current* config says it belongs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from appservice.config import Config
from appservice.database import InstanceLock, sqlite_journal
from appservice.digest_key import digest_key_path
from appservice.errors import ConfigError

MANIFEST = "manifest.json"
FORMAT = 1
# Names inside the backup folder.
DATABASE_SQLITE = "database.sqlite"
DATABASE_PG = "database.pgdump"
CRYPTO = "crypto-store"
DIGEST_KEY = "digest.key"
CONFIG = "config.yaml"
REGISTRATION = "registration.yaml"


class BackupError(Exception):
    """What went wrong, for the operator; nothing was changed by the step that raised it."""


@dataclass(frozen=True)
class Places:
    """Where each part lives for this config."""

    database_url: str
    sqlite: Path | None
    crypto_store: Path
    digest_key: Path
    config: Path
    registration: Path

    @classmethod
    def of(cls, config: Config) -> Places:
        return cls(
            config.database_url,
            config.sqlite_path,
            config.crypto_store,
            digest_key_path(config),
            config.path.resolve(),
            config.registration_path,
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sqlite_copy(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database (the online backup API)."""
    with (
        contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src,
        contextlib.closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)


def _libpq_url(url: str) -> str:
    """SQLAlchemy's postgresql+asyncpg://… as pg_dump reads it."""
    parsed = make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


def _run(command: list[str], what: str) -> None:
    if shutil.which(command[0]) is None:
        raise BackupError(
            f"{command[0]} is not installed: install PostgreSQL's client tools, or {what} "
            "yourself (README: Backups)"
        )
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BackupError(f"{command[0]} failed ({done.returncode}): {done.stderr.strip()}")


def _copy_file(source: Path, target: Path) -> None:
    if source.suffix == ".db" or source.name.endswith((".db", ".sqlite")):
        _sqlite_copy(source, target)
    else:
        shutil.copy2(source, target)


def backup(config: Config, folder: Path) -> dict[str, Any]:
    """Write the backup into `folder` (new, or empty); returns the manifest."""
    places = Places.of(config)
    if folder.exists() and any(folder.iterdir()):
        raise BackupError(f"{folder} is not empty: give a new folder for each backup")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    files: dict[str, str] = {}  # name in the backup -> what it is
    if places.sqlite is not None:
        if not places.sqlite.exists():
            raise BackupError(f"the database {places.sqlite} does not exist: nothing to back up")
        _sqlite_copy(places.sqlite, folder / DATABASE_SQLITE)
        files[DATABASE_SQLITE] = "database"
    else:
        _run(
            [
                "pg_dump",
                "--format=custom",
                "--no-owner",
                "--file",
                str(folder / DATABASE_PG),
                _libpq_url(places.database_url),
            ],
            "run pg_dump",
        )
        files[DATABASE_PG] = "database"
    if places.crypto_store.is_dir():
        (folder / CRYPTO).mkdir(mode=0o700)
        for item in sorted(places.crypto_store.iterdir()):
            if item.is_file() and not item.name.endswith(("-wal", "-shm", "-journal")):
                _copy_file(item, folder / CRYPTO / item.name)
                files[f"{CRYPTO}/{item.name}"] = "crypto store"
    if places.digest_key.exists():
        shutil.copy2(places.digest_key, folder / DIGEST_KEY)
        files[DIGEST_KEY] = "digest key"
    shutil.copy2(places.config, folder / CONFIG)
    files[CONFIG] = "config"
    if places.registration.exists():
        shutil.copy2(places.registration, folder / REGISTRATION)
        files[REGISTRATION] = "registration"
    manifest = {
        "format": FORMAT,
        "made_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "database": "sqlite" if places.sqlite is not None else "postgresql",
        "files": {
            name: {
                "what": what,
                "size": (folder / name).stat().st_size,
                "sha256": _sha256(folder / name),
            }
            for name, what in files.items()
        },
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify(folder: Path) -> dict[str, Any]:
    """The manifest, once every file it lists is there with its size and checksum, and
    nothing else is; BackupError naming the first that is not."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise BackupError(
            f"{folder} has no {MANIFEST}: not a backup made by `safeguard backup`"
        ) from None
    except json.JSONDecodeError as exc:
        raise BackupError(f"{folder / MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{folder / MANIFEST}: a format this version does not read")
    listed = manifest.get("files")
    if not isinstance(listed, dict) or "database" not in {
        entry.get("what") for entry in listed.values() if isinstance(entry, dict)
    }:
        raise BackupError(f"{folder / MANIFEST}: lists no database")
    for name, entry in listed.items():
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise BackupError(f"{MANIFEST} names {name!r}, outside the backup")
        if not path.is_file():
            raise BackupError(f"{name} is listed in the manifest but missing")
        if path.stat().st_size != entry.get("size") or _sha256(path) != entry.get("sha256"):
            raise BackupError(
                f"{name} does not match the manifest's checksum: the backup is damaged"
            )
    present = {
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
    }
    if extra := sorted(present - set(listed)):
        raise BackupError(f"{', '.join(extra)} in the backup but not in its manifest")
    return manifest


def _aside(path: Path, stamp: str) -> Path | None:
    """Move what a restore replaces out of the way, next to where it was."""
    if not path.exists():
        return None
    moved = path.with_name(f"{path.name}.before-restore-{stamp}")
    path.rename(moved)
    return moved


async def restore(config: Config, folder: Path) -> list[str]:
    """Put the backup in `folder` where `config` keeps each part; returns what was done."""
    manifest = verify(folder)
    places = Places.of(config)
    kind = "sqlite" if places.sqlite is not None else "postgresql"
    if manifest["database"] != kind:
        raise BackupError(
            f"the backup holds a {manifest['database']} database, the config uses {kind}"
        )
    lock = InstanceLock(places.database_url)
    if places.sqlite is not None:
        places.sqlite.parent.mkdir(parents=True, exist_ok=True)
    try:
        await lock.acquire()
    except ConfigError as exc:
        raise BackupError(f"refused: {exc}: stop the service first") from None
    try:
        return _put_back(manifest, folder, places)
    finally:
        await lock.release()


def _put_back(manifest: dict[str, Any], folder: Path, places: Places) -> list[str]:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    done: list[str] = []
    names = manifest["files"]
    if places.sqlite is not None:
        for journal in sqlite_journal(places.sqlite):
            _aside(journal, stamp)
        if moved := _aside(places.sqlite, stamp):
            done.append(f"moved the database that was there to {moved}")
        shutil.copy2(folder / DATABASE_SQLITE, places.sqlite)
        os.chmod(places.sqlite, 0o600)
        done.append(f"database -> {places.sqlite}")
    else:
        _run(
            [
                "pg_restore",
                "--clean",
                "--if-exists",
                "--no-owner",
                "--single-transaction",
                "--dbname",
                _libpq_url(places.database_url),
                str(folder / DATABASE_PG),
            ],
            "run pg_restore",
        )
        done.append("database -> restored into the configured PostgreSQL database")
    crypto = [name for name in names if name.startswith(f"{CRYPTO}/")]
    if crypto:
        if moved := _aside(places.crypto_store, stamp):
            done.append(f"moved the crypto store that was there to {moved}")
        places.crypto_store.mkdir(parents=True, mode=0o700)
        for name in crypto:
            target = places.crypto_store / Path(name).name
            shutil.copy2(folder / name, target)
            os.chmod(target, 0o600)
        done.append(f"crypto store -> {places.crypto_store}")
    if DIGEST_KEY in names:
        if moved := _aside(places.digest_key, stamp):
            done.append(f"moved the digest key that was there to {moved}")
        shutil.copy2(folder / DIGEST_KEY, places.digest_key)
        os.chmod(places.digest_key, 0o600)
        done.append(f"digest key -> {places.digest_key}")
    if REGISTRATION in names:
        saved = (folder / REGISTRATION).read_bytes()
        if not places.registration.exists() or places.registration.read_bytes() != saved:
            if moved := _aside(places.registration, stamp):
                done.append(f"moved the registration that was there to {moved}")
            places.registration.write_bytes(saved)
            os.chmod(places.registration, 0o600)
            done.append(
                f"registration -> {places.registration} (Synapse must have this one loaded: "
                "restart Synapse if it was changed)"
            )
    if (folder / CONFIG).read_bytes() != places.config.read_bytes():
        done.append(
            f"note: the backup's config differs from {places.config}; it is left as it is "
            f"(the backup's is {folder / CONFIG})"
        )
    return done
