"""Steps found by what they are doing (an alert not yet posted, a step that raised), at a
cost that does not grow with every case ever opened; staff messages that go in the clear
(encryption failing: they say nothing of any case); when this database first started
(catch-up never feeds what happened before it).

Revision ID: 0007
Revises: 0006
"""

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_case_steps_status_step", "case_steps", ["status", "step"])
    info = op.create_table(
        "database_info",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("first_started_at", sa.DateTime(), nullable=False),
    )
    # An existing database started when its first audit entry or case was recorded (every
    # start of the service records something only once it has something to record; a
    # database with neither has nothing catch-up could have missed). Naive UTC, as every
    # time here is stored (bot/store/schema.py: UTCDateTime).
    earliest = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT min(t) FROM (SELECT min(at) AS t FROM audit_entries "
                "UNION ALL SELECT min(received_at) FROM cases) AS known"
            )
        )
        .scalar()
    )
    if isinstance(earliest, str):  # SQLite answers min() of a datetime column as text
        earliest = dt.datetime.fromisoformat(earliest)
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    op.bulk_insert(info, [{"id": 1, "first_started_at": earliest or now}])
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(
            sa.Column("plain", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    op.drop_table("database_info")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("plain")
    op.drop_index("ix_case_steps_status_step", table_name="case_steps")
