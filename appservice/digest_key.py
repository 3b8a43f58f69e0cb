"""The deployment's digest key: the secret that keys the digests of personal fields.

It lives outside the database on purpose (whoever copies the database without
it cannot test guesses against the digests of purged entries), so it must be
backed up with the database: without it, the personal fields still held can no
longer be checked against their digests (the hash chain itself still verifies).
Created on the service's first run, readable by its owner only.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from appservice.config import Config
from appservice.errors import ConfigError


def digest_key_path(config: Config) -> Path:
    configured = config.audit.digest_key_file
    if configured:
        path = Path(configured)
        return path if path.is_absolute() else config.path.resolve().parent / path
    database = config.sqlite_path
    if database is not None:
        return database.with_name(database.name + ".digest-key")
    return config.path.resolve().parent / "safeguard-digest.key"


def load_digest_key(config: Config, *, create: bool) -> bytes | None:
    """The key; created if missing and `create`; None if missing and not."""
    path = digest_key_path(config)
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        if not create:
            return None
        key = secrets.token_hex(32)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:  # created meanwhile by another process: read theirs
            return load_digest_key(config, create=False)
        except OSError as exc:
            raise ConfigError(
                f"audit.digest_key_file: cannot create {path}: {exc.strerror}"
            ) from None
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(key + "\n")
        return key.encode()
    except OSError as exc:
        raise ConfigError(f"audit.digest_key_file: cannot read {path}: {exc.strerror}") from None
    if len(text) < 32:
        raise ConfigError(f"audit.digest_key_file: {path} does not hold a key")
    return text.encode()


def require_digest_key(config: Config) -> bytes:
    key = load_digest_key(config, create=False)
    if key is None:
        raise ConfigError(
            f"audit.digest_key_file: {digest_key_path(config)} is missing: restore it from "
            "your backup (it is created by the service's first run)"
        )
    return key
