"""Content-addressed blob stores for raw RFC 5322 messages: one interface, three backends.

Theory of operation
-------------------
A blob is a message's bytes, named by their sha256 (hex). The mail store's
rows (``messages.blob``, ``outbound.blob``) name blobs; a blob is written
before the row that names it is committed, and removed only by garbage
collection (:func:`storage.retention.collect_blobs`) when no row names it and
it was not written or reused for an hour (:meth:`BlobStore.age`).

:class:`BlobStore` is what the rest of mailgate sees. Its backends:

- :class:`~storage.blobs.fs.FsBlobStore`: a local directory (the default, one
  instance): temp file, fsync, rename, directory fsync.
- :class:`~storage.blobs.postgres.PostgresBlobStore`: rows in the PostgreSQL
  database mailgate already uses, cut into :data:`CHUNK` pieces so no value is
  large; every instance on that database reads them.
- :class:`~storage.blobs.s3.S3BlobStore`: objects in an S3-compatible bucket.

Every backend's :meth:`BlobStore.put` returns only once the bytes are
durable (fsynced, committed, or acknowledged by S3 with their checksums
checked), and storing bytes that are already there only marks them as
reused. Which backend an installation uses is ``[blobs] backend``;
:mod:`storage.blobs.move` moves the blobs from one backend to another.
"""

from __future__ import annotations

from storage.blobs.fs import FsBlobStore
from storage.blobs.interface import BACKENDS, CHUNK, Backend, BlobStore, MissingBlob

__all__ = ["BACKENDS", "CHUNK", "Backend", "BlobStore", "FsBlobStore", "MissingBlob"]
