"""The IMAP listener's corked writer: the answers to one read's commands leave in one send."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.imap import server
from gateway.imap.server import _Corked
from tests import test_imap
from tests.test_imap import Server, run

imap_fixture = test_imap.imap  # the in-process IMAP server of test_imap, on both engines


class Stream:
    """Records what reaches the socket's stream."""

    def __init__(self) -> None:
        self.sends: list[bytes] = []
        self.drained = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sends.append(data)

    async def drain(self) -> None:
        self.drained += 1

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        return None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def test_pipelined_answers_wait_for_the_drain_and_leave_in_one_send() -> None:
    stream = Stream()
    corked = _Corked(stream)
    for i in range(100):
        corked.write(b"* %d FETCH (FLAGS ())\r\na%d OK FETCH completed\r\n" % (i, i))
    assert stream.sends == []
    await corked.drain()
    assert len(stream.sends) == 1
    assert stream.sends[0].count(b"OK FETCH completed") == 100
    assert stream.drained == 1


async def test_a_long_answer_is_handed_on_every_64_kib_without_waiting_for_the_drain() -> None:
    stream = Stream()
    corked = _Corked(stream)
    chunk = b"x" * 1000 + b"\r\n"
    for _ in range(200):
        corked.write(chunk)
    assert len(stream.sends) == 200 * len(chunk) // _Corked.LIMIT
    assert all(len(s) >= _Corked.LIMIT for s in stream.sends)
    await corked.drain()
    assert b"".join(stream.sends) == chunk * 200


async def test_a_bye_written_on_the_way_out_is_not_lost() -> None:
    stream = Stream()
    corked = _Corked(stream)
    corked.write(b"* BYE autologout: idle for too long\r\n")
    corked.flush()
    corked.write(b"* BYE server shutting down\r\n")
    corked.close()
    assert b"".join(stream.sends) == b"* BYE autologout: idle for too long\r\n* BYE server shutting down\r\n"
    assert stream.closed


async def test_quickack_follows_the_continuation_onto_the_wire(
    imap_fixture: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (2026-12-04, bench/imap.py: 300 imaplib APPENDs took 15 s, not 3): the corked
    writer held the "+" continuation until after TCP_QUICKACK was set, and sending data after it
    re-armed delayed ACKs, so imaplib's CRLF after each literal waited 40 ms for our ACK. Every
    QUICKACK must come with nothing written left in the cork."""
    held: list[bytes] = []
    quickack = server._quickack

    def recording(writer: Any) -> None:
        held.append(bytes(writer._pending) if isinstance(writer, _Corked) else b"")
        quickack(writer)

    monkeypatch.setattr(server, "_quickack", recording)

    def append_twice() -> list[str]:
        c = imap_fixture.connect()
        try:
            return [c.append("INBOX", "", "", b"Subject: quick %d\r\n\r\nack.\r\n" % i)[0] for i in range(2)]
        finally:
            c.logout()

    assert await run(append_twice) == ["OK", "OK"]
    assert len(held) >= 2  # a continuation per APPEND (and one per literal read)
    assert held == [b""] * len(held)
