"""The application service registration: the file Synapse and the service share.

Synapse reads it from `app_service_config_files`; the service reads its tokens
from it. Tokens are generated here, kept across re-generation, and a template's
placeholder tokens are refused, so nobody runs with a token from a public repo.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from appservice.errors import ConfigError

if TYPE_CHECKING:
    from appservice.config import Config

PLACEHOLDER_PREFIX = "PLACEHOLDER"
# Rooms the bot creates carry an alias in this exclusive namespace, which makes creating
# one idempotent: a second attempt (the first one's answer lost) finds it instead.
ROOM_ALIAS_PREFIX = "_safeguard_"


def alias_namespace(domain: str) -> str:
    return f"^#{re.escape(ROOM_ALIAS_PREFIX)}[0-9a-f]+:{re.escape(domain)}$"


def is_placeholder(token: object) -> bool:
    return not isinstance(token, str) or not token.strip() or token.startswith(PLACEHOLDER_PREFIX)


@dataclass(frozen=True)
class Registration:
    id: str
    url: str | None
    as_token: str
    hs_token: str
    sender_localpart: str
    raw: dict[str, Any]

    def mismatches(self, config: Config) -> list[str]:
        """Differences between the registration and the config that would break delivery."""
        problems = []
        if self.id != config.appservice.id:
            problems.append(f"id is {self.id!r} but appservice.id is {config.appservice.id!r}")
        if self.sender_localpart not in (config.sender_localpart, config.appservice.bot_localpart):
            problems.append(
                f"sender_localpart is {self.sender_localpart!r}, expected "
                f"{config.sender_localpart!r} (appservice.bot_localpart "
                f"{config.appservice.bot_localpart!r})"
            )
        if (self.url or "").rstrip("/") != config.appservice.url.rstrip("/"):
            problems.append(f"url is {self.url!r} but appservice.url is {config.appservice.url!r}")
        moderation = config.moderation_user_id
        if moderation is not None and not self.claims_user(moderation):
            problems.append(
                f"the users namespace does not hold {moderation} (appservice."
                "moderation_localpart): re-run `safeguard registration` and restart Synapse"
            )
        return problems

    def claims_user(self, user_id: str) -> bool:
        namespaces = self.raw.get("namespaces") or {}
        patterns = [u.get("regex") for u in namespaces.get("users") or [] if isinstance(u, dict)]
        return any(isinstance(p, str) and re.fullmatch(p, user_id) for p in patterns)

    def reserves_aliases(self, config: Config) -> bool:
        """Whether the service's room alias namespace is its own (idempotent room creation)."""
        namespaces = self.raw.get("namespaces") or {}
        aliases = [a.get("regex") for a in namespaces.get("aliases") or [] if isinstance(a, dict)]
        return alias_namespace(config.homeserver.domain) in aliases

    def lets_the_bot_sync(self, config: Config) -> bool:
        """Whether the bot is a namespace user, not the sender: Synapse refuses /sync to
        the sender, and end-to-end encryption needs the bot's own sync."""
        return self.sender_localpart != config.appservice.bot_localpart

    def warnings(self, config: Config) -> list[str]:
        """What an older registration lacks; the service runs, but less robustly."""
        found = []
        if not self.reserves_aliases(config):
            found.append(
                "the registration reserves no room alias namespace, so a room creation whose "
                "answer was lost cannot be told apart from one that never happened: re-run "
                "`safeguard registration` and restart Synapse"
            )
        if problem := self.encryption_problem(config):
            found.append(problem)
        return found

    def encryption_problem(self, config: Config) -> str | None:
        """Why encryption, which the config asks for, cannot be on (None: it can, or is off)."""
        if not config.file.encryption.enabled or self.lets_the_bot_sync(config):
            return None
        return (
            "the bot is the registration's sender, which Synapse does not let sync, so "
            "end-to-end encryption is off: re-run `safeguard registration` (the sender "
            f"becomes {config.sender_localpart!r}) and restart Synapse"
        )


def load_registration(path: Path) -> Registration:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path} not found: create it with `safeguard registration -c CONFIG -o {path}`"
        ) from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a registration (expected a mapping)")
    for key in ("as_token", "hs_token"):
        if is_placeholder(data.get(key)):
            raise ConfigError(
                f"{path}: {key} is a placeholder; generate real tokens with "
                f"`safeguard registration -c CONFIG -o {path}`"
            )
    for key in ("id", "sender_localpart"):
        if not isinstance(data.get(key), str):
            raise ConfigError(f"{path}: {key} is missing")
    return Registration(
        id=data["id"],
        url=data.get("url"),
        as_token=data["as_token"],
        hs_token=data["hs_token"],
        sender_localpart=data["sender_localpart"],
        raw=data,
    )


def build_registration(config: Config, existing: dict[str, Any] | None = None) -> dict[str, Any]:
    """The registration for this config, keeping real tokens from `existing`."""
    existing = existing or {}

    def token(key: str) -> str:
        current = existing.get(key)
        return current if not is_placeholder(current) else secrets.token_urlsafe(48)

    users = [{"exclusive": True, "regex": f"^{re.escape(config.bot_user_id)}$"}]
    if config.moderation_user_id is not None:
        users.append({"exclusive": True, "regex": f"^{re.escape(config.moderation_user_id)}$"})
    return {
        "id": config.appservice.id,
        "url": config.appservice.url,
        "as_token": token("as_token"),
        "hs_token": token("hs_token"),
        # The bot is a user in the namespace, not the sender: only then may it /sync for
        # its end-to-end encryption (Synapse refuses /sync to the sender).
        "sender_localpart": config.sender_localpart,
        # The bot is the only user we act as, and no one else may claim its id.
        "namespaces": {
            "users": users,
            "aliases": [{"exclusive": True, "regex": alias_namespace(config.homeserver.domain)}],
            "rooms": [],
        },
        # A safeguarding action must never wait behind a rate limit we could avoid.
        "rate_limited": False,
        "receive_ephemeral": False,
    }


def write_registration(config: Config, output: Path) -> dict[str, Any]:
    """Write (or refresh) the registration file atomically, mode 0600; returns its content."""
    existing: dict[str, Any] | None = None
    if output.exists():
        try:
            loaded = yaml.safe_load(output.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{output} exists but is not valid YAML: {exc}") from None
        existing = loaded if isinstance(loaded, dict) else None
    content = build_registration(config, existing)
    output.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# Generated by `safeguard registration`. Holds secrets: never commit it.\n"
        "# Add its path to Synapse's app_service_config_files and restart Synapse.\n"
    )
    fd, temporary = tempfile.mkstemp(dir=output.parent, prefix=".registration-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(header)
            yaml.safe_dump(content, handle, sort_keys=False, allow_unicode=True)
        os.chmod(temporary, 0o600)
        os.replace(temporary, output)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return content
