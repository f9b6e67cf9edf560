"""expunges.expunged_at and folders.expunges_pruned: a bounded expunge history for IMAP QRESYNC

Revision ID: 0011
Revises: 0010

The history is pruned after storage.mailstore.EXPUNGE_HISTORY (hourly, by the
scheduler); folders.expunges_pruned remembers how far, so a client resyncing
from an older MODSEQ is answered from the folder's UIDs instead. Rows expunged
before the upgrade count as expunged at the upgrade.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("folders", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expunges_pruned", sa.BigInteger(), server_default="0", nullable=False))
    # SQLite adds no column with a non-constant default in place: the table is copied.
    with op.batch_alter_table("expunges", schema=None, recreate="always") as batch_op:
        batch_op.add_column(
            sa.Column(
                "expunged_at",
                sa.DateTime(timezone=True),
                server_default=sa.func.current_timestamp(),
                nullable=False,
            )
        )
        batch_op.create_index("ix_expunges_folder_id_modseq", ["folder_id", "modseq"], unique=False)
        batch_op.create_index("ix_expunges_expunged_at", ["expunged_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("expunges", schema=None) as batch_op:
        batch_op.drop_index("ix_expunges_expunged_at")
        batch_op.drop_index("ix_expunges_folder_id_modseq")
        batch_op.drop_column("expunged_at")
    with op.batch_alter_table("folders", schema=None) as batch_op:
        batch_op.drop_column("expunges_pruned")
