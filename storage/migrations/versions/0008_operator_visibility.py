"""queue ids and history, Sent copies by agent, upstream waiting list, quota deferrals

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("outbound", schema=None) as batch_op:
        batch_op.add_column(sa.Column("queue_id", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("message_id", sa.Text(), nullable=True))
        batch_op.create_unique_constraint(batch_op.f("uq_outbound_queue_id"), ["queue_id"])
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("submitted_by", _ID, nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_messages_submitted_by_agents"),
            "agents",
            ["submitted_by"],
            ["id"],
            ondelete="SET NULL",
        )
    op.create_table(
        "outbound_log",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("queue_id", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.Column("recipient", sa.String(length=320), nullable=True),
        sa.Column("smarthost", sa.String(length=255), nullable=True),
        sa.Column("reply", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_outbound_log_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbound_log")),
    )
    op.create_index(op.f("ix_outbound_log_queue_id"), "outbound_log", ["queue_id"], unique=False)
    op.create_table(
        "upstream_waiting",
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("mailbox", sa.String(length=255), nullable=False),
        sa.Column("folder", sa.String(length=255), nullable=False),
        sa.Column("uid", sa.BigInteger(), nullable=False),
        sa.Column("uidvalidity", sa.BigInteger(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_upstream_waiting_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "mailbox", "folder", "uid", name=op.f("pk_upstream_waiting")),
    )
    op.create_table(
        "quota_deferrals",
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("messages", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_quota_deferrals_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "source", name=op.f("pk_quota_deferrals")),
    )


def downgrade() -> None:
    op.drop_table("quota_deferrals")
    op.drop_table("upstream_waiting")
    op.drop_index(op.f("ix_outbound_log_queue_id"), table_name="outbound_log")
    op.drop_table("outbound_log")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_messages_submitted_by_agents"), type_="foreignkey")
        batch_op.drop_column("submitted_by")
    with op.batch_alter_table("outbound", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_outbound_queue_id"), type_="unique")
        batch_op.drop_column("message_id")
        batch_op.drop_column("queue_id")
