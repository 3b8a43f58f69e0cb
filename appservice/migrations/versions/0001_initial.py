"""Initial schema: delivery bookkeeping, inbox, cases, steps, outbox, rooms, audit chain.

Revision ID: 0001
Revises:
"""

from alembic import op

from bot.audit_chain import GENESIS_HASH
from bot.store import schema

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# The first revision creates the tables exactly as schema.py declares them at
# this revision; later revisions must spell out their changes with op.* calls.
_TABLES = [
    schema.transactions,
    schema.seen_events,
    schema.inbox,
    schema.cases,
    schema.case_steps,
    schema.outbox,
    schema.rooms,
    schema.audit_entries,
    schema.audit_head,
]


def upgrade() -> None:
    bind = op.get_bind()
    for table in _TABLES:
        table.create(bind)
    # The chain head row always exists, so appends can lock it (see store/audit.py).
    op.bulk_insert(schema.audit_head, [{"id": 1, "seq": 0, "hash": GENESIS_HASH}])


def downgrade() -> None:
    bind = op.get_bind()
    for table in reversed(_TABLES):
        table.drop(bind)
