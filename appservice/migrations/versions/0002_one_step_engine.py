"""One step engine: step due times and bounded retries, inbox lanes, catch-up positions.

Every case gains the steps that used to live outside the step list (the check-in's
staff notice, its reminder, the alert's escalation); their status is derived from
the columns that recorded them before.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# (step, position) added to every existing case; frozen here, as migrations must be.
_NEW_STEPS = (("checkin_notice", 6), ("checkin_reminder", 7), ("escalate", 8))


def upgrade() -> None:
    with op.batch_alter_table("inbox") as batch:
        batch.add_column(sa.Column("lane", sa.SmallInteger(), server_default="1", nullable=False))
        batch.add_column(sa.Column("next_attempt_at", sa.DateTime(), nullable=True))
        batch.add_column(
            sa.Column("caught_up", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch.create_index("ix_inbox_lane_pending", ["lane", "status", "seq"], unique=False)
    with op.batch_alter_table("cases") as batch:
        # Existing cases keep no nonce: their markers stay as they were.
        batch.add_column(sa.Column("nonce", sa.String(length=32), nullable=True))
    with op.batch_alter_table("case_steps") as batch:
        batch.add_column(sa.Column("not_before", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("failures", sa.Integer(), server_default="0", nullable=False))
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("failures", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("next_attempt_at", sa.DateTime(), nullable=True))
    op.create_table(
        "room_positions",
        sa.Column("room_id", sa.String(length=255), nullable=False),
        sa.Column("token", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("room_id", name=op.f("pk_room_positions")),
    )
    op.create_table(
        "heartbeat",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_heartbeat")),
    )
    _add_steps_to_existing_cases()


def _add_steps_to_existing_cases() -> None:
    """What the old columns recorded becomes each new step's status."""
    statuses = {
        "checkin_notice": (
            "CASE WHEN c.checkin_notice_event_id IS NOT NULL THEN 'done' "
            "WHEN c.state = 'closed' THEN 'skipped' ELSE 'pending' END"
        ),
        "checkin_reminder": (
            "CASE WHEN c.checkin_reminded_at IS NOT NULL THEN 'done' "
            "WHEN c.checkin_claimed_by IS NOT NULL OR c.checkin_staff_joined_at IS NOT NULL "
            "OR c.state = 'closed' THEN 'skipped' ELSE 'pending' END"
        ),
        "escalate": (
            "CASE WHEN c.alert_raised_again_at IS NOT NULL THEN 'done' "
            "WHEN c.alert_acked_by IS NOT NULL OR c.state = 'closed' THEN 'skipped' "
            "ELSE 'pending' END"
        ),
    }
    for step, position in _NEW_STEPS:
        op.execute(
            sa.text(
                "INSERT INTO case_steps (case_id, step, position, status, attempts, failures) "
                f"SELECT c.id, '{step}', {position}, {statuses[step]}, 0, 0 FROM cases c "
                "WHERE NOT EXISTS (SELECT 1 FROM case_steps s "
                f"WHERE s.case_id = c.id AND s.step = '{step}')"
            )
        )
    # Cases with work left are looked at again at once: the engine works out what is due.
    op.execute(
        sa.text(
            "UPDATE cases SET next_attempt_at = received_at WHERE id IN "
            "(SELECT case_id FROM case_steps WHERE status IN ('pending', 'started'))"
        )
    )


def downgrade() -> None:
    op.execute(
        sa.text(
            "DELETE FROM case_steps WHERE step IN "
            "('checkin_notice', 'checkin_reminder', 'escalate')"
        )
    )
    op.drop_table("heartbeat")
    op.drop_table("room_positions")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("next_attempt_at")
        batch.drop_column("failures")
    with op.batch_alter_table("case_steps") as batch:
        batch.drop_column("failures")
        batch.drop_column("not_before")
    with op.batch_alter_table("cases") as batch:
        batch.drop_column("nonce")
    with op.batch_alter_table("inbox") as batch:
        batch.drop_index("ix_inbox_lane_pending")
        batch.drop_column("caught_up")
        batch.drop_column("next_attempt_at")
        batch.drop_column("lane")
