"""Whether the member has read their notice: the notice's event and the time of the
member's first read receipt on it or after it (bot/intake/notice_reads.py).

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cases") as batch:
        batch.add_column(sa.Column("notice_event_id", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("notice_read_at", sa.DateTime(), nullable=True))
        batch.create_index("ix_cases_state", ["state", "notice_read_at"])


def downgrade() -> None:
    with op.batch_alter_table("cases") as batch:
        batch.drop_index("ix_cases_state")
        batch.drop_column("notice_read_at")
        batch.drop_column("notice_event_id")
