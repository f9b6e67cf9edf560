"""LIST/LSUB mailbox patterns (RFC 3501 6.3.8), matched in linear time.

Theory of operation
-------------------
``*`` matches any run of characters, ``%`` any run without the hierarchy
delimiter ``/``; everything else matches itself, case-sensitively, except
that a pattern that is ``INBOX`` in any case matches ``INBOX``.

A pattern is compiled once into *segments*: the text between ``*`` s, each a
tuple of literal strings that ``%`` s separate. Runs of wildcards are reduced
first (``**`` and ``*%`` are ``*``, ``%%`` is ``%``), so only the first segment
may start with ``%`` and only the last may end with one. A name matches when
the first segment matches at its start, the last at its end, and the middle
segments in order in between. Taking each middle segment's *earliest-ending*
match is never wrong (the ``*`` after it absorbs whatever the others skipped),
so there is no backtracking over stars:

* a segment without ``%`` is one literal: ``startswith``, ``find``,
  ``endswith``;
* a segment with ``%`` is run as a bit-parallel NFA over the name's positions:
  a set of positions is an int (bit ``p`` = "matched up to ``name[:p]``"),
  a literal keeps the positions where it occurs and shifts them by its length,
  and a ``%`` extends every position through the following run of non-``/``
  characters with one addition (the carry runs along the run).

Cost: a name shorter than the pattern's literals is refused at once;
otherwise a match costs ``O(len(pattern))`` string searches and operations on
``len(name)``-bit ints, plus one C-speed pass over the name for each character
a ``%`` segment uses (shared by the patterns of one :class:`Matcher`). Folder
names are at most 255 characters and
:data:`~gateway.imap.parser.MAX_LIST_PATTERN` bounds what one LIST may ask
for, so no LIST costs more than a few hundred microseconds a folder.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from storage.mailstore import DELIMITER

_Segment = tuple[str, ...]
_WILD: Final = frozenset("*%")


class _Pattern:
    """One compiled LIST pattern."""

    __slots__ = ("_first", "_last", "_literal_chars", "_middle", "_whole")

    def __init__(self, pattern: str) -> None:
        if pattern.upper() == "INBOX":
            pattern = "INBOX"
        segments = _segments(pattern)
        self._whole = len(segments) == 1
        self._first = segments[0]
        self._middle = segments[1:-1]
        self._last = segments[-1]
        self._literal_chars = sum(len(lit) for seg in segments for lit in seg)

    def match(self, name: str, occ: _Occurrences) -> bool:
        """Whether ``name`` (whose literals ``occ`` finds) matches."""
        if len(name) < self._literal_chars:
            return False
        n = len(name)
        if self._whole:
            if len(self._first) == 1:
                return name == self._first[0]
            return _run(self._first, occ, 1) >> n & 1 == 1
        first = self._first
        if len(first) == 1:
            if not name.startswith(first[0]):
                return False
            pos = len(first[0])
        else:
            pos = _lowest(_run(first, occ, 1))
        for seg in self._middle:
            if pos < 0:
                return False
            if len(seg) == 1:
                found = name.find(seg[0], pos)
                pos = found + len(seg[0]) if found >= 0 else -1
            else:
                pos = _lowest(_run(seg, occ, occ.full >> pos << pos))
        if pos < 0:
            return False
        last = self._last
        if len(last) == 1:
            return n - len(last[0]) >= pos and name.endswith(last[0])
        return _run(last, occ, occ.full >> pos << pos) >> n & 1 == 1


class Matcher:
    """Matches names against any of several patterns (LIST's pattern list)."""

    __slots__ = ("_patterns",)

    def __init__(self, patterns: Iterable[str]) -> None:
        self._patterns = [_Pattern(p) for p in patterns]

    def __call__(self, name: str) -> bool:
        occ = _Occurrences(name)
        return any(p.match(name, occ) for p in self._patterns)


def _segments(pattern: str) -> list[_Segment]:
    """The pattern split at ``*`` and each piece at ``%``, runs of wildcards reduced to one."""
    reduced: list[str] = []
    for ch in pattern:
        if ch in _WILD and reduced and reduced[-1] in _WILD:
            if ch == "*":
                reduced[-1] = "*"
        else:
            reduced.append(ch)
    return [tuple(piece.split("%")) for piece in "".join(reduced).split("*")]


class _Occurrences:
    """Where literals occur in one name, as bit sets over its positions, computed on demand."""

    __slots__ = ("_cache", "full", "name", "nonslash")

    def __init__(self, name: str) -> None:
        self.name = name
        self.full = (1 << (len(name) + 1)) - 1
        self._cache: dict[str, int] = {"": self.full}
        self.nonslash = -1  # computed on first use

    def of(self, literal: str) -> int:
        """Bit ``p`` set when ``name[p:]`` starts with ``literal``."""
        mask = self._cache.get(literal)
        if mask is not None:
            return mask
        if len(literal) == 1:  # one pass: the gaps between its occurrences, as a binary numeral
            gaps = ["0" * len(piece) for piece in self.name.split(literal)]
            mask = int("1".join(gaps)[::-1] or "0", 2)
        else:
            mask = self.full
            for k, ch in enumerate(literal):
                mask &= self.of(ch) >> k
        self._cache[literal] = mask
        return mask

    def gap(self, positions: int) -> int:
        """``%`` after ``positions``: each extended through the run of non-``/`` characters after it."""
        if self.nonslash < 0:
            self.nonslash = self.full >> 1 & ~self.of(DELIMITER)
        runs = self.nonslash
        return positions | (((positions & runs) + runs) ^ runs)


def _run(segment: _Segment, occ: _Occurrences, starts: int) -> int:
    """The positions where ``segment`` can end, started at any of ``starts``."""
    ends = (starts & occ.of(segment[0])) << len(segment[0])
    for literal in segment[1:]:
        if not ends:
            break
        ends = (occ.gap(ends) & occ.of(literal)) << len(literal)
    return ends


def _lowest(positions: int) -> int:
    """The smallest position in the set, -1 if it is empty."""
    return (positions & -positions).bit_length() - 1
