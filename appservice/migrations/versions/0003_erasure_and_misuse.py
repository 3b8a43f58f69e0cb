"""Keyed digests of personal fields, coalesced refusal reports, the pinned staff room,
and whether the bot can redact in a moderated room.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_entries") as batch:
        # Entries already written keep their plain SHA-256 digests, verifiable as before.
        batch.add_column(
            sa.Column("personal_alg", sa.String(length=16), server_default="sha256", nullable=False)
        )
    with op.batch_alter_table("rooms") as batch:
        batch.add_column(sa.Column("can_redact", sa.Boolean(), nullable=True))
    op.create_table(
        "refusal_reports",
        sa.Column("key", sa.String(length=600), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("room_id", sa.String(length=255), nullable=False),
        sa.Column("window_started_at", sa.DateTime(), nullable=False),
        sa.Column("suppressed", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_refusal_reports")),
    )
    op.create_table(
        "pinned",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=255), nullable=False),
        sa.Column("source", sa.String(length=255), nullable=False),
        sa.Column("pinned_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_pinned")),
    )


def downgrade() -> None:
    op.drop_table("pinned")
    op.drop_table("refusal_reports")
    with op.batch_alter_table("rooms") as batch:
        batch.drop_column("can_redact")
    with op.batch_alter_table("audit_entries") as batch:
        batch.drop_column("personal_alg")
