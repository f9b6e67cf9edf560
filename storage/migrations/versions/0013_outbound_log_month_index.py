"""outbound_log (tenant_id, event, at): a plan's monthly sending count without a table scan

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_outbound_log_tenant_id_event_at", "outbound_log", ["tenant_id", "event", "at"])


def downgrade() -> None:
    op.drop_index("ix_outbound_log_tenant_id_event_at", table_name="outbound_log")
