"""Discretion and follow-through: when staff first dealt with a case, and the new steps.

Cases opened before this version get the new steps (redacting the flag and the
flagged message, the moderator's debrief) as skipped: nothing is done to old cases.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_NEW_STEPS = (("redact_flag", 9), ("redact_message", 10), ("debrief", 11))


def upgrade() -> None:
    with op.batch_alter_table("cases") as batch:
        batch.add_column(sa.Column("dealt_with_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("debrief_room_id", sa.String(length=255), nullable=True))
    for step, position in _NEW_STEPS:
        op.execute(
            sa.text(
                "INSERT INTO case_steps (case_id, step, position, status, attempts, failures) "
                f"SELECT c.id, '{step}', {position}, 'skipped', 0, 0 FROM cases c "
                "WHERE NOT EXISTS (SELECT 1 FROM case_steps s "
                f"WHERE s.case_id = c.id AND s.step = '{step}')"
            )
        )


def downgrade() -> None:
    op.execute(
        sa.text("DELETE FROM case_steps WHERE step IN ('redact_flag', 'redact_message', 'debrief')")
    )
    with op.batch_alter_table("cases") as batch:
        batch.drop_column("debrief_room_id")
        batch.drop_column("dealt_with_at")
