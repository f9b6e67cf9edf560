"""IMAP flags: system flags are bits in ``messages.sysflags``, keywords text."""

from __future__ import annotations

from collections.abc import Iterable

SYSTEM_FLAGS = {"\\seen": 1, "\\answered": 2, "\\flagged": 4, "\\deleted": 8, "\\draft": 16}
_CANONICAL = {
    "\\seen": "\\Seen",
    "\\answered": "\\Answered",
    "\\flagged": "\\Flagged",
    "\\deleted": "\\Deleted",
    "\\draft": "\\Draft",
}
SEEN, ANSWERED, FLAGGED, DELETED, DRAFT = 1, 2, 4, 8, 16


def split_flags(flags: Iterable[str]) -> tuple[int, frozenset[str]]:
    """Split flag names into the system-flag bits and the set of keywords.

    System flags are matched case-insensitively; ``\\Recent`` (session state,
    never stored) is dropped; keywords keep their case.
    """
    bits = 0
    keywords: set[str] = set()
    for flag in flags:
        low = flag.lower()
        if low in SYSTEM_FLAGS:
            bits |= SYSTEM_FLAGS[low]
        elif low != "\\recent" and flag:
            keywords.add(flag)
    return bits, frozenset(keywords)


def join_flags(bits: int, keywords: str) -> tuple[str, ...]:
    """The flag names of a stored message, system flags first."""
    names = [_CANONICAL[name] for name, bit in SYSTEM_FLAGS.items() if bits & bit]
    names.extend(k for k in keywords.split(" ") if k)
    return tuple(names)


def keywords_text(keywords: Iterable[str]) -> str:
    """The stored form of a keyword set (sorted, space-separated)."""
    return " ".join(sorted(set(keywords)))
