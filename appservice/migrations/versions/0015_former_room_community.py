"""A former member who writes in a purged case's room the bot could not leave is answered
in the words, and with the crisis resources, of that case's community. Rooms recorded
before this have none (NULL): they are answered as before, in the first community's.

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("former_rooms") as batch:
        batch.add_column(sa.Column("community", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("former_rooms") as batch:
        batch.drop_column("community")
