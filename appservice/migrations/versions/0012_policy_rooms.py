"""The DMs in which members who sent `!policy` were told how safeguarding works
(bot/members/policy.py).

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "policy_rooms",
        sa.Column("user_id", sa.String(length=255), primary_key=True),
        sa.Column("room_id", sa.String(length=255), nullable=False, unique=True),
        sa.Column("opened_at", sa.DateTime(), nullable=False),
        sa.Column("last_sent_at", sa.DateTime(), nullable=True),
        sa.Column("last_reply_at", sa.DateTime(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("policy_rooms")
