"""The typed adapter over aioimaplib: the only module that imports it.

aioimaplib's limits, measured here, shape this module:

* it parses a response recursively, one frame per line, so one read of more
  than about 1000 lines never completes: bodies are fetched in small batches
  and UIDs are learned with ``UID SEARCH`` (one line), never ``FETCH 1:*``;
* a command on a dropped connection waits forever: every command races a
  timeout and the connection-lost callback;
* it has no STARTTLS and no generic AUTHENTICATE: STARTTLS is done here (the
  command, then the event loop's ``start_tls`` on the same protocol, then
  CAPABILITY again), as are the SASL exchanges of OAUTHBEARER and XOAUTH2
  (an initial response, and the empty answer to an error challenge);
  passwords go with LOGIN.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from base64 import b64encode
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import aioimaplib
from pydantic import SecretStr

from gateway import mutf7, oauth2
from gateway.imap import wire

T = TypeVar("T")

_FETCH_START = re.compile(rb"^\d+ FETCH \(")
_UID = re.compile(rb"\bUID (\d+)")
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_UIDNEXT = re.compile(rb"\[UIDNEXT (\d+)\]")
_EXISTS = re.compile(rb"^(\d+) EXISTS$")


class UpstreamError(Exception):
    """A network or protocol failure talking to an upstream server (retry later)."""


class AuthFailed(UpstreamError):
    """The upstream server refused our credentials."""


@dataclass(frozen=True, slots=True)
class Selected:
    """What SELECT told us about a folder."""

    uidvalidity: int
    exists: int
    uidnext: int | None


def uid_set(uids: Iterable[int]) -> str:
    """Compress UIDs into an IMAP sequence set: ``1:3,7,9:10``."""
    return wire.uid_set(uids).decode()


def parse_fetch(lines: list[Any]) -> tuple[dict[int, bytes], dict[int, int]]:
    """Bodies and sizes by UID from a ``UID FETCH`` response's lines.

    A FETCH record is a text line opening ``N FETCH (``, optionally a literal
    (the body, a bytearray), and more text; UID may come before or after the
    literal.
    """
    bodies: dict[int, bytes] = {}
    sizes: dict[int, int] = {}
    text = b""
    body: bytes | None = None

    def flush() -> None:
        m = _UID.search(text)
        if m:
            uid = int(m.group(1))
            if body is not None:
                bodies[uid] = body
            size = _SIZE.search(text)
            if size:
                sizes[uid] = int(size.group(1))

    for line in lines:
        if isinstance(line, bytearray):
            body = bytes(line)
            continue
        if _FETCH_START.match(line):
            flush()
            text, body = line, None
        else:
            text += b" " + line
    flush()
    return bodies, sizes


class UpstreamIMAP:
    """One connection to an upstream IMAP server."""

    def __init__(self, client: Any, lost: asyncio.Future[None], timeout: float) -> None:
        self._client = client
        self._lost = lost
        self.timeout = timeout

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        security: Literal["none", "starttls", "tls"],
        tls: ssl.SSLContext | None = None,
        command_timeout: float = 60.0,
    ) -> UpstreamIMAP:
        """Connect, read the greeting, and with ``starttls`` upgrade before anything else is said.

        ``tls`` (default: the system's trust) verifies the server for ``tls`` and ``starttls``.
        A server that does not offer STARTTLS, or refuses it, is left at once: no credentials
        ever cross a connection meant to be encrypted that is not.
        """
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[None] = loop.create_future()

        def on_lost(exc: Exception | None) -> None:
            if not lost.done():
                lost.set_result(None)

        context = (tls or ssl.create_default_context()) if security != "none" else None
        try:
            tls_now = context if security == "tls" else None
            client = _IMAP4(host, port, timeout=command_timeout, conn_lost_cb=on_lost, ssl_context=tls_now)
            await client.wait_hello_from_server()
        except (OSError, TimeoutError, aioimaplib.AioImapException) as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: {exc or type(exc).__name__}") from None
        upstream = cls(client, lost, command_timeout)
        if security == "starttls" and context is not None:
            try:
                await upstream._starttls(host, context)
            except BaseException:
                await upstream.logout()
                raise
        return upstream

    async def _starttls(self, host: str, context: ssl.SSLContext) -> None:
        protocol = self._client.protocol
        if "STARTTLS" not in self.capabilities:
            raise UpstreamError(
                f'{host} does not offer STARTTLS (security = "starttls"): not sending the credentials; '
                'use security = "tls" on its implicit-TLS port if it has one'
            )
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
        self._ok("STARTTLS", await self._run("STARTTLS", protocol.execute(command)))
        try:
            protocol.transport = await self._run(
                "STARTTLS",
                protocol.loop.start_tls(protocol.transport, protocol, context, server_hostname=host),
            )
        except UpstreamError as exc:
            raise UpstreamError(f"TLS handshake after STARTTLS with {host} failed: {exc}") from None
        protocol.incomplete_line = b""  # nothing said before the handshake counts after it
        await self._run("CAPABILITY", protocol.capability())  # RFC 3501 6.2.1: learn them again

    @property
    def capabilities(self) -> frozenset[str]:
        """The server's capabilities (upper-case)."""
        return frozenset(c.upper() for c in self._client.protocol.capabilities)

    async def _run(self, what: str, coro: Awaitable[T], seconds: float | None = None) -> T:
        """Run one command, failing fast if the connection drops or it times out."""
        task = asyncio.ensure_future(coro)
        racers: set[asyncio.Future[Any]] = {task, self._lost}
        done, _ = await asyncio.wait(
            racers, timeout=seconds or self.timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            try:
                return task.result()
            except (OSError, TimeoutError, aioimaplib.AioImapException, ValueError) as exc:
                raise UpstreamError(f"{what}: {exc or type(exc).__name__}") from None
        task.cancel()
        raise UpstreamError(f"{what}: {'connection lost' if self._lost.done() else 'timed out'}")

    @staticmethod
    def _ok(what: str, response: Any) -> list[Any]:
        if response.result != "OK":
            text = b" ".join(line for line in response.lines if isinstance(line, bytes))
            raise UpstreamError(f"{what} refused: {text.decode('utf-8', 'replace')[:200]}")
        return list(response.lines)

    async def login(self, user: str, password: str) -> None:
        """LOGIN; :class:`AuthFailed` when refused."""
        response = await self._run("LOGIN", self._client.login(user, password))
        if response.result != "OK":
            raise AuthFailed("the server refused the login")

    async def authenticate_oauth2(self, user: str, host: str, port: int, token: SecretStr) -> str:
        """AUTHENTICATE OAUTHBEARER or XOAUTH2, whichever the server offers (that order): the one used.

        :class:`AuthFailed` when the server offers neither or refuses the token.
        """
        offered = {c.removeprefix("AUTH=") for c in self.capabilities if c.startswith("AUTH=")}
        mech = oauth2.mechanism(offered)
        if mech is None:
            raise AuthFailed("the server offers neither AUTH=OAUTHBEARER nor AUTH=XOAUTH2")
        protocol = self._client.protocol
        initial = b64encode(oauth2.initial_response(mech, user, host, port, token)).decode()
        command = _SASL(protocol, oauth2.ABORT[mech], "AUTHENTICATE", protocol.new_tag(), mech, initial)
        response = await self._run("AUTHENTICATE", protocol.execute(command, scrub=initial))
        if response.result != "OK":
            raise AuthFailed(f"the server refused the OAuth2 token ({mech})")
        protocol.state = aioimaplib.AUTH
        await self._run("CAPABILITY", protocol.capability())  # those after login may differ
        return mech

    async def select(self, folder: str) -> Selected:
        """SELECT a folder."""
        lines = self._ok(f"SELECT {folder}", await self._run("SELECT", self._client.select(_quote(folder))))
        uidvalidity, uidnext, exists = None, None, 0
        for line in lines:
            if not isinstance(line, bytes):
                continue
            if m := _UIDVALIDITY.search(line):
                uidvalidity = int(m.group(1))
            if m := _UIDNEXT.search(line):
                uidnext = int(m.group(1))
            if m := _EXISTS.match(line):
                exists = int(m.group(1))
        if uidvalidity is None:
            raise UpstreamError(f"SELECT {folder}: no UIDVALIDITY")
        return Selected(uidvalidity, exists, uidnext)

    async def search(self, *criteria: str) -> list[int]:
        """UID SEARCH; the matching UIDs, ascending."""
        lines = self._ok(
            "UID SEARCH", await self._run("UID SEARCH", self._client.uid_search(*criteria, charset=None))
        )
        uids: list[int] = []
        # Untagged lines come with or without their "SEARCH" keyword (aioimaplib
        # strips it); the last line is the tagged completion text.
        for line in lines[:-1]:
            if isinstance(line, bytes):
                words = line.split()
                if words[:1] == [b"SEARCH"]:
                    words = words[1:]
                if all(w.isdigit() for w in words):
                    uids += [int(w) for w in words]
        return sorted(uids)

    async def sizes(self, uids: Iterable[int]) -> dict[int, int]:
        """RFC822.SIZE of each UID (call with small batches)."""
        response = await self._run("UID FETCH", self._client.uid("fetch", uid_set(uids), "(UID RFC822.SIZE)"))
        return parse_fetch(self._ok("UID FETCH", response))[1]

    async def fetch(self, uids: Iterable[int]) -> dict[int, bytes]:
        """The raw bytes of each UID, without marking them read (call with small batches)."""
        # The protocol-level call times out on inactivity (its timer restarts with
        # every chunk received); _run caps the whole batch.
        protocol = self._client.protocol
        command = _Fetch(
            protocol.new_tag(),
            uid_set(uids),
            "(UID BODY.PEEK[])",
            prefix="UID",
            loop=protocol.loop,
            timeout=self.timeout,
        )
        response = await self._run("UID FETCH", protocol.execute(command), seconds=self.timeout * 10)
        return parse_fetch(self._ok("UID FETCH", response))[0]

    async def add_flags(self, uids: Iterable[int], flags: str) -> None:
        """UID STORE +FLAGS.SILENT."""
        self._ok(
            "UID STORE",
            await self._run(
                "UID STORE", self._client.uid("store", uid_set(uids), "+FLAGS.SILENT", f"({flags})")
            ),
        )

    async def delete(self, uids: list[int]) -> None:
        """Remove messages: ``\\Deleted`` then UID EXPUNGE (UIDPLUS) or EXPUNGE."""
        await self.add_flags(uids, "\\Deleted")
        if "UIDPLUS" in self.capabilities:
            self._ok(
                "UID EXPUNGE", await self._run("UID EXPUNGE", self._client.uid("expunge", uid_set(uids)))
            )
        else:
            self._ok("EXPUNGE", await self._run("EXPUNGE", self._client.expunge()))

    async def move(self, uids: list[int], folder: str) -> None:
        """Move messages to another upstream folder (MOVE, or COPY and delete)."""
        if "MOVE" in self.capabilities:
            self._ok(
                "UID MOVE",
                await self._run("UID MOVE", self._client.uid("move", uid_set(uids), _quote(folder))),
            )
            return
        self._ok(
            "UID COPY", await self._run("UID COPY", self._client.uid("copy", uid_set(uids), _quote(folder)))
        )
        await self.delete(uids)

    async def idle(self, seconds: float) -> bool:
        """IDLE for up to ``seconds``; True when the server reported a change."""
        if "IDLE" not in self.capabilities:
            raise UpstreamError("the server does not offer IDLE")
        idle = await self._run("IDLE", self._client.idle_start(timeout=seconds))
        try:
            pushed = await self._run(
                "IDLE", self._client.wait_server_push(timeout=seconds), seconds=seconds + 5
            )
        except UpstreamError:
            if self._lost.done():
                raise
            pushed = []
        finally:
            if not self._lost.done():
                self._client.idle_done()
        await self._run("IDLE", idle)
        return pushed != aioimaplib.STOP_WAIT_SERVER_PUSH and bool(pushed)

    async def logout(self) -> None:
        """LOGOUT, ignoring failures: the connection is going away anyway."""
        if not self._lost.done():
            with contextlib.suppress(UpstreamError):
                await self._run("LOGOUT", self._client.logout(), seconds=5)
        transport = getattr(self._client.protocol, "transport", None)
        if transport is not None:
            transport.close()


class _Protocol(aioimaplib.IMAP4ClientProtocol):  # type: ignore[misc]
    """aioimaplib's protocol without its debug line per received chunk, which it formats even
    when debug logging is off (41 us per 10 KB message fetched, docs/benchmarks.md)."""

    incomplete_line: bytes
    current_command: Any

    def data_received(self, d: bytes) -> None:
        try:
            self._handle_responses(self.incomplete_line + d, self._handle_line, self.current_command)
            self.incomplete_line = b""
            self.current_command = None
        except aioimaplib.IncompleteRead as incomplete_read:
            self.current_command = incomplete_read.cmd
            self.incomplete_line = incomplete_read.data


class _IMAP4(aioimaplib.IMAP4):  # type: ignore[misc]
    """aioimaplib's client on :class:`_Protocol` (TLS from the start when given ``ssl_context``)."""

    def create_client(
        self,
        host: str,
        port: int,
        loop: asyncio.AbstractEventLoop | None,
        conn_lost_cb: Callable[[Exception | None], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        loop = loop or asyncio.get_running_loop()
        self.protocol = _Protocol(loop, conn_lost_cb)
        connecting = loop.create_connection(lambda: self.protocol, host, port, ssl=ssl_context)
        self._client_task = loop.create_task(connecting)


class _Fetch(aioimaplib.FetchCommand):  # type: ignore[misc]
    """A FETCH that counts the open parentheses of its current record as lines arrive:
    aioimaplib's rescans (and joins) every line of the response so far on each line, which is
    quadratic in a batch. The same answer: a record is complete when its text lines balance."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._open = 0

    def append_to_resp(self, line: bytes, result: str = "Pending") -> None:
        super().append_to_resp(line, result)
        if isinstance(line, bytes):  # not a literal (a bytearray)
            if self.FETCH_MESSAGE_DATA_RE.match(line):
                self._open = 0
            self._open += line.count(b"(") - line.count(b")")

    def wait_data(self) -> bool:
        return self._open != 0


class _SASL(aioimaplib.Command):  # type: ignore[misc]
    """AUTHENTICATE with an initial response: a challenge after it is an error, answered with ``abort``."""

    def __init__(self, protocol: Any, abort: bytes, *args: str) -> None:
        super().__init__(*args, loop=protocol.loop)
        self._protocol, self._abort = protocol, abort

    def append_to_resp(self, line: bytes, result: str = "Pending") -> None:
        super().append_to_resp(line, result)
        if result == "Pending" and line.startswith(b"+"):
            self._protocol.transport.write(b64encode(self._abort) + b"\r\n")


def _quote(folder: str) -> str:
    """A folder name as an IMAP quoted string (modified UTF-7 for non-ASCII)."""
    return '"' + mutf7.encode(folder).replace("\\", "\\\\").replace('"', '\\"') + '"'
