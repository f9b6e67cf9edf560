"""The block DATA reader (gateway/smtp/data.py): tables, properties, aiosmtpd's reader as the oracle."""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.smtp.data import BlockDataSMTP, DataAssembler, State

LINE_LIMIT = 40
SIZE_LIMIT = 552  # bytes of content as sent


def assemble(
    stream: bytes, cuts: list[int], size_limit: int | None = SIZE_LIMIT
) -> tuple[DataAssembler, bytes | None]:
    """Feed ``stream`` cut at ``cuts``; the assembler and what followed the end mark (None: not seen)."""
    a = DataAssembler(size_limit, LINE_LIMIT)
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(stream)}), len(stream)]
    for lo, hi in itertools.pairwise(bounds):
        rest = a.feed(stream[lo:hi])
        if rest is not None:
            return a, rest + stream[hi:]
    return a, None


def every_split(stream: bytes) -> Iterator[list[int]]:
    yield []
    yield list(range(1, len(stream)))  # one byte at a time
    for i in range(1, len(stream)):
        yield [i]


SIXTEEN = (b"y" * 30 + b"\r\n") * 17  # 544 bytes of content

TABLE = [
    # stream, content (None: refused or unfinished), state, what follows the end mark
    pytest.param(b".\r\n", b"", State.NOMINAL, b"", id="empty message"),
    pytest.param(b"a\r\n.\r\n", b"a\r\n", State.NOMINAL, b"", id="one line"),
    pytest.param(b"a\r\n.\r\nQUIT\r\n", b"a\r\n", State.NOMINAL, b"QUIT\r\n", id="pipelined command kept"),
    pytest.param(b"..\r\n.\r\n", b".\r\n", State.NOMINAL, b"", id="stuffed lone dot first"),
    pytest.param(b"a\r\n..b\r\n...\r\n.\r\n", b"a\r\n.b\r\n..\r\n", State.NOMINAL, b"", id="stuffed dots"),
    pytest.param(b".a\r\n.\r\n", b"a\r\n", State.NOMINAL, b"", id="first line stuffed"),
    pytest.param(b"\r\n.\r\n", b"\r\n", State.NOMINAL, b"", id="one empty line"),
    pytest.param(b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n", State.NOMINAL, b"", id="bare LF dot is no end"),
    pytest.param(b"a\r.\rb\r\n.\r\n", b"a\r.\rb\r\n", State.NOMINAL, b"", id="bare CR dot is no end"),
    pytest.param(b"a\n.\r\nb\r\n.\r\n", b"a\n.\r\nb\r\n", State.NOMINAL, b"", id="LF dot CRLF is no end"),
    pytest.param(b"a\n.b\r\n.\r\n", b"a\n.b\r\n", State.NOMINAL, b"", id="dot after bare LF kept"),
    pytest.param(b"a\r\n. \r\n.\r\n", b"a\r\n \r\n", State.NOMINAL, b"", id="dot space is a stuffed line"),
    pytest.param(
        b"x" * 37 + b"\r\n.\r\n", b"x" * 37 + b"\r\n", State.NOMINAL, b"", id="line just under limit"
    ),
    pytest.param(b"x" * 38 + b"\r\n.\r\n", b"x" * 38 + b"\r\n", State.NOMINAL, b"", id="line at the limit"),
    pytest.param(b"x" * 39 + b"\r\n.\r\n", None, State.TOO_LONG, b"", id="line one over the limit"),
    pytest.param(
        b"a\r\n" + b"x" * 500 + b"\r\n.\r\nQUIT\r\n", None, State.TOO_LONG, b"QUIT\r\n", id="long line"
    ),
    pytest.param(
        SIXTEEN + b"y" * 6 + b"\r\n.\r\n", SIXTEEN + b"y" * 6 + b"\r\n", State.NOMINAL, b"", id="552 bytes"
    ),
    pytest.param(SIXTEEN + b"y" * 7 + b"\r\n.\r\n", None, State.TOO_MUCH, b"", id="553 bytes"),
    pytest.param(
        (b"y" * 30 + b"\r\n") * 400 + b".\r\nRSET\r\n", None, State.TOO_MUCH, b"RSET\r\n", id="far over"
    ),
]


@pytest.mark.parametrize(("stream", "content", "state", "rest"), TABLE)
def test_table(stream: bytes, content: bytes | None, state: State, rest: bytes) -> None:
    for cuts in every_split(stream) if len(stream) < 200 else [[], [100], list(range(1, len(stream), 7))]:
        a, after = assemble(stream, cuts)
        assert after == rest, cuts
        assert a.state is state, cuts
        if content is not None:
            assert a.content == content, cuts


def test_unfinished_stream_has_no_end() -> None:
    for stream in (b"a\r\n.", b"a\r\n.\r", b"a\r\n", b"", b"\r\n.\n"):
        assert assemble(stream, [])[1] is None


def test_refused_content_is_not_kept() -> None:
    """Memory stays bounded: after a refusal only the bytes that may start the end mark are held."""
    a = DataAssembler(SIZE_LIMIT, LINE_LIMIT)
    for _ in range(1000):
        assert a.feed(b"z" * 30 + b"\r\n") is None
    assert a.state is State.TOO_MUCH
    assert len(a._buf) <= 4
    assert a.feed(b".\r\n") == b""


def test_end_mark_is_not_made_of_dropped_bytes() -> None:
    """Regression: after a refusal, the CRLF standing for the start made an end mark with kept bytes."""
    a = DataAssembler(SIZE_LIMIT, LINE_LIMIT)
    assert a.feed(b"q" * 600 + b"X.\r\n") is None  # "X.\r\n" is no line of its own
    assert a.feed(b"Y\r\n.\r\n") == b""


lines = st.lists(
    st.one_of(
        st.binary(max_size=12),
        st.sampled_from([b".", b"..", b". x", b"\n.", b".\n", b"\r.", b"\r", b"\n"]),
        st.builds(lambda n: b"w" * n, st.integers(30, 45)),
    ),
    max_size=30,
).map(lambda ls: [line.replace(b"\r\n", b"\n") for line in ls])


def stuff(text_lines: list[bytes]) -> bytes:
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in text_lines)


@given(lines, st.lists(st.integers(0, 2000), max_size=8))
def test_any_split_gives_the_lines_back(text_lines: list[bytes], cuts: list[int]) -> None:
    stream = stuff(text_lines) + b".\r\nNOOP\r\n"
    a, rest = assemble(stream, cuts, size_limit=None)
    assert rest == b"NOOP\r\n"
    if a.state is State.NOMINAL:
        assert a.content == b"".join(line + b"\r\n" for line in text_lines)
        assert all(len(line) + 2 <= LINE_LIMIT for line in text_lines)
    else:
        assert a.state is State.TOO_LONG
        assert any(len(line) + 2 > LINE_LIMIT for line in text_lines)


# ---------------------------------------------------------------- aiosmtpd's own reader as the oracle


class Capture:
    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.contents.append(envelope.original_content or b"")
        return "250 2.0.0 OK"


class LineSMTP(SMTP):
    line_length_limit = LINE_LIMIT


class BlockSMTP(BlockDataSMTP):
    line_length_limit = LINE_LIMIT


@contextmanager
def connected(port: int) -> Iterator[socket.socket]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        yield sock


def converse(port: int, stream: bytes, cuts: list[int]) -> list[bytes]:
    """One transaction with ``stream`` as DATA (in pieces at ``cuts``), NOOP, QUIT; the reply codes."""
    with connected(port) as sock:
        f = sock.makefile("rb")
        replies = [f.readline()]
        for command in (b"HELO x", b"MAIL FROM:<a@b.test>", b"RCPT TO:<c@d.test>", b"DATA"):
            sock.sendall(command + b"\r\n")
            replies.append(f.readline())
        bounds = [0, *sorted({c for c in cuts if 0 < c < len(stream)}), len(stream)]
        for lo, hi in itertools.pairwise(bounds):
            sock.sendall(stream[lo:hi])
        sock.sendall(b"NOOP\r\nQUIT\r\n")
        replies += [f.readline(), f.readline(), f.readline()]
        return [r.split(b" ", 1)[0] for r in replies]


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[int, Capture, int, Capture]]:
    """aiosmtpd's SMTP and ours, same limits, on loopback, in a loop of their own thread."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    found: list[object] = []

    async def start() -> None:
        old, new = Capture(), Capture()
        a = await loop.create_server(lambda: LineSMTP(old, data_size_limit=SIZE_LIMIT), "127.0.0.1", 0)
        b = await loop.create_server(lambda: BlockSMTP(new, data_size_limit=SIZE_LIMIT), "127.0.0.1", 0)
        found.extend([a.sockets[0].getsockname()[1], old, b.sockets[0].getsockname()[1], new])
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()))
    thread.start()
    ready.wait(10)
    try:
        yield found[0], found[1], found[2], found[3]  # type: ignore[misc]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines, st.lists(st.integers(0, 2000), max_size=4), st.integers(0, 40))
def test_same_replies_and_content_as_aiosmtpd(
    servers: tuple[int, Capture, int, Capture], text_lines: list[bytes], cuts: list[int], extra: int
) -> None:
    """Dot-stuffing, bare CR/LF, split end marks, line and size (552) limits: as aiosmtpd does them."""
    old_port, old, new_port, new = servers
    stream = stuff(text_lines) + b"p" * extra * 13 + b"\r\n" * (extra > 0) + b".\r\n"
    old.contents.clear()
    new.contents.clear()
    assert converse(new_port, stream, cuts) == converse(old_port, stream, [])
    assert new.contents == old.contents
