"""THREAD=ORDEREDSUBJECT and THREAD=REFERENCES (RFC 5256 section 4), pure: rows in, the answer out.

Theory of operation
-------------------
Each message is a :class:`Msg` built from stored columns only (Message-ID,
References, In-Reply-To, the Subject for its base subject, the sent date):
no message is read. ORDEREDSUBJECT sorts by base subject and sent date and
makes each subject one thread, its first message the parent of the rest.
REFERENCES is the RFC's algorithm (after Jamie Zawinski's): link messages by
their References (or In-Reply-To), keep loops out, gather the roots, prune
empty ("dummy") containers, sort by sent date, merge roots that share a base
subject, sort every level by sent date (ties by sequence number). The answer
is the RFC 5256 ``thread-list`` syntax over the numbers given. Everything is
iterative or bounded by the number of messages, so a hostile References
chain cannot recurse deeply; the caller runs it in a worker thread.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from gateway.imap.sort import base_subject, casemap

_MSGID = re.compile(r"<[^<>\s]+>")
_REPLY = re.compile(r"^\s*(?:\[[^\[\]]*\]\s*)*(?:re|fwd?)\s*(?:\[[^\[\]]*\]\s*)?:|\(fwd\)\s*$|^\[fwd:", re.I)


@dataclass(frozen=True, slots=True)
class Msg:
    """What threading needs of one message; ``number`` is what the answer shows (seq or UID)."""

    number: int
    seq: int
    sent: datetime
    subject: str
    message_id: str | None
    references: str | None
    in_reply_to: str | None


@dataclass(eq=False, slots=True)
class _Box:
    msg: Msg | None = None
    parent: _Box | None = None
    children: list[_Box] = field(default_factory=list)

    def adopt(self, child: _Box) -> None:
        if child.parent is not None:
            child.parent.children.remove(child)
        child.parent = self
        self.children.append(child)

    def has_descendant(self, other: _Box) -> bool:
        stack = list(self.children)
        while stack:
            box = stack.pop()
            if box is other:
                return True
            stack.extend(box.children)
        return False

    def key(self) -> tuple[datetime, int]:
        """Sent date and sequence number; a dummy takes its first child's."""
        box = self
        while box.msg is None and box.children:
            box = box.children[0]
        return (box.msg.sent, box.msg.seq) if box.msg is not None else (datetime.max, 0)


def _subject(subject: str) -> str:
    return casemap(base_subject(subject))


def _render(box: _Box) -> str:
    """``n n n (..)(..)``: a chain of only children, then the nested threads of the first fork."""
    parts: list[str] = []
    while True:
        if box.msg is not None:
            parts.append(str(box.msg.number))
        if len(box.children) == 1 and box.msg is not None:
            box = box.children[0]
            continue
        if box.children:
            parts.append("".join("(" + _render(c) + ")" for c in box.children))
        return " ".join(parts)


def ordered_subject(messages: Sequence[Msg]) -> str:
    """THREAD=ORDEREDSUBJECT: the ``* THREAD`` answer's data."""
    ordered = sorted(messages, key=lambda m: (_subject(m.subject), m.sent, m.seq))
    threads: list[list[Msg]] = []
    for m in ordered:
        if threads and _subject(threads[-1][0].subject) == _subject(m.subject):
            threads[-1].append(m)
        else:
            threads.append([m])
    threads.sort(key=lambda t: (t[0].sent, t[0].seq))
    out = []
    for first, *rest in threads:
        if len(rest) > 1:
            children = "".join(f"({m.number})" for m in rest)
        else:
            children = " ".join(str(m.number) for m in rest)
        out.append(f"({first.number}{' ' + children if children else ''})")
    return "".join(out)


def _ids(text: str | None) -> list[str]:
    return _MSGID.findall(text or "")


def references(messages: Sequence[Msg]) -> str:
    """THREAD=REFERENCES: the ``* THREAD`` answer's data."""
    table: dict[str, _Box] = {}
    for m in sorted(messages, key=lambda m: m.seq):
        # (1A) the message's own container: a missing or repeated Message-ID gets a unique one
        own = m.message_id if m.message_id and _MSGID.fullmatch(m.message_id) else None
        if own is None or (own in table and table[own].msg is not None):
            own = f"<unique-{m.seq}@mailgate>"
        box = table.setdefault(own, _Box())
        box.msg = m
        refs = _ids(m.references) or _ids(m.in_reply_to)[:1]
        # (1B) link the references in order, never making a loop or replacing a parent
        previous: _Box | None = None
        for ref in refs:
            node = table.setdefault(ref, _Box())
            linkable = previous is not None and node.parent is None and node is not previous
            if linkable and previous is not None and not node.has_descendant(previous):
                previous.adopt(node)
            previous = node
        # (1C) the message's parent is its last reference (an old link is broken)
        if box.parent is not None:
            box.parent.children.remove(box)
            box.parent = None
        if previous is not None and previous is not box and not box.has_descendant(previous):
            previous.adopt(box)
    roots = [b for b in table.values() if b.parent is None]
    roots = _prune(roots)
    for root in roots:
        _sort_tree(root)
    roots.sort(key=_Box.key)
    roots = _group_by_subject(roots)
    for root in roots:
        _sort_tree(root)
    roots.sort(key=_Box.key)
    out = []
    for root in roots:
        if root.msg is None:
            out.append("(" + "".join("(" + _render(c) + ")" for c in root.children) + ")")
        else:
            out.append("(" + _render(root) + ")")
    return "".join(out)


def _prune(roots: list[_Box]) -> list[_Box]:
    """(4) Dummies without children go; a dummy's children take its place, except at the root
    when it has more than one."""
    out: list[_Box] = []
    for root in roots:
        _prune_below(root)
        if root.msg is None and not root.children:
            continue
        if root.msg is None and len(root.children) == 1:
            child = root.children[0]
            child.parent = None
            out.append(child)
        else:
            out.append(root)
    return out


def _prune_below(top: _Box) -> None:
    stack = [top]
    while stack:
        box = stack.pop()
        changed = True
        while changed:
            changed = False
            for child in list(box.children):
                if child.msg is None:
                    index = box.children.index(child)
                    box.children[index : index + 1] = child.children
                    for grandchild in child.children:
                        grandchild.parent = box
                    changed = True
        stack.extend(box.children)


def _group_by_subject(roots: list[_Box]) -> list[_Box]:
    """(6) Roots sharing a base subject become one thread."""

    def info(box: _Box) -> tuple[str, bool]:
        m = box.msg if box.msg is not None else box.children[0].msg
        if m is None:
            return "", False
        return _subject(m.subject), bool(_REPLY.search(m.subject))

    table: dict[str, _Box] = {}
    for root in roots:
        subject, reply = info(root)
        if not subject:
            continue
        old = table.get(subject)
        if (
            old is None
            or (old.msg is not None and root.msg is None)
            or (old.msg is not None and info(old)[1] and not reply)
        ):
            table[subject] = root
    out: list[_Box] = []
    for root in roots:
        subject, reply = info(root)
        target = table.get(subject) if subject else None
        if target is None or target is root:
            out.append(root)
            continue
        if target.msg is None and root.msg is None:
            for child in list(root.children):
                target.adopt(child)
        elif target.msg is None or (reply and not info(target)[1]):
            target.adopt(root)
        else:
            dummy = _Box()
            position = out.index(target) if target in out else None
            dummy.adopt(target)
            dummy.adopt(root)
            table[subject] = dummy
            if position is not None:
                out[position] = dummy
            else:
                out.append(dummy)
    return [r for r in out if r.parent is None]


def _sort_tree(top: _Box) -> None:
    """Every level by sent date, the deepest first (a dummy sorts by its first child)."""
    order, stack = [], [top]
    while stack:
        box = stack.pop()
        order.append(box)
        stack.extend(box.children)
    for box in reversed(order):
        box.children.sort(key=_Box.key)
