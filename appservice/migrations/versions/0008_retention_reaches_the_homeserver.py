"""Retention reaches the homeserver: which staff-room messages belong to which case (so a
purge can redact them), the rooms the bot could not leave after a purge (no case, no
person: only that a former member may write there), and no closed case holding the
"one active case per room and member" key.

Revision ID: 0008
Revises: 0007
"""

import datetime as dt
import json

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# The steps that posted into the staff room before this revision, and where their results
# kept the message's event id (their names are part of the record: never renamed).
_STAFF_STEPS = (
    "alert",
    "checkin_notice",
    "checkin_reminder",
    "escalate",
    "rejoin",
    "withdraw_report",
)


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("case_id", sa.Integer(), nullable=True))
        batch.create_index("ix_outbox_case_id", ["case_id"])
    posts = op.create_table(
        "staff_posts",
        sa.Column("case_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("event_id", sa.String(length=255), nullable=False),
        sa.Column("posted_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("case_id", "event_id", name="pk_staff_posts"),
    )
    op.create_table(
        "former_rooms",
        sa.Column("room_id", sa.String(length=255), nullable=False),
        sa.Column("since", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("room_id", name="pk_former_rooms"),
    )
    bind = op.get_bind()
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    found: set[tuple[int, str]] = set()
    for case_id, alert, notice in bind.execute(
        sa.text(
            "SELECT id, alert_event_id, checkin_notice_event_id FROM cases WHERE purged_at IS NULL"
        )
    ):
        found.update((case_id, event) for event in (alert, notice) if event)
    steps = ", ".join(f"'{name}'" for name in _STAFF_STEPS)
    for case_id, result in bind.execute(
        sa.text(f"SELECT case_id, result FROM case_steps WHERE step IN ({steps})")
    ):
        if isinstance(result, str):  # SQLite hands JSON back as text here
            result = json.loads(result)
        for key in ("event", "plain_first"):
            event = (result or {}).get(key)
            if isinstance(event, str):
                found.add((case_id, event))
    if found:
        op.bulk_insert(
            posts,
            [
                {"case_id": case_id, "event_id": event, "posted_at": now}
                for case_id, event in sorted(found)
            ],
        )
    # The key only keeps open cases apart: a closed case no longer holds it.
    bind.execute(sa.text("UPDATE cases SET active_key = NULL WHERE state = 'closed'"))


def downgrade() -> None:
    op.drop_table("former_rooms")
    op.drop_table("staff_posts")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_index("ix_outbox_case_id")
        batch.drop_column("case_id")
