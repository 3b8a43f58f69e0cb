"""Initial schema: delivery bookkeeping, inbox, cases, steps, outbox, rooms, audit chain.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from bot.core.audit_chain import GENESIS_HASH

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_entries",
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("case_id", sa.Integer(), nullable=True),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("facts", sa.JSON(), nullable=False),
        sa.Column("personal", sa.JSON(), nullable=True),
        sa.Column("personal_digest", sa.String(length=64), nullable=False),
        sa.Column("policy_version", sa.String(length=64), nullable=False),
        sa.Column("config_hash", sa.String(length=64), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_entries")),
    )
    op.create_index(op.f("ix_audit_entries_case_id"), "audit_entries", ["case_id"], unique=False)
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_head")),
    )
    op.create_table(
        "cases",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("room_id", sa.String(length=255), nullable=True),
        sa.Column("member_id", sa.String(length=255), nullable=True),
        sa.Column("active_key", sa.String(length=520), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("flagged_at", sa.DateTime(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("due_at", sa.DateTime(), nullable=True),
        sa.Column("dm_room_id", sa.String(length=255), nullable=True),
        sa.Column("checkin_room_id", sa.String(length=255), nullable=True),
        sa.Column("rejoined_at", sa.DateTime(), nullable=True),
        sa.Column("closed_at", sa.DateTime(), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=True),
        sa.Column("hold_reason", sa.Text(), nullable=True),
        sa.Column("purged_at", sa.DateTime(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=True),
        sa.Column("checkin_notice_event_id", sa.String(length=255), nullable=True),
        sa.Column("checkin_opened_at", sa.DateTime(), nullable=True),
        sa.Column("checkin_claimed_by", sa.String(length=255), nullable=True),
        sa.Column("checkin_staff_joined_at", sa.DateTime(), nullable=True),
        sa.Column("checkin_member_joined_at", sa.DateTime(), nullable=True),
        sa.Column("checkin_reminded_at", sa.DateTime(), nullable=True),
        sa.Column("alert_event_id", sa.String(length=255), nullable=True),
        sa.Column("alert_acked_by", sa.String(length=255), nullable=True),
        sa.Column("alert_raised_again_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cases")),
        sa.UniqueConstraint("active_key", name=op.f("uq_cases_active_key")),
    )
    op.create_index(op.f("ix_cases_alert_event_id"), "cases", ["alert_event_id"], unique=False)
    op.create_index(
        op.f("ix_cases_checkin_notice_event_id"), "cases", ["checkin_notice_event_id"], unique=False
    )
    op.create_index(op.f("ix_cases_next_attempt_at"), "cases", ["next_attempt_at"], unique=False)
    op.create_table(
        "inbox",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=255), nullable=False),
        sa.Column("room_id", sa.String(length=255), nullable=False),
        sa.Column("event_type", sa.String(length=255), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=True),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("processed_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_inbox")),
        sa.UniqueConstraint("event_id", name=op.f("uq_inbox_event_id")),
    )
    op.create_index(op.f("ix_inbox_status"), "inbox", ["status"], unique=False)
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("room_id", sa.String(length=255), nullable=False),
        sa.Column("content", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.Column("event_id", sa.String(length=255), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
    )
    op.create_index(op.f("ix_outbox_status"), "outbox", ["status"], unique=False)
    op.create_table(
        "rooms",
        sa.Column("room_id", sa.String(length=255), nullable=False),
        sa.Column("inviter", sa.String(length=255), nullable=True),
        sa.Column("joined_at", sa.DateTime(), nullable=True),
        sa.Column("can_kick", sa.Boolean(), nullable=True),
        sa.Column("left_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("room_id", name=op.f("pk_rooms")),
    )
    op.create_table(
        "seen_events",
        sa.Column("event_id", sa.String(length=255), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_seen_events")),
    )
    op.create_index(
        op.f("ix_seen_events_received_at"), "seen_events", ["received_at"], unique=False
    )
    op.create_table(
        "transactions",
        sa.Column("txn_id", sa.String(length=255), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("event_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("txn_id", name=op.f("pk_transactions")),
    )
    op.create_index(
        op.f("ix_transactions_received_at"), "transactions", ["received_at"], unique=False
    )
    op.create_table(
        "case_steps",
        sa.Column("case_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.String(length=32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("progress", sa.JSON(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["case_id"], ["cases.id"], name=op.f("fk_case_steps_case_id_cases")
        ),
        sa.PrimaryKeyConstraint("case_id", "step", name=op.f("pk_case_steps")),
    )
    # The chain head row always exists, so appends can lock it (see store/audit.py).
    audit_head = sa.table(
        "audit_head",
        sa.column("id", sa.Integer),
        sa.column("seq", sa.Integer),
        sa.column("hash", sa.String),
    )
    op.bulk_insert(audit_head, [{"id": 1, "seq": 0, "hash": GENESIS_HASH}])


def downgrade() -> None:
    # Children before parents: case_steps refers to cases.
    for table in [
        "case_steps",
        "audit_entries",
        "audit_head",
        "cases",
        "inbox",
        "outbox",
        "rooms",
        "seen_events",
        "transactions",
    ]:
        op.drop_table(table)
