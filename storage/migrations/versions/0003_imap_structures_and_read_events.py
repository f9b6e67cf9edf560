"""imap structures and read events

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index(
            "uq_events_read",
            ["agent_id", "message_id"],
            unique=True,
            sqlite_where=sa.text("kind = 'read'"),
            postgresql_where=sa.text("kind = 'read'"),
        )

    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("envelope", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("bodystructure", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("body", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("body")
        batch_op.drop_column("bodystructure")
        batch_op.drop_column("envelope")

    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_events_read", sqlite_where=sa.text("kind = 'read'"), postgresql_where=sa.text("kind = 'read'")
        )
