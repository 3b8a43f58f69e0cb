"""Recording an event id costs one index, not two.

Every event Synapse delivers adds a row to `seen_events`; its B-tree index on
`received_at` (used only by the daily prune) cost about a sixth of the time it
takes to record a transaction on SQLite. SQLite now prunes by rowid, which grows
with arrival (bot/store/ingest.py); PostgreSQL keeps a BRIN index, which suits a
column that only grows and costs next to nothing to keep up.

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_INDEX = "ix_seen_events_received_at"


def upgrade() -> None:
    op.drop_index(_INDEX, table_name="seen_events")
    if op.get_bind().dialect.name == "postgresql":
        op.create_index(_INDEX, "seen_events", ["received_at"], postgresql_using="brin")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index(_INDEX, table_name="seen_events")
    op.create_index(_INDEX, "seen_events", ["received_at"], unique=False)
