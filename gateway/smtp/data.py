"""The SMTP DATA reader: message content in large blocks instead of line by line (issue #16).

aiosmtpd's own ``smtp_DATA`` awaits ``readuntil(b"\\r\\n")`` once per line and
joins the lines afterwards: for a 4 KB message some 60 awaits, each with its
per-line bookkeeping. :class:`DataAssembler` takes whatever the socket
delivered (up to :data:`CHUNK` bytes at a time), looks for the end mark with
one ``find`` per block and undoes the dot-stuffing with one ``replace``.

It keeps aiosmtpd's rules exactly (the differential test in
tests/test_smtp_data.py sends the same bytes to both):

- The content ends at the first line that is a lone ``.``: the first
  ``\\r\\n.\\r\\n``, or ``.\\r\\n`` at the very start (an empty message). Only
  CRLF ends a line: a bare LF or CR is part of the line (relay-in then refuses
  the message, RFC 5321 4.1.1.4, :data:`gateway.smtp.policy.BARE_NEWLINE`).
- A line that starts with ``.`` loses that first dot (RFC 5321 4.5.2).
- More than ``size_limit`` bytes of content as sent (dots included, the end
  mark not) is "too much" (552); a line longer than ``line_limit`` bytes with
  its CRLF is "too long" (500, RFC 5321 4.5.3.1.6). Either way the rest is
  still read up to the end mark and thrown away, so memory stays bounded.
  When both happen within one block the line length is answered (aiosmtpd
  answers whichever came first line by line: a refusal either way).
"""

from __future__ import annotations

import asyncio
import enum

from aiosmtpd.smtp import MISSING, SMTP

CHUNK = 64 * 1024  # bytes asked of the stream per read
END = b"\r\n.\r\n"


class State(enum.Enum):
    """How the content turned out."""

    NOMINAL = "nominal"
    TOO_LONG = "too long"  # a line over the line length limit
    TOO_MUCH = "too much"  # over the size limit


class DataAssembler:
    """Finds the end of one message's DATA in the blocks fed to it.

    :meth:`feed` returns None while the end mark has not been seen, then the
    bytes that followed it (the client's next commands, to be given back to
    the stream). :attr:`state` and :attr:`content` hold the outcome.
    """

    def __init__(self, size_limit: int | None, line_limit: int) -> None:
        self.size_limit = size_limit
        self.line_limit = line_limit
        self.state = State.NOMINAL
        self.content = b""
        # The bytes so far, after a CRLF that stands for the start of the content: the end mark
        # is then always "\r\n.\r\n", also for an empty message.
        self._buf = bytearray(b"\r\n")
        self._scanned = 0  # the end mark does not start before this offset of _buf
        self._line_start = 2  # where the current (unfinished) line starts in _buf

    def feed(self, block: bytes) -> bytes | None:
        """Take the next block of the stream; the bytes after the end mark once it was seen."""
        buf = self._buf
        buf += block
        end = buf.find(END, self._scanned)
        if end < 0:
            self._scanned = max(len(buf) - len(END) + 1, 0)
            self._check(len(buf), final=False)
            return None
        rest = bytes(buf[end + len(END) :])
        del buf[end + 2 :]  # keep the CRLF that ends the last line
        self._check(len(buf), final=True)
        if self.state is State.NOMINAL:
            self.content = bytes(buf).replace(b"\r\n.", b"\r\n")[2:]
        buf.clear()
        return rest

    def _check(self, upto: int, *, final: bool) -> None:
        """Apply the line and size limits to ``_buf[:upto]``; drop what a failed message no longer needs."""
        buf = self._buf
        if self.state is State.NOMINAL:
            self._check_lines(upto, final=final)
        if self.state is State.NOMINAL and self.size_limit is not None:
            # Content as sent is _buf minus the leading CRLF; unfinished, up to 4 bytes may be
            # the start of the end mark and so not content.
            sent = upto - 2 - (0 if final else len(END) - 1)
            if sent > self.size_limit:
                self.state = State.TOO_MUCH
        if self.state is not State.NOMINAL and not final:
            # The content is refused: keep only the bytes that may start the end mark. (The CRLF
            # standing for the start goes too: it must not make an end mark with them.)
            cut = len(buf) - (len(END) - 1)
            if cut > 0:
                del buf[:cut]
                self._scanned = 0

    def _check_lines(self, upto: int, *, final: bool) -> None:
        """TOO_LONG if a line in ``_buf[_line_start:upto]`` is over the limit (its CRLF counted)."""
        buf = self._buf
        start = self._line_start
        if upto - start <= self.line_limit - 2:
            # No line can be too long in so few bytes; just remember where the last one began.
            last = buf.rfind(b"\r\n", start, upto)
            if last >= 0:
                self._line_start = last + 2
            return
        last = buf.rfind(b"\r\n", start, upto)
        finished = buf[start : last + 2] if last >= 0 else b""
        if finished and max(map(len, bytes(finished).split(b"\r\n"))) + 2 > self.line_limit:
            self.state = State.TOO_LONG
            return
        self._line_start = last + 2 if last >= 0 else start
        tail = upto - self._line_start
        # An unfinished line already this long ends too long whatever follows ("\r" may be its CRLF).
        unfinished_ok = self.line_limit - (1 if buf[upto - 1 : upto] == b"\r" else 2)
        if not final and tail > unfinished_ok:
            self.state = State.TOO_LONG


class BlockDataSMTP(SMTP):
    """aiosmtpd's SMTP with DATA read through a :class:`DataAssembler` (content as bytes, no decoding)."""

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with the content read in blocks (:mod:`gateway.smtp.data`), not line by line."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        if self.envelope is None or not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        assembler = DataAssembler(self.data_size_limit, self.line_length_limit)
        while True:
            try:
                block = await self._reader.read(CHUNK)
            except asyncio.CancelledError:
                self._writer.close()  # the connection went away during DATA
                raise
            if not block:
                return  # end of stream: the connection is closing
            rest = assembler.feed(block)
            if rest is not None:
                break
        if rest:
            # The client's next commands (sent without waiting for our reply): back in front.
            self._reader._buffer[:0] = rest  # type: ignore[attr-defined]
        if assembler.state is State.TOO_LONG:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
        elif assembler.state is State.TOO_MUCH:
            await self.push("552 Error: Too much mail data")
        else:
            self.envelope.content = self.envelope.original_content = assembler.content
            status = await self._call_handler_hook("DATA")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push("250 OK" if status is MISSING else status)
            return
        self._set_post_data_state()  # type: ignore[no-untyped-call]
