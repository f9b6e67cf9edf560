"""The blob store on each backend (local directory, PostgreSQL, S3 on moto's server), and moves
between backends with ``mailgate blobs migrate``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import signal
import smtplib
import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from sqlalchemy import func, select

from gateway.blobs import blob_store, open_blobs
from gateway.cli import main
from gateway.config import Config, ConfigError, parse_config
from gateway.daemon import open_store
from gateway.ingest import Delivery, Pipeline
from storage import retention
from storage.blobs import CHUNK, BlobStore, FsBlobStore, MissingBlob
from storage.blobs.fs import _make_dirs
from storage.blobs.s3 import S3BlobStore
from storage.db import Database
from storage.migrate import migrate
from storage.models import BlobChunk, Message
from tests import procfs
from tests.conftest import config_dict, free_port, new_database, on_every_blob_backend, s3_bucket
from tests.daemon import Daemon, write_config


@on_every_blob_backend
async def test_a_blob_is_named_by_its_sha256_and_stored_once(blobs: BlobStore) -> None:
    data = b"Subject: x\r\n\r\nbody\r\n"
    digest = await blobs.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert await blobs.put(data) == digest
    assert await blobs.get(digest) == data
    assert await blobs.exists(digest)
    other = await blobs.put(b"")  # an empty message is a blob too
    assert await blobs.get_many([digest, other, digest], len(data) * 2) == [data, b"", data]
    assert [d async for d in blobs.digests()] in ([digest, other], [other, digest])


@on_every_blob_backend
async def test_put_many_stores_a_batch_once_each_in_order(blobs: BlobStore) -> None:
    known = await blobs.put(b"stored before")
    batch = [b"one", b"stored before", b"two", b"one", b""]
    digests = await blobs.put_many(batch)
    assert digests == [hashlib.sha256(d).hexdigest() for d in batch]
    assert digests[1] == known
    assert await blobs.get_many(digests, 20) == batch
    assert sorted([d async for d in blobs.digests()]) == sorted(set(digests))


@on_every_blob_backend
async def test_a_missing_blob_is_missing_blob_on_every_read(blobs: BlobStore) -> None:
    absent = hashlib.sha256(b"never stored").hexdigest()
    present = await blobs.put(b"here")
    assert not await blobs.exists(absent)
    assert await blobs.age(absent, time.time()) is None
    with pytest.raises(MissingBlob):
        await blobs.get(absent)
    with pytest.raises(MissingBlob):
        await blobs.get_many([present, absent], 4)
    with pytest.raises(MissingBlob):
        [chunk async for chunk in blobs.stream(absent)]
    await blobs.delete(absent)  # deleting nothing is no error


@on_every_blob_backend
async def test_garbage_collection_spares_a_blob_reused_within_the_grace(
    blobs: BlobStore, tmp_path: Path
) -> None:
    """Unreferenced blobs go once untouched for BLOB_GRACE; a put of the same bytes renews that."""
    old, reused = await blobs.put(b"old"), await blobs.put(b"reused")
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'rows.db'}")  # no row references either blob
    try:
        await migrate(db)
        later = time.time() + retention.BLOB_GRACE + 5
        age = await blobs.age(old, later)
        assert age is not None
        assert retention.BLOB_GRACE < age < retention.BLOB_GRACE + 60
        assert await retention.collect_blobs(db, blobs, [old], time.time()) == 0  # within the grace
        assert await retention.collect_blobs(db, blobs, [old], later) == 1
        assert not await blobs.exists(old)
        await asyncio.sleep(1.1)  # S3 keeps LastModified in whole seconds
        first = await blobs.age(reused, later)
        await blobs.put(b"reused")
        renewed = await blobs.age(reused, later)
        assert first is not None
        assert renewed is not None
        assert renewed < first
    finally:
        await db.close()


@on_every_blob_backend
async def test_a_50_mb_blob_streams_in_pieces_of_at_most_1_mib(blobs: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(1 << 20) * 50
    digest = await blobs.put(data)
    sizes: list[int] = []
    h = hashlib.sha256()
    async for chunk in blobs.stream(digest):
        sizes.append(len(chunk))
        h.update(chunk)
    assert h.hexdigest() == digest
    assert sum(sizes) == len(data)
    assert max(sizes) <= CHUNK
    if hasattr(blobs, "db"):  # PostgreSQL: fifty rows, none larger than a chunk
        async with blobs.db.read() as s:
            rows = await s.execute(
                select(func.count(), func.max(func.length(BlobChunk.data))).where(BlobChunk.digest == digest)
            )
            assert tuple(rows.one()) == (50, CHUNK)


def test_the_local_directory_writes_atomically_under_ab_cd(tmp_path: Path) -> None:
    store = FsBlobStore(tmp_path / "blobs")
    data = b"Subject: x\r\n\r\nbody\r\n"
    digest = store.put_sync(data)
    assert store.path(digest).read_bytes() == data
    assert store.put_sync(data) == digest
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []
    assert store.path(digest).relative_to(tmp_path / "blobs").parts == (digest[:2], digest[2:4], digest)


def test_only_a_new_directorys_parent_is_fsynced(tmp_path: Path) -> None:
    """Regression (2026-12-04, strace of 100 APPENDs: four fsyncs each, Dovecot one and 2.5
    fdatasyncs): a blob in a new ``cd`` under an existing ``ab`` fsynced the store's root too."""
    root = tmp_path / "blobs"
    root.mkdir()
    assert _make_dirs(root / "ab" / "cd") == [root, root / "ab"]  # both new
    assert _make_dirs(root / "ab" / "ce") == [root / "ab"]  # only cd is new: not the root
    assert _make_dirs(root / "ab" / "ce") == []
    assert (root / "ab" / "ce").is_dir()


async def test_the_blob_writer_process_answers_concurrent_batches_each_in_order(tmp_path: Path) -> None:
    """Regression (2026-12-05, issue #13): the daemon's blob thread waited for the GIL after each
    of its system calls while the event loop ran a transaction (strace: 0.3-0.8 ms each), so an
    APPEND's 0.6 ms blob took 2-2.5 ms. The writes now go to a child process; concurrent batches
    share it, are answered in order, and are durable files once answered."""
    store = FsBlobStore(tmp_path / "blobs")
    try:
        batches = [[b"%d-%d" % (i, j) * (1000 * j + 1) for j in range(i % 4)] for i in range(40)]
        answers = await asyncio.gather(*(store.put_many(batch) for batch in batches))
        for batch, digests in zip(batches, answers, strict=True):
            assert digests == [hashlib.sha256(d).hexdigest() for d in batch]
            assert [store.path(d).read_bytes() for d in digests] == batch
        child = store._writer._child._running
        assert child is not None
    finally:
        await store.close()
    assert child.process.returncode == 0  # stdin closed: it ended by itself
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []


async def test_a_killed_blob_writer_loses_no_acknowledged_blob_and_the_next_write_starts_another(
    tmp_path: Path,
) -> None:
    """A write the child never answered fails with OSError (so nothing names its blob); the next
    write starts a new child."""
    store = FsBlobStore(tmp_path / "blobs")
    try:
        first = await store.put(b"before")
        child = store._writer._child._running
        assert child is not None
        child.process.kill()  # before the next batch reaches it
        with pytest.raises(OSError, match="writer process exited before answering"):
            await store.put(b"while it died")
        second = await store.put(b"after")
        assert store._writer._child._running is not child
        assert store.path(first).read_bytes() == b"before"
        assert store.path(second).read_bytes() == b"after"
    finally:
        await store.close()


def _blob_writers(parent: int) -> list[int]:
    """The blob writer processes whose parent is ``parent``."""
    found = []
    for pid, fields in procfs.stats():
        if int(fields[1]) == parent:
            with contextlib.suppress(OSError):
                if b"storage.blobs.writer" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
    return found


def _gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":  # exited; its parent (init, once the daemon is gone) reaps it
            return True
        time.sleep(0.05)
    return False


def test_the_blob_writer_ends_with_the_daemon_stopped_or_killed(tmp_path: Path) -> None:
    """The daemon's blob writer process (2026-12-05) outlives it neither after SIGTERM (the
    daemon closes its pipe) nor after kill -9 (the kernel does), so nothing is left behind."""
    port = free_port()
    config = write_config(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'mailgate.db'}", port)
    d = Daemon(config, port, tmp_path)
    try:
        for how in (signal.SIGTERM, signal.SIGKILL):
            d.start()
            assert d.proc is not None
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                smtp.sendmail("a@example.org", ["biuro@acme.test"], b"Subject: %d\r\n\r\nbody\r\n" % how)
            (writer,) = _blob_writers(d.proc.pid)
            status = d.signal(how)
            assert status == (0 if how == signal.SIGTERM else -signal.SIGKILL)
            assert _gone(writer), f"the blob writer {writer} outlived the daemon ({how!r})"
        assert sum(d.folders("acme").values()) == 2
    finally:
        d.stop()


@pytest.mark.parametrize("blob_backend", ["s3"], indirect=True)
async def test_s3_put_sends_md5_and_sha256_for_the_server_to_check(blobs: BlobStore) -> None:
    assert isinstance(blobs, S3BlobStore)
    data = b"checked by the server"
    s3 = await blobs._s3()
    sent: list[dict[str, Any]] = []
    s3.meta.events.register("before-send.s3.PutObject", lambda request, **_: sent.append(request.headers))
    digest = await blobs.put(data)
    sha256 = base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert sent[0]["Content-MD5"] == base64.b64encode(hashlib.md5(data).digest())  # noqa: S324 (what S3 wants)
    assert sent[0]["x-amz-checksum-sha256"] == sha256.encode()
    head = await s3.head_object(Bucket=blobs.settings.bucket, Key=blobs.key(digest), ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == sha256


# --------------------------------------------------------------------------- moves between backends


def mail(n: int) -> bytes:
    return f"From: c{n}@example.org\r\nTo: biuro@acme.test\r\nSubject: m {n}\r\n\r\nbody {n}\r\n".encode()


async def cli(path: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    umask = os.umask(0o022)  # main() sets the daemon's umask for the process: give the test's back
    os.umask(umask)
    try:
        code = await asyncio.to_thread(main, ["-c", str(path), *args])
    finally:
        os.umask(umask)
    out, err = capsys.readouterr()
    return code, out + err


async def contents(config: Config) -> dict[str, str]:
    """Every message's blob digest -> the sha256 of the bytes the configured store gives back."""
    db, store = await open_store(config)
    try:
        async with db.read() as s:
            digests = sorted(set(await s.scalars(select(Message.blob))))
        return {d: hashlib.sha256(await store.get(d)).hexdigest() for d in digests}
    finally:
        await store.close()
        await db.close()


async def count(config: Config, db: Database, backend: str) -> int:
    store = blob_store(config, db, backend)
    try:
        return len([d async for d in store.digests()])
    finally:
        await store.close()


async def test_migrate_fs_to_postgresql_to_s3_to_fs_keeps_every_message(
    tmp_path: Path, s3_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with new_database("postgresql", tmp_path / "unused.db") as url:
        data: dict[str, Any] = config_dict(tmp_path, url)
        data["blobs"] = {"backend": "fs", **await s3_bucket(s3_server, tmp_path)}
        path = tmp_path / "mailgate.toml"

        def configure(backend: str) -> Config:
            data["blobs"]["backend"] = backend
            path.write_bytes(tomli_w.dumps(data).encode())
            return parse_config(data)

        config = configure("fs")
        db, store = await open_store(config)
        pipeline = Pipeline(db, store)
        for n in range(6):
            await pipeline.deliver(config.tenant("acme"), mail(n), Delivery(source="smtp"))
        await pipeline.deliver(config.tenant("acme"), mail(0), Delivery(source="smtp"))  # shares a blob
        expected = await contents(config)
        assert len(expected) == 6
        assert all(k == v for k, v in expected.items())

        # fs -> postgresql, the daemon's file still saying "fs": copy, verify, switch; nothing deleted.
        code, out = await cli(path, "blobs", "migrate", "--to", "postgresql", capsys=capsys)
        assert code == 0, out
        assert "6 verified on postgresql" in out
        assert "switched" in out
        assert 'backend = "postgresql"' in out
        assert await count(config, db, "fs") == 6
        with pytest.raises(ConfigError, match="moved to"):
            await open_blobs(config, db)  # a daemon on the old backend refuses to start
        # The old daemon stores a message after the copy; the new one, on postgresql before the command's
        # second run, reads that blob from the local directory and writes new ones to PostgreSQL.
        await pipeline.deliver(config.tenant("acme"), mail(100), Delivery(source="smtp"))
        config = configure("postgresql")
        _, moving = await open_store(config, db)
        await Pipeline(db, moving).deliver(config.tenant("acme"), mail(7), Delivery(source="smtp"))
        await moving.close()
        expected = await contents(config)
        assert len(expected) == 8
        code, out = await cli(path, "blobs", "migrate", "--to", "postgresql", capsys=capsys)
        assert code == 0, out
        assert "copied 1 blob(s) written meanwhile" in out
        assert "the move to postgresql is complete" in out
        assert await count(config, db, "fs") == 0
        assert await contents(config) == expected

        # postgresql -> s3 with the file already saying "s3" (daemon stopped): one run does it all.
        config = configure("s3")
        code, out = await cli(path, "blobs", "migrate", "--to", "s3", capsys=capsys)
        assert code == 0, out
        assert "8 verified on s3" in out
        assert "the move to s3 is complete" in out
        assert await count(config, db, "postgresql") == 0
        assert await contents(config) == expected

        # s3 -> fs, run twice over: the second run has nothing left to do.
        code, out = await cli(path, "blobs", "migrate", "--to", "fs", capsys=capsys)
        assert code == 0, out
        assert 'set [blobs] backend = "fs"' in out
        config = configure("fs")
        for _ in range(2):
            code, out = await cli(path, "blobs", "migrate", "--to", "fs", capsys=capsys)
            assert code == 0, out
        assert "the blobs are on fs; nothing to move" in out
        assert await count(config, db, "s3") == 0
        assert await contents(config) == expected
        await db.close()


async def test_migrate_refuses_to_switch_when_a_blob_is_lost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with new_database("postgresql", tmp_path / "unused.db") as url:
        data = config_dict(tmp_path, url)
        path = tmp_path / "mailgate.toml"
        path.write_bytes(tomli_w.dumps(data).encode())
        config = parse_config(data)
        db, store = await open_store(config)
        pipeline = Pipeline(db, store)
        await pipeline.deliver(config.tenant("acme"), mail(1), Delivery(source="smtp"))
        await pipeline.deliver(config.tenant("acme"), mail(2), Delivery(source="smtp"))
        assert isinstance(store, FsBlobStore)
        async with db.read() as s:
            digest = await s.scalar(select(Message.blob).where(Message.subject == "m 2"))
        assert digest is not None
        store.path(digest).unlink()
        code, out = await cli(path, "blobs", "migrate", "--to", "postgresql", capsys=capsys)
        assert code == 1
        assert f"1 blob(s) named by messages are on neither backend: {digest}" in out
        _, again = await open_store(config, db)  # nothing switched: the daemon starts on fs
        assert isinstance(again, FsBlobStore)
        await db.close()
