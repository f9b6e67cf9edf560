"""upstream_leases: which instance pulls each upstream folder, and until when

Revision ID: 0015
Revises: 0014

One row per (tenant, mailbox, upstream folder) that an instance holds or
held: the holder's instance id, when it took the lease and when the lease
runs out unless renewed (``storage.leases``). A released lease's row is
deleted; an expired one stays until another instance takes it over.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "upstream_leases",
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("mailbox", sa.String(length=255), nullable=False),
        sa.Column("folder", sa.String(length=255), nullable=False),
        sa.Column("holder", sa.String(length=255), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_upstream_leases_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "mailbox", "folder", name=op.f("pk_upstream_leases")),
    )
    op.create_index(op.f("ix_upstream_leases_holder"), "upstream_leases", ["holder"])


def downgrade() -> None:
    op.drop_index(op.f("ix_upstream_leases_holder"), table_name="upstream_leases")
    op.drop_table("upstream_leases")
