"""Apply the migrations shipped inside the package (``storage/migrations``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

from storage.db import Database

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration pointing at the packaged migrations."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


async def migrate(db: Database) -> None:
    """Upgrade the database schema to the newest revision."""

    def upgrade(connection: Connection) -> None:
        command.upgrade(alembic_config(connection), "head")

    async with db.writer.connect() as conn:
        await conn.run_sync(upgrade)
        await conn.commit()


async def is_current(db: Database) -> bool:
    """True when the schema is at the newest revision (read-only check)."""

    def current(connection: Connection) -> bool:
        heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
        return set(MigrationContext.configure(connection).get_current_heads()) == heads

    async with db.reader.connect() as conn:
        return await conn.run_sync(current)
