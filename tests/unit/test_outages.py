"""Which database errors are outages (waited out, retried) and which are bugs or bad data."""

from __future__ import annotations

import sqlite3

from sqlalchemy import exc as sa_exc

from bot.store.outages import DatabaseUnavailable, is_database_outage


def sqlite_error(message: str, name: str | None) -> sqlite3.OperationalError:
    error = sqlite3.OperationalError(message)
    if name is not None:
        error.sqlite_errorname = name
    return error


def test_a_full_or_locked_database_is_an_outage_a_wrong_statement_is_not():
    assert is_database_outage(sqlite_error("database or disk is full", "SQLITE_FULL"))
    assert is_database_outage(sqlite_error("database is locked", "SQLITE_BUSY"))
    assert is_database_outage(sqlite_error("disk I/O error", "SQLITE_IOERR_WRITE"))
    assert is_database_outage(
        sqlite_error("attempt to write a readonly database", "SQLITE_READONLY")
    )
    assert not is_database_outage(sqlite_error("no such column: nope", "SQLITE_ERROR"))
    assert not is_database_outage(sqlite3.IntegrityError("UNIQUE constraint failed"))
    real = sqlite3.connect(":memory:")
    try:
        real.execute("SELECT nope FROM sqlite_master")
    except sqlite3.OperationalError as error:
        assert not is_database_outage(error), "SQLite's own word for a wrong statement"


def test_wrapped_errors_are_read_through_and_connecting_is_an_outage():
    wrapped = sa_exc.OperationalError("UPDATE", {}, sqlite_error("full", "SQLITE_FULL"))
    assert is_database_outage(wrapped)
    bug = sa_exc.OperationalError("SELECT", {}, sqlite_error("no such table", "SQLITE_ERROR"))
    assert not is_database_outage(bug)
    assert is_database_outage(ConnectionRefusedError(111, "refused"))  # the server is down
    assert is_database_outage(DatabaseUnavailable("recording failed"))
    assert not is_database_outage(sa_exc.ArgumentError("bad argument"))
