"""outbound answers and delay notices

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbound", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("original_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True)
        )
        batch_op.add_column(
            sa.Column("delay_notified", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.create_index(batch_op.f("ix_outbound_original_id"), ["original_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_outbound_original_id_messages"),
            "messages",
            ["original_id"],
            ["id"],
            ondelete="SET NULL",
        )


def downgrade() -> None:
    with op.batch_alter_table("outbound", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_outbound_original_id_messages"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_outbound_original_id"))
        batch_op.drop_column("delay_notified")
        batch_op.drop_column("original_id")
