"""Logging: one line per event, JSON when configured, the case number on every case line.

Chat text and tokens never reach a log line: the code logs ids and outcomes only. And
the ids are pseudonyms: every Matrix user, room, alias and event id in a line (as
written, or URL-encoded inside a request path) is replaced by a keyed digest such as
`<user 5e0c1a2b>`, the same for the same id in every line, so a log shipped to a
provider or pasted into a ticket names no one. `safeguard log-id ID` tells an operator
the pseudonym of an id to look for.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import re
import secrets
import sys
from urllib.parse import unquote

# A Matrix id as written or URL-encoded: sigil, localpart (percent-escapes allowed, but
# not an encoded ':') and ':server'; or a server-less room or event id (room versions
# 12 and later, event ids since version 4: unpadded URL-safe base64), which is long —
# a short word after '!' or '$' ("!safeguard", "$5") is no id.
_MATRIX_ID = re.compile(
    r"(?P<sigil>%40|%21|%23|%24|[@!#$])"
    r"(?:"
    r"(?:[A-Za-z0-9._=\-/+~]|%(?!3[Aa])[0-9A-Fa-f]{2})+"
    r"(?::|%3[Aa])[A-Za-z0-9.\-]*[A-Za-z0-9](?:(?::|%3[Aa])[0-9]{1,5})?"
    r"|(?P<bare>[A-Za-z0-9_\-]{18,}))"
)
_KIND = {"@": "user", "!": "room", "#": "alias", "$": "event"}


class Pseudonyms:
    """Keyed digests of Matrix ids. The key is the deployment's (derived from its
    digest key), so a pseudonym cannot be reversed by hashing a list of candidates."""

    def __init__(self, key: bytes | None = None) -> None:
        # Without a key (the dev stack, a command run before the config is read), one
        # for this process: pseudonyms still match within its lines.
        self._key = key if key is not None else secrets.token_bytes(32)

    def of(self, matrix_id: str) -> str:
        matrix_id = unquote(matrix_id)
        digest = hmac.new(self._key, matrix_id.encode(), hashlib.sha256).hexdigest()[:8]
        return f"<{_KIND.get(matrix_id[:1], 'id')} {digest}>"

    def apply(self, text: str) -> str:
        if not any(sigil in text for sigil in "@!#$%"):
            return text
        return _MATRIX_ID.sub(self._replace, text)

    def _replace(self, match: re.Match[str]) -> str:
        if match["bare"] is not None and unquote(match["sigil"]) in "@#":
            return match[0]  # users and aliases always have a server
        return self.of(match[0])


def log_key(digest_key: bytes) -> bytes:
    """The pseudonyms' key, derived from the digest key (never the key itself)."""
    return hmac.new(digest_key, b"safeguard log pseudonyms", hashlib.sha256).digest()


class JsonFormatter(logging.Formatter):
    def __init__(self, pseudonyms: Pseudonyms | None = None) -> None:
        super().__init__()
        self._pseudonyms = pseudonyms or Pseudonyms()

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "at": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": self._pseudonyms.apply(record.getMessage()),
        }
        case = getattr(record, "case", None)
        if case is not None:
            entry["case"] = case
        if record.exc_info:
            entry["exception"] = self._pseudonyms.apply(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self, pseudonyms: Pseudonyms | None = None) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._pseudonyms = pseudonyms or Pseudonyms()

    def format(self, record: logging.LogRecord) -> str:
        line = self._pseudonyms.apply(super().format(record))
        case = getattr(record, "case", None)
        return f"{line} [case #{case}]" if case is not None else line


def setup_logging(level: str, format: str, pseudonyms: Pseudonyms | None = None) -> None:
    pseudonyms = pseudonyms or Pseudonyms()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(pseudonyms) if format == "json" else TextFormatter(pseudonyms)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_libraries()


# Libraries that, at DEBUG (some at INFO), log what must never reach a log: the SQL
# drivers every bound parameter (inbox payloads, relayed replies), nio request and
# response bodies, aiohttp requests with their query strings (tokens).
CHATTY = {
    "sqlalchemy.engine": logging.WARNING,
    "sqlalchemy.pool": logging.WARNING,
    "aiosqlite": logging.WARNING,
    "asyncpg": logging.WARNING,
    "alembic": logging.WARNING,
    "nio": logging.WARNING,
    "peewee": logging.WARNING,
    "aiohttp.access": logging.WARNING,
    "aiohttp.client": logging.WARNING,
    "apscheduler": logging.WARNING,
}


def quiet_libraries() -> None:
    """Whatever `logging.level` is (DEBUG included), these stay at WARNING."""
    for name, level in CHATTY.items():
        logging.getLogger(name).setLevel(level)
