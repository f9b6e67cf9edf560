"""messages.sort_*: IMAP SORT keys computed at delivery, so that SORT never reads a message

Revision ID: 0010
Revises: 0009

Rows stored before the upgrade keep NULL keys: the first SORT over them
computes their keys from the stored ENVELOPE and Subject (never the message)
and writes them back, once (gateway.imap.session.Session.cmd_sort).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_COLUMNS = ("sort_subject", "sort_from", "sort_to", "sort_cc", "sort_display_from", "sort_display_to")


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        for name in _COLUMNS:
            batch_op.add_column(sa.Column(name, sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        for name in reversed(_COLUMNS):
            batch_op.drop_column(name)
