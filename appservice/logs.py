"""Logging: one line per event, JSON when configured, the case number on every case line.

Chat text and tokens never reach a log line: the code logs ids and outcomes only.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "at": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        case = getattr(record, "case", None)
        if case is not None:
            entry["case"] = case
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        case = getattr(record, "case", None)
        return f"{line} [case #{case}]" if case is not None else line


def setup_logging(level: str, format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else TextFormatter())
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
