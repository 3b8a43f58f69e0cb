"""A member's `!policy` DM answers in the words of the community they last asked in: its
crisis resources, its language. DMs opened before communities existed are the one
community `default`'s.

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("policy_rooms") as batch:
        batch.add_column(
            sa.Column("community", sa.String(length=64), nullable=False, server_default="default")
        )


def downgrade() -> None:
    with op.batch_alter_table("policy_rooms") as batch:
        batch.drop_column("community")
