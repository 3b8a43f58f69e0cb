"""Telling "the database cannot answer now" apart from "this statement is wrong".

A full disk, a lock held too long, a read-only file, a PostgreSQL server restarting,
a connection that dropped: each is an outage. It is waited out and retried, and
nothing is recorded as failed because of it. A constraint violated, a bad value, SQL
that does not compile: each is a bug or bad data. Retrying that changes nothing, so
the caller treats it as its own failure.

Errors come wrapped by SQLAlchemy (pooled connections) or raw from a driver (the
intake's own connections: sqlite3, asyncpg). Both are read here, in one place.
"""

from __future__ import annotations

import sqlite3

from sqlalchemy import exc as sa_exc

# PostgreSQL error classes that mean "not now": connection exception, insufficient
# resources (disk full), operator intervention (shutting down), system and internal
# errors. https://www.postgresql.org/docs/current/errcodes-appendix.html
_PG_OUTAGE_CLASSES = frozenset({"08", "53", "57", "58", "XX"})


# SQLite's result codes (and their extended forms, SQLITE_IOERR_WRITE...) that mean the
# database cannot work now, not that the statement is wrong.
_SQLITE_OUTAGES = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_FULL",
    "SQLITE_IOERR",
    "SQLITE_CANTOPEN",
    "SQLITE_READONLY",
    "SQLITE_PROTOCOL",
    "SQLITE_NOMEM",
    "SQLITE_NOTADB",
    "SQLITE_CORRUPT",
    "SQLITE_INTERRUPT",
)


class DatabaseUnavailable(Exception):
    """The database cannot record now: whatever was being done is retried later."""


def _driver_outage(error: BaseException) -> bool | None:
    """The verdict on a driver's own exception (None: not a driver error we know)."""
    if isinstance(error, sqlite3.OperationalError):
        # Disk full, I/O error, locked past the busy timeout, read-only, cannot open: by
        # SQLite's own error code. "no such column", a syntax error (SQLITE_ERROR) is ours.
        name = getattr(error, "sqlite_errorname", None)
        return name is None or name.startswith(_SQLITE_OUTAGES)
    if isinstance(error, sqlite3.ProgrammingError):
        return "closed" in str(error).lower()  # a connection closed under us
    if isinstance(error, sqlite3.Error):
        return False  # integrity, data: the statement, not the database
    sqlstate = getattr(error, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        return sqlstate[:2] in _PG_OUTAGE_CLASSES
    module = type(error).__module__
    if module.startswith("asyncpg"):
        # A bad argument is a DataError (a ValueError too); any other interface error is
        # the connection (closed, in a failed state, never made).
        return not isinstance(error, ValueError)
    return None


def is_database_outage(error: BaseException) -> bool:
    """Whether `error`, raised by a database call, means the database is unavailable."""
    if isinstance(error, DatabaseUnavailable):
        return True
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        # The async adapters wrap the driver's exception once more: look through both.
        for inner in (error.orig, getattr(error.orig, "__cause__", None)):
            if inner is not None:
                verdict = _driver_outage(inner)
                if verdict is not None:
                    return verdict
        return isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError)
    if isinstance(error, sa_exc.TimeoutError | sa_exc.DisconnectionError):
        return True  # no connection from the pool in time; a connection lost
    if isinstance(error, sa_exc.SQLAlchemyError):
        return False
    verdict = _driver_outage(error)
    if verdict is not None:
        return verdict
    # Connecting failed (refused, reset, timed out) before any driver error existed.
    return isinstance(error, OSError | TimeoutError)
