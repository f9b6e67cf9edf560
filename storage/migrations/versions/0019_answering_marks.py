"""answering_marks: agents' saved draft replies, while they mark the customer message (issue #19)

Revision ID: 0019
Revises: 0018
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "answering_marks",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("agent_id", BIG_ID, nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("draft_folder_id", BIG_ID, nullable=False),
        sa.Column("draft_uid", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_answering_marks_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name=op.f("fk_answering_marks_agent_id_agents"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["draft_folder_id"],
            ["folders.id"],
            name=op.f("fk_answering_marks_draft_folder_id_folders"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_answering_marks")),
    )
    op.create_index("ix_answering_marks_tenant_id_target", "answering_marks", ["tenant_id", "target"])
    op.create_index("ix_answering_marks_created_at", "answering_marks", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_answering_marks_created_at", table_name="answering_marks")
    op.drop_index("ix_answering_marks_tenant_id_target", table_name="answering_marks")
    op.drop_table("answering_marks")
