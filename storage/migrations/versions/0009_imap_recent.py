"""folders.recent_uid: the first UID no IMAP session has taken \\Recent for

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("folders", schema=None) as batch_op:
        batch_op.add_column(sa.Column("recent_uid", sa.BigInteger(), server_default="1", nullable=False))
    # Messages stored before the upgrade are nobody's news: no session gets \Recent for them.
    op.execute("UPDATE folders SET recent_uid = uidnext")


def downgrade() -> None:
    with op.batch_alter_table("folders", schema=None) as batch_op:
        batch_op.drop_column("recent_uid")
