"""The configured blob store (``[blobs]``, docs/blobs.md), as the daemon and the CLI open it."""

from __future__ import annotations

from gateway.config import Config, ConfigError
from storage.blobs import BlobStore, FsBlobStore
from storage.blobs.move import Moving, location
from storage.db import Database


def blob_store(config: Config, db: Database, backend: str) -> BlobStore:
    """A store on ``backend`` with the configuration's settings (opens no connection yet)."""
    if backend == "postgresql":
        from storage.blobs.postgres import PostgresBlobStore

        if db.is_sqlite:
            raise ConfigError(['blobs.backend: "postgresql" needs a PostgreSQL gateway.database_url'])
        return PostgresBlobStore(db)
    if backend == "s3":
        from storage.blobs.s3 import S3BlobStore, S3Settings

        section = config.blobs
        if not section.s3_bucket:
            raise ConfigError(['blobs.s3_bucket: the "s3" backend needs a bucket'])

        def credentials() -> tuple[str, str] | None:
            keys = section.s3_credentials()
            return None if keys is None else (keys[0].get_secret_value(), keys[1].get_secret_value())

        settings = S3Settings(section.s3_bucket, section.s3_endpoint, section.s3_region, credentials)
        return S3BlobStore(settings)
    return FsBlobStore(config.gateway.data_dir / "blobs")


async def open_blobs(config: Config, db: Database) -> BlobStore:
    """The blob store of ``[blobs] backend``; refused when a move put the blobs elsewhere, and
    reading through to the old backend while a move is being finished (:mod:`storage.blobs.move`)."""
    where = await location(db)
    backend = config.blobs.backend
    if where is not None and where.backend != backend:
        raise ConfigError(
            [
                f'blobs.backend: the blobs were moved to "{where.backend}" by "mailgate blobs migrate" '
                f'on {where.switched_at:%Y-%m-%d %H:%M} UTC: set [blobs] backend = "{where.backend}"'
            ]
        )
    store = blob_store(config, db, backend)
    if where is not None and where.previous is not None:
        return Moving(store, blob_store(config, db, where.previous))
    return store
