"""Cases and rooms live in a community: its staff see them, no one else's do. Every case
and room recorded before communities existed is the one community `default`'s (an
install without `communities:` is that community).

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


# Each holds what one community's staff see (refusal_reports: whose staff are told).
TABLES = ("cases", "rooms", "refusal_reports")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column(
                    "community", sa.String(length=64), nullable=False, server_default="default"
                )
            )
    op.create_index("ix_cases_community", "cases", ["community", "id"])


def downgrade() -> None:
    op.drop_index("ix_cases_community", table_name="cases")
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("community")
