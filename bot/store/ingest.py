"""Recording what Synapse delivered: transaction ids, event ids, the inbox to act on."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import sqlite3
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bot.store.cases import active_key
from bot.store.outages import is_database_outage
from bot.store.ready_rooms import Reservation
from bot.store.schema import epoch_millis, inbox, seen_events, transactions
from bot.store.writer_thread import WriterThread


def storable_txn_id(txn_id: str) -> str:
    """Synapse's txn ids are small integers; anything longer than the column is hashed."""
    if len(txn_id) <= 255:
        return txn_id
    return "sha256:" + hashlib.sha256(txn_id.encode()).hexdigest()


@dataclass(frozen=True)
class Recorded:
    new_events: int  # event ids never recorded before
    queued: int  # of them, events queued to act on
    events: int  # event ids it carried
    # Of those queued in the lane the recorder was asked about (`hand_over_lane`): each
    # one's queue number, by event id, so it can be handed on in memory.
    handed: dict[str, int] = field(default_factory=dict)
    # The notice ahead asked for (`record(ahead=...)`) reserved with it: its flag was new,
    # and its room made ahead still there to take (bot/steps/notify_ahead.py).
    reserved: bool = False

    @property
    def duplicate_transaction(self) -> bool:
        """A retry: it carried events, none of them new. (A txn id used again for new
        events — a homeserver restored from a backup — is not one: they are acted on.)"""
        return self.events > 0 and self.new_events == 0


class WriteUnavailable(Exception):
    """The database cannot record anything now (down, disk full, connection lost)."""


class UnstorableEvents(Exception):
    """Something in the events themselves cannot be stored (the database refused the data)."""


# The hot path: every transaction Synapse sends runs these, so they go to the driver
# directly (no per-row ORM or Core compilation, no pool checkout per transaction):
# one statement for the transaction id, one for every event id, one for the few
# events queued to act on. An event is queued only if its id was never recorded, so
# a retried transaction, or an event delivered again in a new one, is acted on once:
# the inbox insert runs first, while `seen_events` still tells what is new, and
# ON CONFLICT covers an event carried twice in one transaction.
_INBOX_COLUMNS = (
    "event_id, room_id, event_type, payload, received_at, status, attempts, lane, caught_up"
)
_SQLITE_TRANSACTION = (
    "INSERT OR IGNORE INTO transactions (txn_id, received_at, event_count) VALUES (?, ?, ?)"
)
_SQLITE_EVENTS = "INSERT OR IGNORE INTO seen_events (event_id, received_at) VALUES (?, ?)"
_SQLITE_QUEUE = (
    f"INSERT OR IGNORE INTO inbox ({_INBOX_COLUMNS})"
    " SELECT ?, ?, ?, ?, ?, 'pending', 0, ?, ?"
    " WHERE NOT EXISTS (SELECT 1 FROM seen_events WHERE event_id = ?)"
)
# On PostgreSQL the three inserts are one statement, so one round trip and no
# BEGIN/COMMIT. The inbox takes only the events the `seen_events` insert reports as
# new (a join of two small in-statement sets), so its cost never depends on the size
# of `seen_events` or on the plan PostgreSQL cached for it (a plan made while the
# table was empty scans it whole, until the next ANALYZE).
_PG_RECORD = (
    "WITH txn AS ("
    " INSERT INTO transactions (txn_id, received_at, event_count) VALUES ($1, $2, $3)"
    " ON CONFLICT DO NOTHING"
    "), seen AS ("
    " INSERT INTO seen_events (event_id, received_at) SELECT unnest($4::varchar[]), $2"
    " ON CONFLICT DO NOTHING RETURNING event_id"
    "), queued AS ("
    f" INSERT INTO inbox ({_INBOX_COLUMNS})"
    " SELECT e.event_id, e.room_id, e.event_type, e.payload::json, $2, 'pending', 0, e.lane, $10"
    " FROM unnest($5::varchar[], $6::varchar[], $7::varchar[], $8::text[], $9::smallint[])"
    " AS e(event_id, room_id, event_type, payload, lane)"
    " JOIN seen ON seen.event_id = e.event_id"
    " ON CONFLICT (event_id) DO NOTHING RETURNING seq, event_id, lane"
    ") SELECT (SELECT count(*) FROM queued), (SELECT count(*) FROM seen),"
    " (SELECT array_agg(event_id) FROM queued WHERE lane = $11),"
    " (SELECT array_agg(seq) FROM queued WHERE lane = $11)"
)
# A notice sent ahead of its case (bot/steps/notify_ahead.py): its room made ahead taken
# and the reservation written with the push, only if the flag was new (queued now), the
# member has no active case there (a flag of theirs corroborates it: no second notice),
# and the room is still there (a case may have taken it since it was chosen: the delete
# decides).
_NO_ACTIVE_CASE = "NOT EXISTS (SELECT 1 FROM cases WHERE active_key = {key})"
_SQLITE_TAKE_READY = (
    f"DELETE FROM ready_rooms WHERE room_id = ? AND {_NO_ACTIVE_CASE.format(key='?')}"
)
_SQLITE_RESERVE = (
    "INSERT INTO notices_ahead"
    " (flag_event_id, group_room_id, member_id, room_id, nonce, reserved_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_PG_RECORD_AHEAD = _PG_RECORD.replace(
    ") SELECT (SELECT count(*) FROM queued),",
    "), ready AS ("
    f" DELETE FROM ready_rooms WHERE room_id = $15 AND {_NO_ACTIVE_CASE.format(key='$17')}"
    " AND EXISTS (SELECT 1 FROM queued WHERE event_id = $12) RETURNING room_id"
    "), ahead AS ("
    " INSERT INTO notices_ahead"
    " (flag_event_id, group_room_id, member_id, room_id, nonce, reserved_at)"
    " SELECT $12, $13, $14, room_id, $16, $2 FROM ready RETURNING room_id"
    ") SELECT (SELECT count(*) FROM queued),",
).replace(
    " (SELECT array_agg(seq) FROM queued WHERE lane = $11)",
    " (SELECT array_agg(seq) FROM queued WHERE lane = $11), (SELECT count(*) FROM ahead)",
)
assert _PG_RECORD_AHEAD.count("notices_ahead") == 1 and "FROM ahead" in _PG_RECORD_AHEAD
_PG_RECORD_IDS = (
    "WITH txn AS ("
    " INSERT INTO transactions (txn_id, received_at, event_count) VALUES ($1, $2, $3)"
    " ON CONFLICT DO NOTHING"
    ") INSERT INTO seen_events (event_id, received_at) SELECT unnest($4::varchar[]), $2"
    " ON CONFLICT DO NOTHING"
)


def _active_key(ahead: Reservation) -> str:
    return active_key(ahead.group_room_id, ahead.member_id)


def _to_json(event: dict[str, Any]) -> str:
    """The event as JSON text: orjson, or the standard library for what orjson refuses
    (integers beyond 64 bits, from a body only the lenient parser accepted). orjson
    writes NaN as null, which every backend's JSON column accepts."""
    try:
        return orjson.dumps(event).decode()
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(event)


def _record_sqlite_rows(
    conn: sqlite3.Connection,
    txn_id: str,
    event_ids: Sequence[str],
    queue: list[tuple[str, str, str, str, int]],
    received: Any,
    seen_at: int,
    caught_up: bool,
    hand_over_lane: int | None = None,
    ahead: Reservation | None = None,
) -> tuple[int, int, dict[str, int], bool]:
    """One SQLite write transaction, all of it on the calling thread: (queued, new events,
    the queue numbers of those queued in `hand_over_lane`, by event id, whether `ahead`
    was reserved).

    `received`: the time as the transaction and inbox rows store it; `seen_at`: the same
    time as `seen_events` stores it, integer milliseconds (bot/store/schema.py)."""
    conn.execute("BEGIN IMMEDIATE")  # waits for another process's lock: the busy timeout
    try:
        conn.execute(_SQLITE_TRANSACTION, (storable_txn_id(txn_id), received, len(event_ids)))
        queued = 0
        handed: dict[str, int] = {}
        if queue:
            rows = []
            for event_id, room, kind, payload, lane in queue:
                row = (event_id, room, kind, payload, received, lane, caught_up, event_id)
                if lane != hand_over_lane:
                    rows.append(row)
                    continue
                # One by one (a few, at most): each one's queue number is its rowid.
                cursor = conn.execute(_SQLITE_QUEUE, row)
                if cursor.rowcount == 1 and cursor.lastrowid is not None:
                    handed[event_id] = cursor.lastrowid
                    queued += 1
            if rows:
                queued += conn.executemany(_SQLITE_QUEUE, rows).rowcount
        reserved = False
        if (
            ahead is not None
            and ahead.flag_event_id in handed
            and conn.execute(_SQLITE_TAKE_READY, (ahead.room_id, _active_key(ahead))).rowcount == 1
        ):
            conn.execute(
                _SQLITE_RESERVE,
                (
                    ahead.flag_event_id,
                    ahead.group_room_id,
                    ahead.member_id,
                    ahead.room_id,
                    ahead.nonce,
                    received,
                ),
            )
            reserved = True
        new_events = 0
        if event_ids:
            new_events = conn.executemany(
                _SQLITE_EVENTS, [(event_id, seen_at) for event_id in event_ids]
            ).rowcount
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return queued, new_events, handed, reserved


class TransactionRecorder:
    """Records transactions on a connection of its own, held between transactions.

    One at a time (a lock): Synapse sends one transaction at a time, and catch-up
    shares the connection. A connection that failed is dropped and a new one is
    opened next time. `close()` before the engine is disposed.

    On PostgreSQL the whole record is one statement. On SQLite it is one transaction
    of three or four statements, run in one call on a thread of the recorder's own
    with a plain sqlite3 connection (as Synapse runs a whole interaction on its
    database thread): one hand-over to a thread and back per transaction Synapse
    sends, where the pool's driver (aiosqlite) makes one per statement, BEGIN and
    COMMIT included.
    """

    def __init__(self, engine: AsyncEngine, *, busy_timeout: float = 5.0) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name
        # A record that cannot be made within this long (seconds) is given up: the push
        # is answered 503 at once and Synapse retries it, never left without an answer
        # while the database is locked, full or gone.
        self._busy_timeout = busy_timeout
        self._busy_ms_set: int | None = None  # the plain connection's busy timeout now
        stamp = transactions.c.received_at.type.bind_processor(engine.dialect)
        self._stamp: Callable[[dt.datetime], Any] = stamp or (lambda value: value)
        self._lock = asyncio.Lock()
        # PostgreSQL: a pooled connection, and asyncpg's under it.
        self._conn: AsyncConnection | None = None
        self._raw: Any = None
        # SQLite: a plain connection, opened, used and closed on the recorder's thread
        # only; and the engine's turn to write, shared with every other writer in the
        # process (appservice/database.py), so none busy-waits on SQLite's lock.
        self._sqlite: sqlite3.Connection | None = None
        self._thread = WriterThread("safeguard-intake")
        self._writing: Callable[[], contextlib.AbstractAsyncContextManager[None]] = getattr(
            engine, "writing", contextlib.nullcontext
        )
        if self._dialect == "sqlite" and not hasattr(engine, "plain_connection"):
            raise TypeError("a SQLite engine from appservice.database.create_engine is needed")

    async def record(
        self,
        txn_id: str,
        event_ids: Sequence[str],
        to_act_on: Sequence[tuple[dict[str, Any], int]],
        now: dt.datetime,
        *,
        caught_up: bool = False,
        hand_over_lane: int | None = None,
        ahead: Reservation | None = None,
    ) -> Recorded:
        """Persist a transaction; only events never seen before are queued to act on.

        A retried transaction carries the same ids, so nothing is queued twice; a
        reused txn id (Synapse restored from backup) still has its new events queued.
        Raises WriteUnavailable or UnstorableEvents; nothing is recorded then.
        `hand_over_lane`: the queue numbers of the events queued in that lane are returned.
        `ahead`: a notice to send ahead of its case, reserved in the same transaction if its
        flag is new and queued in `hand_over_lane` (`Recorded.reserved`).
        """
        try:
            queue = [
                (event["event_id"], event["room_id"], event["type"], _to_json(event), lane)
                for event, lane in to_act_on
            ]
        except (ValueError, TypeError, RecursionError) as exc:
            raise UnstorableEvents(type(exc).__name__) from exc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._busy_timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self._lock.acquire()
        except TimeoutError:
            raise WriteUnavailable(
                f"the database did not take the transaction within {self._busy_timeout:.0f}s"
            ) from None
        try:
            if self._dialect == "postgresql":
                async with asyncio.timeout_at(deadline):
                    return await self._record_postgresql(
                        await self._driver(),
                        txn_id,
                        event_ids,
                        queue,
                        now,
                        caught_up,
                        hand_over_lane,
                        ahead,
                    )
            return await self._record_sqlite(
                txn_id, event_ids, queue, now, caught_up, deadline, hand_over_lane, ahead
            )
        except Exception as exc:
            if isinstance(exc, TimeoutError) or self._is_outage(exc):
                await self._drop()
                why = "timed out" if isinstance(exc, TimeoutError) else f"{exc}"
                raise WriteUnavailable(f"{type(exc).__name__}: {why}") from exc
            raise UnstorableEvents(type(exc).__name__) from exc
        finally:
            self._lock.release()

    async def close(self) -> None:
        async with self._lock:
            await self._drop()
            self._thread.stop()

    async def _driver(self) -> Any:
        if self._raw is None:
            if self._conn is None:
                self._conn = await self._engine.connect()
            self._raw = (await self._conn.get_raw_connection()).driver_connection
        return self._raw

    async def _drop(self) -> None:
        if self._conn is not None:
            conn, self._conn, self._raw = self._conn, None, None
            with contextlib.suppress(Exception):
                await conn.invalidate()
                await conn.close()
        if self._sqlite is not None:
            await self._thread.run(self._close_sqlite)

    def _close_sqlite(self) -> None:
        if self._sqlite is not None:
            conn, self._sqlite = self._sqlite, None
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _sqlite_write(self, busy_ms: int, *args: Any) -> tuple[int, int, dict[str, int], bool]:
        """On the recorder's thread: open the connection if need be, and write, waiting
        for another process's lock no longer than `busy_ms`."""
        if self._sqlite is None:
            self._sqlite = self._engine.plain_connection()  # type: ignore[attr-defined]
            self._busy_ms_set = None
        if busy_ms != self._busy_ms_set:
            self._sqlite.execute(f"PRAGMA busy_timeout={busy_ms}")
            self._busy_ms_set = busy_ms
        return _record_sqlite_rows(self._sqlite, *args)

    async def _record_sqlite(
        self,
        txn_id: str,
        event_ids: Sequence[str],
        queue: list[tuple[str, str, str, str, int]],
        now: dt.datetime,
        caught_up: bool,
        deadline: float,
        hand_over_lane: int | None,
        ahead: Reservation | None,
    ) -> Recorded:
        # Our turn among this process's writers; then SQLite's write lock, taken up
        # front as every writer here does (appservice/database.py), each within what is
        # left of the deadline.
        loop = asyncio.get_running_loop()
        turn = self._writing()
        async with asyncio.timeout_at(deadline):
            await turn.__aenter__()
        try:
            # In whole tenths of a second: uncontended, that is the same every time, and
            # the pragma is set again only when it changes.
            left_ms = max(100, int((deadline - loop.time()) * 10) * 100)
            queued, new_events, handed, reserved = await self._thread.run(
                self._sqlite_write,
                left_ms,
                txn_id,
                event_ids,
                queue,
                self._stamp(now),
                epoch_millis(now),
                caught_up,
                hand_over_lane,
                ahead,
            )
        finally:
            await turn.__aexit__(None, None, None)
        return Recorded(new_events, queued, len(event_ids), handed, reserved)

    async def _record_postgresql(
        self,
        driver: Any,
        txn_id: str,
        event_ids: Sequence[str],
        queue: list[tuple[str, str, str, str, int]],
        now: dt.datetime,
        caught_up: bool,
        hand_over_lane: int | None,
        ahead: Reservation | None,
    ) -> Recorded:
        received = self._stamp(now)
        if not queue:
            # Nothing to act on (most transactions): the statement's own row count says
            # how many ids were new, so nothing is returned.
            status = await driver.execute(
                _PG_RECORD_IDS, storable_txn_id(txn_id), received, len(event_ids), list(event_ids)
            )
            return Recorded(int(status.rsplit(" ", 1)[1]), 0, len(event_ids))
        columns = [list(column) for column in zip(*queue, strict=True)]
        arguments = (
            storable_txn_id(txn_id),
            received,
            len(event_ids),
            list(event_ids),
            *columns,
            caught_up,
            -1 if hand_over_lane is None else hand_over_lane,
        )
        reserved = 0
        if ahead is None:
            queued, new_events, handed_ids, handed_seqs = await driver.fetchrow(
                _PG_RECORD, *arguments
            )
        else:
            queued, new_events, handed_ids, handed_seqs, reserved = await driver.fetchrow(
                _PG_RECORD_AHEAD,
                *arguments,
                ahead.flag_event_id,
                ahead.group_room_id,
                ahead.member_id,
                ahead.room_id,
                ahead.nonce,
                _active_key(ahead),
            )
        handed = dict(zip(handed_ids or (), handed_seqs or (), strict=True))
        return Recorded(new_events, queued, len(event_ids), handed, reserved == 1)

    def _is_outage(self, exc: BaseException) -> bool:
        """A driver error that means "not now" (vs. something in the data). Anything from
        SQLAlchemy here came from connecting: an outage too, so Synapse retries the
        transaction rather than the events being skipped."""
        return is_database_outage(exc) or isinstance(exc, SQLAlchemyError)


@dataclass(frozen=True)
class InboxItem:
    seq: int
    event_id: str
    room_id: str
    event_type: str
    payload: dict[str, Any]
    received_at: dt.datetime
    attempts: int
    lane: int = 1
    caught_up: bool = False


async def pending(
    conn: AsyncConnection,
    *,
    lane: int | None = None,
    limit: int = 100,
) -> list[InboxItem]:
    """Queued events in arrival order (of one lane), due or not: what the inbox holds.
    (A lane takes its due ones with `due_in_lane`.)"""
    query = sa.select(inbox).where(inbox.c.status == "pending")
    if lane is not None:
        query = query.where(inbox.c.lane == lane)
    rows = await conn.execute(query.order_by(inbox.c.seq).limit(limit))
    return [_item(row) for row in rows]


def _item(row: sa.Row[Any]) -> InboxItem:
    return InboxItem(
        seq=row.seq,
        event_id=row.event_id,
        room_id=row.room_id,
        event_type=row.event_type,
        payload=row.payload,
        received_at=row.received_at,
        attempts=row.attempts,
        lane=row.lane,
        caught_up=row.caught_up,
    )


_DUE_IN_LANE = (
    sa.select(inbox)
    .where(
        inbox.c.status == "pending",
        inbox.c.lane == sa.bindparam("b_lane"),
        sa.or_(
            inbox.c.next_attempt_at.is_(None),
            inbox.c.next_attempt_at <= sa.bindparam("b_now", type_=inbox.c.next_attempt_at.type),
        ),
    )
    .order_by(inbox.c.seq)
    .limit(sa.bindparam("b_limit"))
)
_PENDING_IN_LANE = sa.select(sa.func.count()).where(
    inbox.c.status == "pending", inbox.c.lane == sa.bindparam("b_lane")
)


async def due_in_lane(
    conn: AsyncConnection, lane: int, now: dt.datetime, limit: int, *, counted: bool = False
) -> tuple[list[InboxItem], int | None]:
    """The lane's events due at `now`, in arrival order (at most `limit`), and (`counted`)
    how many events the lane holds pending in all, due or not: one snapshot."""
    rows = await conn.execute(_DUE_IN_LANE, {"b_lane": lane, "b_now": now, "b_limit": limit})
    items = [_item(row) for row in rows]
    if not counted:
        return items, None
    return items, (await conn.execute(_PENDING_IN_LANE, {"b_lane": lane})).scalar_one()


async def next_attempt_at(conn: AsyncConnection, lane: int) -> dt.datetime | None:
    """When the lane's earliest event waiting to be retried falls due."""
    query = sa.select(sa.func.min(inbox.c.next_attempt_at)).where(
        inbox.c.status == "pending", inbox.c.lane == lane
    )
    return (await conn.execute(query)).scalar_one()


async def retry_encrypted_now(conn: AsyncConnection) -> None:
    """Keys arrived: encrypted events waiting for theirs are due again at once."""
    await conn.execute(
        inbox.update()
        .where(inbox.c.status == "pending", inbox.c.event_type == "m.room.encrypted")
        .values(next_attempt_at=None)
    )


async def retry_lanes_now(conn: AsyncConnection, lanes: Collection[int]) -> None:
    """The homeserver answers again: the lanes' events waiting to be retried are due at
    once (a flag that waited out the outage must not wait out its backoff too)."""
    await conn.execute(
        inbox.update()
        .where(
            inbox.c.status == "pending",
            inbox.c.lane.in_(list(lanes)),
            inbox.c.next_attempt_at.is_not(None),
        )
        .values(next_attempt_at=None)
    )


async def move_to_lane(conn: AsyncConnection, seq: int, lane: int) -> None:
    """An event found (once decrypted) to belong to another lane: due there at once."""
    await conn.execute(
        inbox.update().where(inbox.c.seq == seq).values(lane=lane, next_attempt_at=None)
    )


async def backlog_by_lane(
    conn: AsyncConnection,
) -> dict[int, tuple[int, dt.datetime | None]]:
    """Each lane's pending events: how many, and when the oldest was received (one read of
    the pending part of the lane index, however long the inbox's history)."""
    rows = await conn.execute(
        sa.select(inbox.c.lane, sa.func.count(), sa.func.min(inbox.c.received_at))
        .where(inbox.c.status == "pending")
        .group_by(inbox.c.lane)
    )
    return {lane: (count, oldest) for lane, count, oldest in rows}


async def retry_later(
    conn: AsyncConnection, seq: int, until: dt.datetime, error: str, *, counted: bool
) -> None:
    """Keep the event queued until `until`; `counted`: the attempt counts towards the cap."""
    values: dict[str, Any] = {"next_attempt_at": until, "error": error}
    if counted:
        values["attempts"] = inbox.c.attempts + 1
    await conn.execute(inbox.update().where(inbox.c.seq == seq).values(**values))


# Built once: every event acted on is finished so.
_FINISH = (
    inbox.update()
    .where(inbox.c.seq == sa.bindparam("b_seq"))
    .values(
        payload=None,
        processed_at=sa.bindparam("b_now", type_=inbox.c.processed_at.type),
        attempts=inbox.c.attempts + 1,
    )
)


async def finish(
    conn: AsyncConnection, seq: int, now: dt.datetime, *, error: str | None = None
) -> None:
    """Mark an inbox event processed (or failed for good), and drop its content."""
    await conn.execute(
        _FINISH,
        {"b_seq": seq, "status": "failed" if error else "done", "error": error, "b_now": now},
    )


async def finish_many(conn: AsyncConnection, seqs: list[int], now: dt.datetime) -> None:
    """Mark several events that needed no action as processed, in one statement."""
    await conn.execute(
        inbox.update()
        .where(inbox.c.seq.in_(seqs))
        .values(status="done", payload=None, processed_at=now, attempts=inbox.c.attempts + 1)
    )


async def membership_recorded_since(
    conn: AsyncConnection, room_id: str, since: dt.datetime
) -> bool:
    """Whether a membership event of the room was queued since then (a pushed invite: the
    bot's sync sees invites without their event id). Asked only when the sync brings an
    invite, so no index of its own."""
    query = sa.select(inbox.c.seq).where(
        inbox.c.room_id == room_id,
        inbox.c.event_type == "m.room.member",
        inbox.c.received_at >= since,
    )
    return (await conn.execute(query.limit(1))).first() is not None


async def not_seen(conn: AsyncConnection, event_ids: Collection[str]) -> set[str]:
    """Which of these events no push (or earlier catch-up) has brought yet."""
    if not event_ids:
        return set()
    found = await conn.execute(
        sa.select(seen_events.c.event_id).where(seen_events.c.event_id.in_(list(event_ids)))
    )
    return set(event_ids) - {row.event_id for row in found}


async def backlog(conn: AsyncConnection) -> int:
    query = sa.select(sa.func.count()).select_from(inbox).where(inbox.c.status == "pending")
    return (await conn.execute(query)).scalar_one()


async def prune(conn: AsyncConnection, older_than: dt.datetime) -> int:
    """Forget delivery bookkeeping older than the retention window."""
    result = await conn.execute(
        transactions.delete().where(transactions.c.received_at < older_than)
    )
    removed = result.rowcount or 0
    if conn.dialect.name == "sqlite":
        removed += await _prune_seen_by_rowid(conn, older_than)
    else:
        seen = seen_events.delete().where(seen_events.c.received_at < older_than)
        removed += (await conn.execute(seen)).rowcount or 0
    result = await conn.execute(
        inbox.delete().where(inbox.c.status != "pending", inbox.c.received_at < older_than)
    )
    return removed + (result.rowcount or 0)


async def _prune_seen_by_rowid(conn: AsyncConnection, older_than: dt.datetime) -> int:
    """SQLite keeps no index on `seen_events.received_at` (it would slow every
    transaction); rows are appended in arrival order, so the rowid orders them by
    `received_at` too. The last row older than the window is found by bisection over
    rowids (each probe one primary-key lookup), and everything up to it is deleted.
    A wall clock stepped back blurs the boundary by as much as it stepped."""
    rowid = sa.literal_column("rowid")
    bounds = (
        await conn.execute(
            sa.select(sa.func.min(rowid), sa.func.max(rowid)).select_from(seen_events)
        )
    ).one()
    low, high = bounds
    if low is None:
        return 0

    async def first_from(position: int) -> tuple[int, dt.datetime]:
        query = (
            sa.select(rowid, seen_events.c.received_at)
            .where(rowid >= position)
            .order_by(rowid)
            .limit(1)
        )
        found, received = (await conn.execute(query)).one()
        return found, received

    # Invariant: every row before `low` is old; the row at or after `high` is not (or
    # there is none). Narrow until they meet.
    found, received = await first_from(low)
    if received >= older_than:
        return 0
    last_old, high = found, high + 1
    low = found + 1
    while low < high:
        middle = (low + high) // 2
        found, received = await first_from(middle)
        if received < older_than:
            last_old, low = found, found + 1
        else:
            high = middle
    result = await conn.execute(seen_events.delete().where(rowid <= last_old))
    return result.rowcount or 0
