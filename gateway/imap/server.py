"""The IMAP listener: the one I/O class. It owns the streams; the session decides.

Reads are fed to the :class:`Framer`; every complete command is parsed and
run by the :class:`Session`, whose buffered responses are written once per
command (a long FETCH hands them over every 256 KiB through ``session.flush``,
which waits for the socket to drain: memory stays bounded however large the
answer). The socket is corked (:class:`_Corked`): the answers to the commands
of one read, a pipelining client's run of FETCHes say, leave in one send when
the read's commands are done (or 64 KiB are waiting), not a send each.
A synchronising literal gets its ``+`` continuation here, and after
a literal the socket gets ``TCP_QUICKACK`` (clients that send a literal and
its CRLF separately, such as imaplib, otherwise wait 40 ms for a delayed ACK
on every APPEND). IDLE runs here too, because it must read ``DONE`` while it
waits for changes. After ``COMPRESS DEFLATE`` the session's reader and
writer are swapped for inflating and deflating ones (:mod:`gateway.imap.deflate`),
which the rest of this class cannot tell apart. Bounds: line and literal sizes (the framer; before login a
literal may carry only ``[limits.imap] unauthenticated_literal`` bytes, so
unauthenticated clients cannot make the daemon buffer APPEND-sized data), bad
commands per connection, idle time, and connections per listener, client
address and network (:class:`~gateway.connections.ConnectionGate`: a session
not yet logged in is *early*, may be closed to make room, and gets a shorter
idle timeout while the listener is under stress).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from gateway import metrics
from gateway.auth import Authenticator
from gateway.config import Config
from gateway.connections import ConnectionGate
from gateway.imap.commands import Authenticate
from gateway.imap.deflate import Deflate, DeflateError
from gateway.imap.index import FolderIndex
from gateway.imap.parser import (
    MAX_COMMAND_TEXT,
    Framer,
    LiteralTooLarge,
    NeedContinuation,
    NotMUTF7,
    ParseError,
    TooLong,
    is_done,
    parse,
)
from gateway.imap.parser import (
    Line as FramedLine,
)
from gateway.imap.session import APPEND_LIMIT, Session, State
from gateway.ingest import MimeWorker
from gateway.notify import Changes
from gateway.spam import Learner
from storage.blobs import BlobStore
from storage.db import Database

log = structlog.get_logger(__name__)

MAX_BAD = 20
MAX_LINE = 64 * 1024
AUTHENTICATED_TIMEOUT = 30 * 60.0
IDLE_RECHECK = 30.0  # look for changes made by other processes this often while idling


def is_loopback(host: str) -> bool:
    """Whether a peer address is on this machine."""
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _quickack(writer: _Writer) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and hasattr(socket, "TCP_QUICKACK"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


async def _send(writer: _Writer, data: bytes) -> None:
    """Write, then wait while the client is behind (back-pressure for long answers)."""
    writer.write(data)
    await writer.drain()


class _Reader(Protocol):
    """What a session reads from: the socket's stream, or its inflated form after COMPRESS."""

    async def read(self, n: int) -> bytes: ...


class _Writer(Protocol):
    """What a session writes to: the socket's stream, or its deflated form after COMPRESS."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


class _Closed(Exception):
    """The client went away or must be disconnected."""


class _Client:
    """One connection as the listener's gate sees it (:class:`gateway.connections.Tracked`)."""

    def __init__(self, ip: str, session: Session, writer: _Writer, gate: ConnectionGate) -> None:
        self.client_ip = ip
        self.session = session
        self.writer = writer
        self.gate = gate
        self.busy = True  # running a command, not waiting for the client
        self.last_active = time.monotonic()
        self.timer: asyncio.Timeout | None = None  # of the read in progress

    @property
    def early(self) -> bool:
        return self.session.state is State.NOT_AUTHENTICATED

    def idle_early_since(self) -> float | None:
        return None if self.busy or not self.early else self.last_active

    def evict(self) -> None:
        self.writer.write(b"* BYE idle too long while the server is busy\r\n")
        self.writer.close()

    def stress_changed(self) -> None:
        if self.timer is not None and self.early:
            loop_now, now = asyncio.get_running_loop().time(), time.monotonic()
            self.timer.reschedule(loop_now + self.last_active + self.gate.timeout(True) - now)

    async def read(self, reader: _Reader) -> bytes:
        """The client's next bytes; TimeoutError when it stays idle too long."""
        self.busy = False
        self.last_active = time.monotonic()
        timeout = self.gate.timeout(True) if self.early else AUTHENTICATED_TIMEOUT
        try:
            async with asyncio.timeout(timeout) as self.timer:
                return await reader.read(65536)
        finally:
            self.timer = None
            self.busy = True


class _DeflateReader:
    """The client's stream after COMPRESS DEFLATE: inflated, at most ``n`` bytes per read."""

    def __init__(self, reader: _Reader, deflate: Deflate) -> None:
        self._reader, self._deflate = reader, deflate

    async def read(self, n: int) -> bytes:
        while True:
            if self._deflate.has_pending:
                out = self._deflate.inflate(b"", n)
            else:
                data = await self._reader.read(n)
                if not data:
                    return b""
                out = self._deflate.inflate(data, n)
            if out:
                return out


class _DeflateWriter:
    """The stream to the client after COMPRESS DEFLATE: each write compressed and flushed."""

    def __init__(self, writer: _Writer, deflate: Deflate) -> None:
        self._writer, self._deflate = writer, deflate

    def write(self, data: bytes) -> None:
        if data:
            self._writer.write(self._deflate.deflate(data))

    async def drain(self) -> None:
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()

    async def wait_closed(self) -> None:
        await self._writer.wait_closed()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._writer.get_extra_info(name, default)


class _Corked:
    """The writer in front of the client's stream: writes wait in a buffer until :meth:`drain`.

    Everything that then waits for the client (the next read, a continuation, IDLE, STARTTLS)
    drains first, so nothing the client needs stays behind.
    """

    LIMIT = 64 * 1024

    def __init__(self, writer: _Writer) -> None:
        self.stream = writer
        self._pending = bytearray()

    def write(self, data: bytes) -> None:
        self._pending += data
        if len(self._pending) >= self.LIMIT:
            self.flush()

    def flush(self) -> None:
        """Hand what waits to the stream, without waiting for the client to take it."""
        if self._pending:
            self.stream.write(bytes(self._pending))
            self._pending.clear()

    async def drain(self) -> None:
        self.flush()
        await self.stream.drain()

    def close(self) -> None:
        self.flush()
        self.stream.close()

    async def wait_closed(self) -> None:
        await self.stream.wait_closed()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.stream.get_extra_info(name, default)


class IMAPServer:
    """Serves the tenants' folders to agents' mail clients."""

    def __init__(
        self,
        config: Callable[[], Config],
        db: Database,
        blobs: BlobStore,
        auth: Authenticator,
        changes: Changes,
        *,
        tls: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        name: str = "imap",
        index: FolderIndex | None = None,
        learner: Learner | None = None,
        mime: MimeWorker | None = None,
    ) -> None:
        """``mime`` examines APPENDed messages (the ingest pipeline's, in the daemon)."""
        self.config = config
        self.learner = learner
        self.mime = mime or MimeWorker()
        self.db = db
        self.blobs = blobs
        self.auth = auth
        self.changes = changes
        # The listeners of one process share one (the daemon passes it); a lone server makes its own.
        self.index = index or FolderIndex(db, changes)
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.name = name
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.Task[None], _Writer] = {}
        self.gate = ConnectionGate(lambda: self.config().limits.imap, name)

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (0: any free port)."""
        self._server = await asyncio.start_server(
            self._accept, host, port, ssl=self.tls if self.implicit_tls else None, reuse_address=True
        )

    async def start_on_socket(self, sock: socket.socket) -> None:
        """Listen on an inherited socket (systemd socket activation)."""
        self._server = await asyncio.start_server(
            self._accept, sock=sock, ssl=self.tls if self.implicit_tls else None
        )

    @property
    def port(self) -> int:
        """The bound port."""
        if self._server is None:
            raise RuntimeError("the listener is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and close every session.

        Sessions end by their connections closing (their reads return), not by
        cancellation, so a command in progress finishes its transaction.
        """
        if self._server is not None:
            self._server.close()
        clients = list(self._clients.items())
        for _, writer in clients:
            writer.write(b"* BYE server shutting down\r\n")
            writer.close()
        if clients:
            await asyncio.wait([task for task, _ in clients], timeout=30)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover (asyncio always runs a callback in a task)
            return
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) else "unknown"
        session = Session(
            config=self.config,
            db=self.db,
            blobs=self.blobs,
            auth=self.auth,
            changes=self.changes,
            index=self.index,
            peer=host,
            tls=self.implicit_tls,
            starttls_available=self.tls is not None and not self.implicit_tls,
            loopback=is_loopback(host),
            listener=self.name,
            learner=self.learner,
            mime=self.mime,
        )
        client = _Client(host, session, writer, self.gate)
        if not self.gate.admit(client):
            writer.write(b"* BYE too many connections, try again later\r\n")
            writer.close()
            return
        self._clients[task] = writer
        metrics.SESSIONS.labels(self.name).inc()
        started = time.monotonic()
        commands = 0
        try:
            commands = await self._serve(session, client, reader, writer)
        except (
            _Closed,
            ConnectionError,
            asyncio.IncompleteReadError,
            ssl.SSLError,
            TimeoutError,
            DeflateError,
        ):
            pass
        except Exception:
            log.exception("imap.session_failed", peer=host)
        finally:
            session.close()
            self.gate.release(client)
            self._clients.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            session.log.info(
                "imap.session",
                listener=self.name,
                commands=commands,
                seconds=round(time.monotonic() - started, 1),
            )

    def _limit_literals(self, framer: Framer, session: Session) -> None:
        """Before login a literal may carry a few KiB (a password), after it an APPEND's worth."""
        literal = (
            self.config().limits.imap.unauthenticated_literal
            if session.state is State.NOT_AUTHENTICATED
            else APPEND_LIMIT
        )
        framer.max_literal = literal
        framer.max_command = literal + MAX_COMMAND_TEXT

    async def _serve(self, session: Session, client: _Client, reader: _Reader, stream: _Writer) -> int:
        writer = _Corked(stream)
        framer = Framer(max_line=MAX_LINE)
        self._limit_literals(framer, session)
        session.greeting()
        writer.write(session.take())
        bad = commands = 0
        while not session.closing:
            await writer.drain()  # the answers to the last read's commands, before waiting for more
            try:
                data = await client.read(reader)
            except TimeoutError:
                writer.write(b"* BYE autologout: idle for too long\r\n")
                writer.flush()
                return commands
            if not data:
                return commands
            framer.feed(data)
            while (event := framer.next_event()) is not None:
                if isinstance(event, NeedContinuation):
                    writer.write(b"+ Ready for literal data\r\n")
                    writer.flush()  # sent now, and only then QUICKACK: sending data re-arms delayed ACKs
                    _quickack(writer)
                    continue
                if isinstance(event, TooLong | LiteralTooLarge):
                    bad += 1
                    if isinstance(event, LiteralTooLarge) and not event.synchronising:
                        writer.write(b"* BYE literal too large\r\n")
                        writer.flush()
                        return commands
                    writer.write(
                        b"* BAD "
                        + (b"[TOOBIG] " if isinstance(event, LiteralTooLarge) else b"")
                        + b"request too long\r\n"
                    )
                else:
                    if event.literals:
                        _quickack(writer)
                    commands += 1
                    bad += await self._command(session, event, reader, writer, framer)
                    self._limit_literals(framer, session)
                    if session.compressed and not isinstance(reader, _DeflateReader):
                        # "OK DEFLATE active" went out in clear; everything after is compressed.
                        await writer.drain()
                        deflate = Deflate()
                        reader = _DeflateReader(reader, deflate)
                        writer = _Corked(_DeflateWriter(stream, deflate))  # each send compressed whole
                        client.writer = writer
                        task = asyncio.current_task()
                        if task is not None and task in self._clients:
                            self._clients[task] = writer
                        framer.reset()  # the client sends nothing before it sees the OK
                    if session.closing:
                        break
                if bad > MAX_BAD:
                    writer.write(b"* BYE too many bad commands\r\n")
                    writer.flush()
                    return commands
        await writer.drain()
        return commands

    async def _command(
        self,
        session: Session,
        line: FramedLine,
        reader: _Reader,
        writer: _Writer,
        framer: Framer,
    ) -> int:
        """Run one command; returns 1 if it was bad, else 0."""
        try:
            cmd = parse(line)
        except NotMUTF7 as exc:  # as Dovecot: not a BAD; LIST and LSUB simply find nothing
            listed = exc.command in ("LIST", "LSUB")
            reply = f"OK {exc.command.capitalize()} completed" if listed else f"NO {exc.message}"
            writer.write(f"{exc.tag} {reply}\r\n".encode())
            return 0
        except ParseError as exc:
            writer.write(
                (exc.tag or "*").encode() + b" BAD " + exc.message.encode("utf-8", "replace") + b"\r\n"
            )
            return 1
        if isinstance(cmd, Authenticate) and cmd.initial is None and cmd.mechanism == "PLAIN":
            # No initial response (SASL-IR): ask for it with an empty challenge.
            writer.write(b"+ \r\n")
            await writer.drain()
            answer = await self._read_line(reader, framer)
            if answer is None or answer == b"*":
                writer.write(cmd.tag.encode() + b" BAD authentication cancelled\r\n")
                return 1
            try:
                initial = base64.b64decode(answer, validate=True)
            except binascii.Error:
                writer.write(cmd.tag.encode() + b" BAD invalid base64\r\n")
                return 1
            cmd = Authenticate(cmd.tag, cmd.name, cmd.mechanism, initial)
        session.flush = functools.partial(_send, writer)
        await session.handle(cmd)
        writer.write(session.take())
        if cmd.name == "IDLE" and session.state in (State.AUTHENTICATED, State.SELECTED):
            await self._idle(session, cmd.tag, reader, writer, framer)
        elif (
            cmd.name == "STARTTLS"
            and self.tls is not None
            and not session.tls
            and isinstance(writer, _Corked)
            and isinstance(writer.stream, asyncio.StreamWriter)
        ):
            await writer.drain()
            await writer.stream.start_tls(self.tls)
            session.tls = True
            framer.reset()
        return 0

    async def _read_line(self, reader: _Reader, framer: Framer) -> bytes | None:
        """The next line from the client (a SASL response), None if it went away."""
        while True:
            event = framer.next_event()
            if isinstance(event, FramedLine):
                return b"".join(event.parts).strip()
            if event is not None:
                return None
            timeout = self.config().limits.imap.timeout.total_seconds()
            async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel (3.11)
                data = await reader.read(65536)
            if not data:
                return None
            framer.feed(data)

    async def _idle(
        self,
        session: Session,
        tag: str,
        reader: _Reader,
        writer: _Writer,
        framer: Framer,
    ) -> None:
        writer.write(b"+ idling\r\n")
        folder_id = session.view.folder_id if session.view is not None else -1
        read = asyncio.ensure_future(reader.read(65536))
        try:
            with self.changes.watch(folder_id) as changed:
                # What was pending comes after the continuation (as Dovecot sends it), and is
                # looked up once the watch is set, so a change made meanwhile is not missed.
                await self._idle_sync(session, writer)
                deadline = time.monotonic() + AUTHENTICATED_TIMEOUT
                while True:
                    wake = asyncio.ensure_future(changed.wait())
                    done, _ = await asyncio.wait(
                        {read, wake}, timeout=IDLE_RECHECK, return_when=asyncio.FIRST_COMPLETED
                    )
                    wake.cancel()
                    if read in done:
                        data = read.result()
                        if not data:
                            raise _Closed
                        framer.feed(data)
                        event = framer.next_event()
                        if isinstance(event, FramedLine) and is_done(event):
                            await self._idle_sync(session, writer)
                            writer.write(tag.encode() + b" OK IDLE terminated\r\n")
                            return
                        if event is not None:
                            writer.write(tag.encode() + b" BAD expected DONE\r\n")
                            return
                        read = asyncio.ensure_future(reader.read(65536))
                    changed.clear()
                    await self._idle_sync(session, writer)
                    if time.monotonic() > deadline:
                        writer.write(b"* BYE idled too long\r\n")
                        raise _Closed
        finally:
            if not read.done():
                read.cancel()

    @staticmethod
    async def _idle_sync(session: Session, writer: _Writer) -> None:
        """Send what changed in the selected folder (untagged EXPUNGE is allowed during IDLE)."""
        if session.view is not None:
            await session.sync(allow_expunge=True)
            writer.write(session.take())
        await writer.drain()
