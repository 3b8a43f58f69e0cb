"""Room upgrades followed: a moderated room's replacement, until the bot moderates it
(bot/moderation/upgrades.py).

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "room_upgrades",
        sa.Column("new_room_id", sa.String(length=255), primary_key=True),
        sa.Column("old_room_id", sa.String(length=255), nullable=False),
        sa.Column("upgraded_by", sa.String(length=255), nullable=False),
        sa.Column("upgraded_at", sa.DateTime(), nullable=False),
        sa.Column("followed_at", sa.DateTime(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("room_upgrades")
