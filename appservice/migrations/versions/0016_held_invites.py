"""An invite held for staff to claim (`!rooms claim`) outlives a restart: the homeserver
shows a pending invite to a sync only once, so one kept in memory alone could never be
claimed after the service restarted.

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "held_invites",
        sa.Column("room_id", sa.String(length=255), nullable=False),
        sa.Column("communities", sa.JSON(), nullable=False),
        sa.Column("since", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("room_id", name="pk_held_invites"),
    )


def downgrade() -> None:
    op.drop_table("held_invites")
