"""COMPRESS=DEFLATE (RFC 4978): raw deflate both ways, pure (bytes in, bytes out).

Theory of operation
-------------------
After ``a OK DEFLATE active`` every byte the server sends goes through one
deflate stream, flushed (``Z_SYNC_FLUSH``) at the end of each write so the
client can decode each response at once; every byte the client sends goes
through one inflate stream. Costs are bounded per session:

- memory: the compressor uses a 4 KiB window and memLevel 5 (about 24 KiB of
  state instead of zlib's default 256 KiB; a client's inflater, sized for a
  32 KiB window, reads it as it is), the decompressor needs the 32 KiB window
  the RFC allows the client;
- output: :meth:`Deflate.inflate` returns at most ``limit`` bytes per call and
  keeps the rest of its input (a few compressed bytes can expand a
  thousandfold), so the framer's line and literal limits still hold and the
  listener reads no more compressed input until the expansion is consumed.
"""

from __future__ import annotations

import zlib

WINDOW_BITS = 12  # our output window: 4 KiB
MEM_LEVEL = 5
CLIENT_WINDOW_BITS = 15  # what a client may use (RFC 1951's largest)


class DeflateError(Exception):
    """The client's compressed stream is corrupt."""


class Deflate:
    """One session's compressor (to the client) and decompressor (from it)."""

    def __init__(self) -> None:
        self._out = zlib.compressobj(6, zlib.DEFLATED, -WINDOW_BITS, MEM_LEVEL)
        self._in = zlib.decompressobj(-CLIENT_WINDOW_BITS)
        self._pending = b""  # compressed input not yet expanded (held back by ``limit``)

    def deflate(self, data: bytes) -> bytes:
        """``data`` compressed and flushed, ready to send."""
        return self._out.compress(data) + self._out.flush(zlib.Z_SYNC_FLUSH)

    @property
    def has_pending(self) -> bool:
        """Whether input is held back: call :meth:`inflate` with no new data before reading more."""
        return bool(self._pending)

    def inflate(self, data: bytes, limit: int) -> bytes:
        """Up to ``limit`` bytes of the client's stream, from held-back input first, then ``data``."""
        try:
            out = self._in.decompress(self._pending + data, limit)
        except zlib.error as exc:
            raise DeflateError(str(exc)) from exc
        self._pending = self._in.unconsumed_tail
        if self._in.eof:
            raise DeflateError("the client ended its deflate stream")
        return out
