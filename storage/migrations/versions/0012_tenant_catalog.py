"""tenants.spec, plans, catalog_generation: tenants and plans as data in the database

Revision ID: 0012
Revises: 0011

Tenants (with their agents, rules and mailboxes) and plans are defined in the
database, so that every instance on one database serves the same ones and a
change made by the admin API or CLI reaches running daemons without a signal:
each polls catalog_generation. Existing tenants get their definition from the
configuration file on the daemon's next start (the file is applied as a
reconcile). The lifecycle columns record the plan steps the scheduler took.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("spec", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("noticed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("read_only_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "plans",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_plans")),
    )
    op.create_table(
        "catalog_generation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_catalog_generation")),
    )
    op.execute("INSERT INTO catalog_generation (id, generation) VALUES (1, 0)")


def downgrade() -> None:
    op.drop_table("catalog_generation")
    op.drop_table("plans")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("renewed_at")
        batch_op.drop_column("read_only_at")
        batch_op.drop_column("noticed_at")
        batch_op.drop_column("spec")
