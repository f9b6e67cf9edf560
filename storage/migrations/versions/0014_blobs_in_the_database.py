"""blobs, blob_chunks, blob_location: message blobs in PostgreSQL, and where a move put them

Revision ID: 0014
Revises: 0013

With ``[blobs] backend = "postgresql"`` a blob is a ``blobs`` row (size,
created and last-touched time) and its bytes in ``blob_chunks`` rows of at
most 1 MiB each, so no single value is large and a read streams. The one
``blob_location`` row, written by ``mailgate blobs migrate``, says which
backend holds the blobs after a move (and which one still holds copies).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("chunks", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("touched_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_blobs")),
    )
    op.create_table(
        "blob_chunks",
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("n", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["digest"], ["blobs.digest"], name=op.f("fk_blob_chunks_digest_blobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("digest", "n", name=op.f("pk_blob_chunks")),
    )
    op.create_table(
        "blob_location",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("backend", sa.String(length=16), nullable=False),
        sa.Column("previous", sa.String(length=16), nullable=True),
        sa.Column("switched_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_blob_location")),
    )


def downgrade() -> None:
    op.drop_table("blob_location")
    op.drop_table("blob_chunks")
    op.drop_table("blobs")
