"""On SQLite, `seen_events.received_at` is integer milliseconds since the epoch.

One row per event delivered: 26 characters of datetime text made recording a
transaction about a quarter slower than an integer does (issue 22,
bench/ingest.py). PostgreSQL keeps its timestamp (one value bound per statement).

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    # Text to milliseconds first (julianday reads the stored UTC text), then the type.
    op.execute(
        "UPDATE seen_events SET received_at ="
        " CAST(ROUND((julianday(received_at) - 2440587.5) * 86400000) AS INTEGER)"
        " WHERE typeof(received_at) = 'text'"
    )
    with op.batch_alter_table("seen_events") as batch:
        batch.alter_column("received_at", type_=sa.BigInteger(), existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("seen_events") as batch:
        batch.alter_column("received_at", type_=sa.DateTime(), existing_nullable=False)
    op.execute(
        "UPDATE seen_events SET received_at ="
        " strftime('%Y-%m-%d %H:%M:%f000', received_at / 1000.0, 'unixepoch')"
        " WHERE typeof(received_at) = 'integer'"
    )
