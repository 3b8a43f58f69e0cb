"""The tables, as SQLAlchemy Core metadata shared by the store and the migrations."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    }
)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes on every backend (SQLite keeps no zone, so we store naive UTC)."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored: use aware UTC")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Any:
        return None if value is None else value.replace(tzinfo=dt.UTC)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def epoch_millis(value: dt.datetime) -> int:
    """An aware datetime as whole milliseconds since the Unix epoch."""
    return (value - _EPOCH) // dt.timedelta(milliseconds=1)


class EpochMillis(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes stored as integer milliseconds since the epoch.

    For SQLite's `seen_events`, one row per event delivered: an 8-byte integer where a
    datetime is 26 characters of text, which made recording a transaction about a
    quarter slower (measured for issue 22). The intake's hot path binds the integer
    itself (`epoch_millis`); everything else reads and writes datetimes through this."""

    impl = sa.BigInteger
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored: use aware UTC")
        return epoch_millis(value)

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Any:
        return None if value is None else _EPOCH + dt.timedelta(milliseconds=value)


# Every transaction id Synapse sent, so a retried transaction is acknowledged
# without reprocessing, across restarts. Pruned after database.dedupe_retention_days.
transactions = sa.Table(
    "transactions",
    metadata,
    sa.Column("txn_id", sa.String(255), primary_key=True),
    sa.Column("received_at", UTCDateTime, nullable=False, index=True),
    sa.Column("event_count", sa.Integer, nullable=False),
)

# Every event id delivered: an event redelivered in a new transaction is not processed twice.
seen_events = sa.Table(
    "seen_events",
    metadata,
    sa.Column("event_id", sa.String(255), primary_key=True),
    # PostgreSQL keeps a timestamp: its statement binds one value for every row.
    sa.Column("received_at", UTCDateTime().with_variant(EpochMillis(), "sqlite"), nullable=False),
)
# For the prune only, so as cheap to keep as can be: on PostgreSQL a BRIN index (the
# column only grows); SQLite has none and prunes by rowid (bot/store/ingest.py).
sa.Index("ix_seen_events_received_at", seen_events.c.received_at, postgresql_using="brin").ddl_if(
    dialect="postgresql"
)

# Events that may need acting on (flags, memberships, power levels, DM replies,
# staff commands), written in the same DB transaction as the acknowledgement and
# processed in the background. The payload is cleared once processed (no chat
# text is kept).
inbox = sa.Table(
    "inbox",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(255), nullable=False, unique=True),
    sa.Column("room_id", sa.String(255), nullable=False),
    sa.Column("event_type", sa.String(255), nullable=False),
    sa.Column("payload", sa.JSON, nullable=True),
    sa.Column("received_at", UTCDateTime, nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),  # pending|done|failed
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("processed_at", UTCDateTime, nullable=True),
    # Flags have a lane of their own, so a moderator's flag never waits behind
    # command replies, refusal reports or an event being retried.
    sa.Column("lane", sa.SmallInteger, nullable=False, server_default="1"),
    # An event whose handling failed is retried from here, without holding up the rest.
    sa.Column("next_attempt_at", UTCDateTime, nullable=True),
    # Found by reconciliation (the homeserver never delivered it), not by a transaction.
    sa.Column("caught_up", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("ix_inbox_lane_pending", "lane", "status", "seq"),
)

cases = sa.Table(
    "cases",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),  # the case number
    sa.Column("room_id", sa.String(255), nullable=True),  # nullable: purged by retention
    sa.Column("member_id", sa.String(255), nullable=True),
    # "<room>|<member>" while the case is the member's active case in that room,
    # NULL once they rejoin or the case closes: the unique constraint makes "one active
    # case per (room, member)" hold even when two moderators flag at the same instant.
    sa.Column("active_key", sa.String(520), nullable=True, unique=True),
    sa.Column("state", sa.String(16), nullable=False),  # open|closed
    sa.Column("dry_run", sa.Boolean, nullable=False),
    sa.Column("flagged_at", UTCDateTime, nullable=False),
    sa.Column("received_at", UTCDateTime, nullable=False),
    sa.Column("due_at", UTCDateTime, nullable=True),
    sa.Column("dm_room_id", sa.String(255), nullable=True),
    sa.Column("checkin_room_id", sa.String(255), nullable=True),
    sa.Column("rejoined_at", UTCDateTime, nullable=True),
    sa.Column("closed_at", UTCDateTime, nullable=True),
    sa.Column("outcome", sa.Text, nullable=True),
    sa.Column("hold_reason", sa.Text, nullable=True),
    sa.Column("purged_at", UTCDateTime, nullable=True),
    sa.Column("next_attempt_at", UTCDateTime, nullable=True, index=True),
    # Random per case: the bot's rooms and messages are marked with it (see Case.tag).
    sa.Column("nonce", sa.String(32), nullable=True),
    # The check-in's life after it opens: the staff-room notice staff claim with ✋,
    # who claimed it, when staff first joined, and whether staff were reminded.
    sa.Column("checkin_notice_event_id", sa.String(255), nullable=True, index=True),
    sa.Column("checkin_opened_at", UTCDateTime, nullable=True),
    sa.Column("checkin_claimed_by", sa.String(255), nullable=True),
    sa.Column("checkin_staff_joined_at", UTCDateTime, nullable=True),
    sa.Column("checkin_member_joined_at", UTCDateTime, nullable=True),
    sa.Column("checkin_reminded_at", UTCDateTime, nullable=True),
    sa.Column("alert_event_id", sa.String(255), nullable=True, index=True),
    sa.Column("alert_acked_by", sa.String(255), nullable=True),
    sa.Column("alert_raised_again_at", UTCDateTime, nullable=True),
    sa.Column("dealt_with_at", UTCDateTime, nullable=True),
    sa.Column("debrief_room_id", sa.String(255), nullable=True),
    # The member's notice (its event in their DM) and when they read it: the time of
    # their first read receipt on it or after it (bot/intake/notice_reads.py).
    sa.Column("notice_event_id", sa.String(255), nullable=True),
    sa.Column("notice_read_at", UTCDateTime, nullable=True),
    # The community the case lives in (its room's): its staff see it, no one else's do.
    # Every case of an install without `communities:` is the one community `default`'s.
    sa.Column("community", sa.String(64), nullable=False, server_default="default"),
    # The DMs whose notice is still unread are found among open cases at every sync: the
    # index keeps that proportional to them, not to every case ever.
    sa.Index("ix_cases_state", "state", "notice_read_at"),
    # `!case list` and `!case N` read one community's cases, in number order.
    sa.Index("ix_cases_community", "community", "id"),
)

case_steps = sa.Table(
    "case_steps",
    metadata,
    sa.Column("case_id", sa.Integer, sa.ForeignKey("cases.id"), primary_key=True),
    sa.Column("step", sa.String(32), primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    # pending -> started (intent written) -> done|failed|skipped
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("started_at", UTCDateTime, nullable=True),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    sa.Column("progress", sa.JSON, nullable=True),  # ids learnt mid-step (e.g. the DM room)
    sa.Column("result", sa.JSON, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    # Not before this time: a retry's backoff (the step's own due time is derived).
    sa.Column("not_before", UTCDateTime, nullable=True),
    # Refusals and errors that were not outages, so far: bounded before the step fails.
    sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
    # Unfinished and failed steps of one kind (an alert not yet posted), read by /health.
    sa.Index("ix_case_steps_status_step", "status", "step"),
)

# Messages that must reach a room exactly once but belong to no case step
# (refusal reports, relays of the member's replies, room-joined notices).
outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("room_id", sa.String(255), nullable=False),
    sa.Column("content", sa.JSON, nullable=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),  # pending|sent|failed
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("sent_at", UTCDateTime, nullable=True),
    sa.Column("event_id", sa.String(255), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", UTCDateTime, nullable=True),
    # Sent in the clear whatever the room (the bot's encryption is failing): such a
    # message says nothing of any case.
    sa.Column("plain", sa.Boolean, nullable=False, server_default=sa.false()),
    # The case it tells of (None: none), so retention can redact it once sent.
    sa.Column("case_id", sa.Integer, nullable=True, index=True),
)

# The staff-room messages a case's steps posted (the alert, its notices and reminders),
# so retention can redact them: what the outbox sent for a case is on its own row.
staff_posts = sa.Table(
    "staff_posts",
    metadata,
    sa.Column("case_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("event_id", sa.String(255), primary_key=True),
    sa.Column("posted_at", UTCDateTime, nullable=False),
)

# Rooms of purged cases the bot could not leave: no case and no person, only that whoever
# writes there is a former member, told where to get help now (bot/staff/relay.py), in
# the words and with the crisis resources of the case's community (NULL: purged before
# communities were recorded here, the first community's).
former_rooms = sa.Table(
    "former_rooms",
    metadata,
    sa.Column("room_id", sa.String(255), primary_key=True),
    sa.Column("since", UTCDateTime, nullable=False),
    sa.Column("community", sa.String(64), nullable=True),
)

# Invites of the bot into a room of no community, from someone who is staff of several
# (`communities`, a list of their ids): neither joined nor declined until the staff of one
# of them claim it (`!rooms claim`). Kept here, as the homeserver shows a pending invite
# to a sync only once: forgotten in a restart, it could never be claimed.
held_invites = sa.Table(
    "held_invites",
    metadata,
    sa.Column("room_id", sa.String(255), primary_key=True),
    sa.Column("communities", sa.JSON, nullable=False),
    sa.Column("since", UTCDateTime, nullable=False),
)

# Where the service last read each watched room's timeline up to (a stream token),
# so events the homeserver never delivered can be caught up after a gap.
room_positions = sa.Table(
    "room_positions",
    metadata,
    sa.Column("room_id", sa.String(255), primary_key=True),
    sa.Column("token", sa.Text, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

# One row, rewritten by /health: a committed write is the only proof the database
# can record (a read, or a rolled-back write, succeeds on a full disk).
heartbeat = sa.Table(
    "heartbeat",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("at", UTCDateTime, nullable=False),
)

# One row: when this database first started (an older database: when it was upgraded to
# have this). Catch-up never feeds what happened before it (bot/intake/reconcile.py).
database_info = sa.Table(
    "database_info",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("first_started_at", UTCDateTime, nullable=False),
)

# Rooms the bot moderates, and what it last told staff about its kick power there.
rooms = sa.Table(
    "rooms",
    metadata,
    sa.Column("room_id", sa.String(255), primary_key=True),
    sa.Column("inviter", sa.String(255), nullable=True),
    sa.Column("joined_at", UTCDateTime, nullable=True),
    sa.Column("can_kick", sa.Boolean, nullable=True),
    sa.Column("left_at", UTCDateTime, nullable=True),
    sa.Column("can_redact", sa.Boolean, nullable=True),
    # The community it belongs to: listed by it, or added by its staff (bot/community).
    sa.Column("community", sa.String(64), nullable=False, server_default="default"),
)

# A moderated room that was upgraded (a tombstone from someone with the power to send it):
# the replacement it names, until the bot has joined it and moderates it
# (bot/moderation/upgrades.py).
room_upgrades = sa.Table(
    "room_upgrades",
    metadata,
    sa.Column("new_room_id", sa.String(255), primary_key=True),
    sa.Column("old_room_id", sa.String(255), nullable=False),
    sa.Column("upgraded_by", sa.String(255), nullable=False),
    sa.Column("upgraded_at", UTCDateTime, nullable=False),
    sa.Column("followed_at", UTCDateTime, nullable=True),
)

# The DM in which a member who sent `!policy` was told how safeguarding works here
# (bot/members/policy.py): one per member, kept for the next time they ask. It holds
# nothing about any case.
policy_rooms = sa.Table(
    "policy_rooms",
    metadata,
    sa.Column("user_id", sa.String(255), primary_key=True),
    sa.Column("room_id", sa.String(255), nullable=False, unique=True),
    sa.Column("opened_at", UTCDateTime, nullable=False),
    sa.Column("last_sent_at", UTCDateTime, nullable=True),
    sa.Column("last_reply_at", UTCDateTime, nullable=True),
    # The community the member last asked in: what they write there is answered in its
    # words (its language, its crisis resources).
    sa.Column("community", sa.String(64), nullable=False, server_default="default"),
)

# Refusals from one person in one room are reported to staff once per window (the
# rest counted, and told in one message when the window ends). See bot/rooms/refusal_reports.py.
refusal_reports = sa.Table(
    "refusal_reports",
    metadata,
    sa.Column("key", sa.String(600), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("actor", sa.String(255), nullable=False),
    sa.Column("room_id", sa.String(255), nullable=False),
    sa.Column("window_started_at", UTCDateTime, nullable=False),
    sa.Column("suppressed", sa.Integer, nullable=False, server_default="0"),
    # Whose staff are told: each community's windows are summarised to its staff alone.
    sa.Column("community", sa.String(64), nullable=False, server_default="default"),
)

# What the service settled once and must not let drift: the staff room an alias
# resolved to the first time (an alias moved later is a squatter's move, not ours).
pinned = sa.Table(
    "pinned",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
    sa.Column("source", sa.String(255), nullable=False),
    sa.Column("pinned_at", UTCDateTime, nullable=False),
)

# DM rooms the bot made ahead of any flag, with no one else in them, so a flagged
# member is told with one invite and one message instead of a room creation first
# (bot/rooms/ready_rooms.py). A row is written before its room is created (room_id empty
# until then: a creation cut short is finished, by its marker, not repeated) and
# deleted in the transaction that hands its room to a case.
ready_rooms = sa.Table(
    "ready_rooms",
    metadata,
    sa.Column("marker", sa.String(64), primary_key=True),
    sa.Column("room_id", sa.String(255), nullable=True),
    sa.Column("encrypted", sa.Boolean, nullable=False),
    sa.Column("planned_at", UTCDateTime, nullable=False),
)

# A member's notice sent ahead of their case (bot/steps/notify_ahead.py): decided as the
# flag's push was recorded, with the DM room made ahead it took, in the same transaction
# (so a crash between the notice and the case finds it here, and sends nothing twice).
# The case that opens for the member in that room takes it over, and deletes the row.
notices_ahead = sa.Table(
    "notices_ahead",
    metadata,
    sa.Column("flag_event_id", sa.String(255), primary_key=True),
    sa.Column("group_room_id", sa.String(255), nullable=False),
    sa.Column("member_id", sa.String(255), nullable=False),
    sa.Column("room_id", sa.String(255), nullable=False),  # the DM room made ahead
    sa.Column("nonce", sa.String(32), nullable=False),  # the case's, chosen ahead of it
    sa.Column("reserved_at", UTCDateTime, nullable=False),
)

# The append-only, hash-chained audit log. `personal` holds the personal fields
# (user ids, room ids, references, notes) apart from `facts`, and the hash
# covers only their digest, so retention can erase them and the chain still verifies.
audit_entries = sa.Table(
    "audit_entries",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("case_id", sa.Integer, nullable=True, index=True),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("facts", sa.JSON, nullable=False),
    sa.Column("personal", sa.JSON, nullable=True),
    sa.Column("personal_digest", sa.String(64), nullable=False),
    # How personal_digest was made: "hmac-sha256" (keyed, the default) or "sha256"
    # (entries written before keyed digests; kept verifiable as they were).
    sa.Column("personal_alg", sa.String(16), nullable=False, server_default="sha256"),
    sa.Column("policy_version", sa.String(64), nullable=False),
    sa.Column("config_hash", sa.String(64), nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

# One row: the chain head. Appends lock it, so two writers cannot fork the chain.
audit_head = sa.Table(
    "audit_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)
