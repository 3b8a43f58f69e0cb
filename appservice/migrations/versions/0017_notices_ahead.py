"""A member's notice sent ahead of their case: the DM room made ahead it took and the
case's nonce, recorded with the flag's push (bot/steps/notify_ahead.py).

Revision ID: 0017
Revises: 0016
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notices_ahead",
        sa.Column("flag_event_id", sa.String(length=255), nullable=False),
        sa.Column("group_room_id", sa.String(length=255), nullable=False),
        sa.Column("member_id", sa.String(length=255), nullable=False),
        sa.Column("room_id", sa.String(length=255), nullable=False),
        sa.Column("nonce", sa.String(length=32), nullable=False),
        sa.Column("reserved_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("flag_event_id", name="pk_notices_ahead"),
    )


def downgrade() -> None:
    op.drop_table("notices_ahead")
