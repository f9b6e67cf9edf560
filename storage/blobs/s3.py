"""The S3 backend: blobs as objects in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, ...).

A blob is the object ``blobs/<sha256>``. :meth:`S3BlobStore.put` sends it
with ``Content-MD5`` and ``x-amz-checksum-sha256``: the server refuses a body
that does not match either, so a PUT that succeeded stored exactly these
bytes, durably as the service defines it. Storing bytes that are there
already PUTs them again, which renews the object's ``LastModified`` (its
last write or reuse, what garbage collection's grace reads) at the cost of
one upload; messages stored twice are mostly small.

The client (aiobotocore, one connection pool) is opened on first use and
closed by :meth:`S3BlobStore.close`. Credentials come from the
``s3_access_key_file`` / ``s3_secret_key_file`` files, read when the client
opens; without them, the standard AWS credential chain applies.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from storage.blobs.interface import CHUNK, HASH_INLINE, MissingBlob

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

PREFIX = "blobs/"
PARALLEL_GETS = 16  # objects fetched at once by get_many
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")


@dataclass(frozen=True)
class S3Settings:
    """Where the bucket is; ``credentials`` reads the access and secret key (None: AWS's chain)."""

    bucket: str
    endpoint: str = ""  # "" : AWS
    region: str = ""
    credentials: Callable[[], tuple[str, str] | None] = lambda: None


class S3BlobStore:
    """Blobs as objects ``blobs/<sha256>`` in one bucket."""

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self._stack = AsyncExitStack()
        self._client: S3Client | None = None
        self._opening = asyncio.Lock()

    async def _s3(self) -> S3Client:
        if self._client is None:
            async with self._opening:
                if self._client is None:
                    self._client = await self._open()
        return self._client

    async def _open(self) -> S3Client:
        s = self.settings
        keys = await asyncio.to_thread(s.credentials)
        config = AioConfig(
            s3={"addressing_style": "path"} if s.endpoint else {},
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
        )
        client: S3Client = await self._stack.enter_async_context(
            get_session().create_client(
                "s3",
                region_name=s.region or "us-east-1",
                endpoint_url=s.endpoint or None,
                aws_access_key_id=keys[0] if keys else None,
                aws_secret_access_key=keys[1] if keys else None,
                config=config,
            )
        )
        return client

    @staticmethod
    def key(digest: str) -> str:
        """The object key of a blob."""
        return PREFIX + digest

    async def put(self, data: bytes) -> str:
        """Upload ``data`` with its MD5 and sha256 for the server to check; its sha256 hex digest."""
        digest, md5 = await _hashes(data)
        sha = base64.b64encode(bytes.fromhex(digest)).decode()
        s3 = await self._s3()
        reply = await s3.put_object(
            Bucket=self.settings.bucket,
            Key=self.key(digest),
            Body=data,
            ContentMD5=base64.b64encode(md5).decode(),
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=sha,
        )
        echoed = reply.get("ChecksumSHA256")
        if echoed is not None and echoed != sha:
            raise OSError(f"S3 stored blob {digest} with sha256 {echoed}")
        return digest

    async def put_many(self, datas: Sequence[bytes]) -> list[str]:
        return [await self.put(data) for data in datas]

    async def get(self, digest: str) -> bytes:
        """The object's bytes."""
        s3 = await self._s3()
        try:
            reply = await s3.get_object(Bucket=self.settings.bucket, Key=self.key(digest))
        except ClientError as exc:
            raise _missing(exc, digest) from None
        async with reply["Body"] as body:
            return await body.read()

    async def get_many(self, digests: Sequence[str], size: int) -> list[bytes]:
        """Several objects, :data:`PARALLEL_GETS` requests at a time."""
        limit = asyncio.Semaphore(PARALLEL_GETS)

        async def one(digest: str) -> bytes:
            async with limit:
                return await self.get(digest)

        return list(await asyncio.gather(*map(one, digests)))

    async def stream(self, digest: str) -> AsyncIterator[bytes]:
        """The object's body in pieces of at most :data:`CHUNK` bytes."""
        s3 = await self._s3()
        try:
            reply = await s3.get_object(Bucket=self.settings.bucket, Key=self.key(digest))
        except ClientError as exc:
            raise _missing(exc, digest) from None
        async with reply["Body"] as body:
            async for chunk in body.iter_chunks(CHUNK):
                yield chunk

    async def exists(self, digest: str) -> bool:
        """True when the object is there."""
        return await self.age(digest, 0.0) is not None

    async def age(self, digest: str, now: float) -> float | None:
        """Seconds since the object was last PUT."""
        s3 = await self._s3()
        try:
            head = await s3.head_object(Bucket=self.settings.bucket, Key=self.key(digest))
        except ClientError as exc:
            if isinstance(_missing(exc, digest), MissingBlob):
                return None
            raise
        return now - head["LastModified"].timestamp()

    async def delete(self, digest: str) -> None:
        """Remove the object."""
        s3 = await self._s3()
        await s3.delete_object(Bucket=self.settings.bucket, Key=self.key(digest))

    async def digests(self) -> AsyncIterator[str]:
        """Every blob's digest, a listing page at a time."""
        s3 = await self._s3()
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.settings.bucket, Prefix=PREFIX)
        async for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"].removeprefix(PREFIX)

    async def close(self) -> None:
        """Close the client and its connections."""
        await self._stack.aclose()
        self._client = None


def _missing(exc: ClientError, digest: str) -> Exception:
    """A missing object as :class:`MissingBlob`; any other error as it is."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return MissingBlob(f"no blob {digest}") if code in _NOT_FOUND else exc


async def _hashes(data: bytes) -> tuple[str, bytes]:
    """sha256 (hex) and MD5 (raw) of ``data``, in a thread for more than :data:`HASH_INLINE` bytes."""

    def both() -> tuple[str, bytes]:
        return hashlib.sha256(data).hexdigest(), hashlib.md5(data, usedforsecurity=False).digest()

    return both() if len(data) <= HASH_INLINE else await asyncio.to_thread(both)
