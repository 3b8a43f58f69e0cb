"""DM rooms made ahead of any flag (bot/rooms/ready_rooms.py).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ready_rooms",
        sa.Column("marker", sa.String(length=64), nullable=False),
        sa.Column("room_id", sa.String(length=255), nullable=True),
        sa.Column("encrypted", sa.Boolean(), nullable=False),
        sa.Column("planned_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("marker", name="pk_ready_rooms"),
    )


def downgrade() -> None:
    op.drop_table("ready_rooms")
