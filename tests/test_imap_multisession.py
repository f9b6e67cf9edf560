"""Two sessions on one folder, mailgate against a real Dovecot 2.3: what session B is told.

Session A changes the folder (EXPUNGE, STORE, COPY, MOVE, APPEND, a new
keyword); session B then sends NOOP, STORE, FETCH or SEARCH (with and
without UID) or IDLEs, and the responses B receives (untagged and tagged)
must be Dovecot's. Each script runs on a fresh folder of each server, so
UIDs start at 1 on both and need no mapping. Normalised: UIDVALIDITY and
MODSEQ values (each server counts its own; MODSEQs are compared by rank
within a script), the human-readable text after a tagged status or a
response code, the order of items in a FETCH response, of consecutive FETCH
responses and of flags in a flag list, and the hierarchy delimiter in LIST/LSUB
(the scripts' folder names have no hierarchy).

One deliberate difference is left out of the scripts: a message another
session expunged, not yet reported to B (held back during FETCH, STORE and
SEARCH by number), is skipped by mailgate's FETCH and SEARCH, while Dovecot
still serves what it has cached of it (RFC 2180 4.1 allows both); so B's
FETCH and SEARCH name only messages that stay.

Also covered: ``\\Recent`` (SELECT, STATUS, SEARCH NEW/OLD/RECENT, FETCH
FLAGS), CONDSTORE (HIGHESTMODSEQ after FETCH MODSEQ, MODSEQ in STORE
replies, UNCHANGEDSINCE with MODIFIED, ESEARCH's MODSEQ item), the ``+``
continuation of IDLE coming before any pending response, and FETCH items
named twice being answered once.
"""

from __future__ import annotations

import contextlib
import imaplib
import itertools
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.dovecot import running_dovecot
from tests.test_imap_differential import LOGIN, PASSWORD, Mailgate, connect, fetches, read_response

pytestmark = pytest.mark.peers


def message(n: int) -> bytes:
    return (
        f"From: Jan Kowalski <jan@example.org>\r\nTo: biuro@acme.test\r\nSubject: message {n}\r\n"
        f"Date: Mon, 04 Mar 2024 10:00:0{n % 10} +0000\r\nMessage-ID: <m{n}@example.org>\r\n\r\n"
        f"Body of message {n}.\r\n"
    ).encode()


@dataclass
class Server:
    name: str
    port: int
    user: str
    password: str


_folders = iter(range(10**9))


class Client:
    """A raw IMAP session: send a line, read everything up to its tagged reply."""

    def __init__(self, server: Server) -> None:
        self.imap = connect(server.port, server.user, server.password)
        self.tags = iter(range(10**9))

    def send(self, line: bytes) -> bytes:
        tag = b"T%d" % next(self.tags)
        self.imap.send(tag + b" " + line + b"\r\n")
        return tag

    def command(self, line: bytes) -> bytes:
        tag = self.send(line)
        return read_response(self.imap, tag)

    def readline(self) -> bytes:
        line: bytes = self.imap.file.readline()  # type: ignore[attr-defined]
        if not line:
            raise EOFError("connection closed")
        return line

    def close(self) -> None:
        with contextlib.suppress(imaplib.IMAP4.error, OSError, EOFError):
            self.imap.logout()


# A script is a list of steps: (session, command line); "{f}" stands for the script's folder.
# "{g}" is a second, empty folder made for the script (a MOVE target). Special command lines:
# "IDLE" (B idles; the responses up to "+" and everything until DONE's
# reply are recorded; a step ("A", ...) between "IDLE" and "DONE" runs while B idles),
# "DONE" (ends B's IDLE after a short wait), "SLEEP" (lets the other server notice), "MARK"
# (the folder's UIDVALIDITY and HIGHESTMODSEQ now become "{V}" and "{M}" in later lines; no response).
Step = tuple[str, str]


def transcript(server: Server, script: list[Step], *, messages: int = 4, select: bool = True) -> list[bytes]:
    """Run a script on a fresh folder; the responses of every step, as received."""
    folder = f"ms{next(_folders)}-{time.monotonic_ns() % 10**6}"
    a, b = Client(server), Client(server)
    try:
        a.command(b'CREATE "' + folder.encode() + b'"')
        a.command(b'CREATE "' + folder.encode() + b'-g"')
        for n in range(1, messages + 1):
            raw = message(n)
            out = a.command(b'APPEND "%s" () {%d+}\r\n%s' % (folder.encode(), len(raw), raw))
            assert b"OK" in out.splitlines()[-1], out
        if select:
            for c in (a, b):
                out = c.command(b'SELECT "' + folder.encode() + b'"')
                assert b" OK " in out.splitlines()[-1], out
        out_steps: list[bytes] = []
        idle_tag: bytes | None = None
        idle_out = bytearray()
        marks = {"{V}": "0", "{M}": "0"}
        for who, line in script:
            c = a if who == "A" else b
            if line == "SLEEP":
                time.sleep(0.3)
                continue
            if line == "MARK":
                status = c.command(b'STATUS "' + folder.encode() + b'" (UIDVALIDITY HIGHESTMODSEQ)')
                for key, item in (("{V}", rb"UIDVALIDITY (\d+)"), ("{M}", rb"HIGHESTMODSEQ (\d+)")):
                    found = re.search(item, status)
                    assert found, status
                    marks[key] = found.group(1).decode()
                continue
            for key, value in marks.items():
                line = line.replace(key, value)
            if line == "IDLE":
                idle_tag = c.send(b"IDLE")
                idle_out = bytearray()
                while not idle_out.endswith(b"\r\n") or not idle_out.splitlines()[-1].startswith(b"+"):
                    idle_out += c.readline()
                continue
            if line == "DONE":
                assert idle_tag is not None
                time.sleep(1.5)
                c.imap.send(b"DONE\r\n")
                idle_out += read_response(c.imap, idle_tag)
                out_steps.append(bytes(idle_out))
                idle_tag = None
                continue
            response = c.command(line.replace("{g}", folder + "-g").replace("{f}", folder).encode())
            out_steps.append(response)
        return [
            r.replace(folder.encode() + b"-g", b"{g}").replace(folder.encode(), b"{f}") for r in out_steps
        ]
    finally:
        a.close()
        b.close()


_MODSEQ = re.compile(rb"(MODSEQ \(|HIGHESTMODSEQ |MODSEQ )(\d+)")
_UIDVALIDITY = re.compile(rb"(UIDVALIDITY |APPENDUID |COPYUID )(\d+)")
_FLAGLIST = re.compile(rb"(FLAGS|PERMANENTFLAGS) \(([^)]*)\)")
_TAGGED = re.compile(rb"^(T\d+ (?:OK|NO|BAD))(?: (\[[^\]]*\]))?.*$")
_UNTAGGED_OK = re.compile(rb"^(\* (?:OK|NO|BAD|BYE))(?: (\[[^\]]*\]))?.*$")


_DELIMITER = re.compile(rb'^(\* (?:LIST|LSUB) \([^)]*\) )"[./]"')


def _line(line: bytes) -> bytes:
    # The hierarchy delimiter: Dovecot's fixture has ".", mailgate "/" (the scripts' names have none).
    line = _DELIMITER.sub(lambda m: m.group(1) + b'"/"', line)
    line = _MODSEQ.sub(lambda m: m.group(1) + b"m", line)
    line = _UIDVALIDITY.sub(lambda m: m.group(1) + b"V", line)
    line = _FLAGLIST.sub(lambda m: m.group(1) + b" (" + b" ".join(sorted(m.group(2).split())) + b")", line)
    if line.startswith(b"+"):
        return b"+"
    if b" FETCH (" in line:  # items in a fixed order: their order is the server's
        ((seq, items),) = fetches(line + b"\r\n").items()
        return b"* %d FETCH (" % seq + b" ".join(n + b" " + v for n, v in sorted(items)) + b")"
    for pattern in (_TAGGED, _UNTAGGED_OK):
        m = pattern.match(line)
        if m:
            return m.group(1) + (b" " + m.group(2) if m.group(2) else b"")
    return line


def _fetch_seq(line: bytes) -> int | None:
    m = re.match(rb"\* (\d+) FETCH ", line)
    return int(m.group(1)) if m else None


def _informational(line: bytes) -> bool:
    return line.startswith(b"* OK") and not line.startswith(b"* OK [")


def normalised(responses: list[bytes]) -> list[list[bytes]]:
    """Per step, its response lines with server-specific values masked (see the module docstring).

    Consecutive FETCH responses are put in sequence order (Dovecot merges a STORE's answers with
    the other sessions' changes by number, mailgate answers first; RFC 3501 leaves it free).
    """
    out = []
    for response in responses:
        # An untagged OK without a response code is information only (RFC 3501 7.1.1): Dovecot sends
        # one while idling ("* OK Still here") when its timer fires, which on a loaded machine fell
        # inside a script's IDLE (CI, 2026-12-04). Nothing to compare.
        lines = [_line(line) for line in response.split(b"\r\n") if line and not _informational(line)]
        runs = itertools.groupby(lines, key=lambda line: _fetch_seq(line) is not None)
        out.append([line for fetch, run in runs for line in (sorted(run, key=_fetch_seq) if fetch else run)])
    return out


@pytest.fixture(scope="module")
def dovecot_server() -> Iterator[Server]:
    user, password = "multi@acme.test", "dovecot-secret"
    with running_dovecot({user: password}) as server:
        yield Server("dovecot", server.port, user, password)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def mailgate_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with Mailgate(request.param, tmp_path_factory.mktemp(request.param)) as server:
        yield Server("mailgate", server.port, LOGIN, PASSWORD)


_dovecot_answers: dict[tuple[Step, ...], list[list[bytes]]] = {}


def compare(dovecot: Server, mailgate: Server, script: list[Step], *, select: bool = True) -> None:
    """Run ``script`` on both servers: every step's responses are Dovecot's (normalised)."""
    key = (*script, ("select", str(select)))
    if key not in _dovecot_answers:  # Dovecot's answers do not depend on mailgate's database
        _dovecot_answers[key] = normalised(transcript(dovecot, script, select=select))
    theirs = _dovecot_answers[key]
    ours = normalised(transcript(mailgate, script, select=select))
    steps = [s for s in script if s[1] not in ("SLEEP", "IDLE", "MARK")]
    for step, t, o in zip(steps, theirs, ours, strict=True):
        if step[1].startswith(("SELECT", "EXAMINE")):
            # RFC 7162 3.1.2.1: mailgate always sends HIGHESTMODSEQ, Dovecot once CONDSTORE is on.
            o = [line for line in o if not line.startswith(b"* OK [HIGHESTMODSEQ")]
            t = [line for line in t if not line.startswith(b"* OK [HIGHESTMODSEQ")]
        shown = "\n".join(f"{w}: {line}" for w, line in script)
        assert o == t, f"script:\n{shown}\nstep {step}:\n dovecot: {t}\nmailgate: {o}"


# --------------------------------------------------------------------------- A changes, B looks

APPENDED = message(9)


def appending(flags: str) -> Step:
    """A's APPEND of one more message to the script's folder."""
    return ("A", f"APPEND {{f}} ({flags}) {{{len(APPENDED)}+}}\r\n{APPENDED.decode()}")


ACTIONS: dict[str, list[Step]] = {
    # The \Deleted flag is seen by B first: Dovecot also reports the flags of a message expunged
    # meanwhile (its index keeps them), mailgate keeps no flags of expunged messages.
    "EXPUNGE": [("A", r"STORE 1,3 +FLAGS.SILENT (\Deleted)"), ("B", "NOOP"), ("A", "EXPUNGE")],
    "STORE": [("A", r"STORE 2 +FLAGS (\Flagged)"), ("A", r"STORE 4 -FLAGS (\Flagged)")],
    "COPY": [("A", "COPY 2:3 {f}")],
    "MOVE": [("A", "MOVE 1 {g}")],
    "APPEND": [appending("\\Seen")],
    "keyword": [("A", "STORE 3 +FLAGS (Urgent)")],
    "keyword by APPEND": [appending("Later")],
}
LOOKS: dict[str, list[Step]] = {
    "NOOP": [("B", "NOOP")],
    "STORE": [("B", r"STORE 2 +FLAGS (\Seen)")],
    "UID STORE": [("B", r"UID STORE 2 +FLAGS (\Seen)")],
    # Not 1 or 3: the messages A expunges (see the module docstring).
    "FETCH": [("B", "FETCH 2,4 (UID FLAGS)")],
    "UID FETCH": [("B", "UID FETCH 2,4 (FLAGS)")],
    "SEARCH": [("B", "SEARCH 2,4")],
    "UID SEARCH": [("B", "UID SEARCH UID 2,4")],
    "CHECK": [("B", "CHECK")],
    "IDLE": [("B", "IDLE"), ("B", "DONE")],
}
# After the look, B's view must agree with A's: nothing held back is lost.
AFTER: list[Step] = [("B", "NOOP"), ("B", "FETCH 1:* (UID FLAGS)"), ("A", "FETCH 1:* (UID FLAGS)")]


@pytest.mark.parametrize("look", list(LOOKS))
@pytest.mark.parametrize("action", list(ACTIONS))
def test_other_sessions_changes_are_reported_as_dovecot_does(
    dovecot_server: Server, mailgate_server: Server, action: str, look: str
) -> None:
    """A changes the folder, B sends a command: B is told what Dovecot tells it, when it does."""
    compare(dovecot_server, mailgate_server, [*ACTIONS[action], *LOOKS[look], *AFTER])


@pytest.mark.parametrize("action", list(ACTIONS))
def test_changes_made_while_idling_are_reported_as_dovecot_does(
    dovecot_server: Server, mailgate_server: Server, action: str
) -> None:
    """B idles, A changes the folder: the ``+`` comes first, then what Dovecot sends."""
    *prepare, act = ACTIONS[action]
    compare(dovecot_server, mailgate_server, [*prepare, ("B", "IDLE"), act, ("B", "DONE"), *AFTER])


def test_own_store_does_not_hide_other_sessions_expunge(
    dovecot_server: Server, mailgate_server: Server
) -> None:
    """The defect: B's own STORE raised its MODSEQ past A's expunge, so B never heard of it
    and kept a ghost message (its SEARCH ALL said 2 3 4, A's 1 2 3)."""
    script = [
        ("A", "MOVE 1 {g}"),
        ("B", r"STORE 3 +FLAGS (\Flagged)"),
        ("B", "NOOP"),
        ("B", "SEARCH ALL"),
        ("A", "SEARCH ALL"),
        ("A", r"STORE 2 +FLAGS (\Seen)"),
        ("B", "FETCH 2 (FLAGS)"),
        ("B", "NOOP"),
    ]
    compare(dovecot_server, mailgate_server, script)
    b_search = normalised(transcript(mailgate_server, script))[3]
    assert b_search[0] == b"* SEARCH 1 2 3", b_search


def test_uid_search_sort_thread_tell_expunges_unless_they_name_messages(
    dovecot_server: Server, mailgate_server: Server
) -> None:
    """The defect: UID SEARCH, UID SORT and UID THREAD held other sessions' expunges back
    whatever they searched; Dovecot tells them unless the search names messages by number or UID."""
    script = [
        ("A", r"STORE 1,3 +FLAGS.SILENT (\Deleted)"),
        ("B", "NOOP"),
        ("A", "EXPUNGE"),
        ("B", "UID SEARCH UID 2,4"),
        ("B", "UID SEARCH 2:4 UNDELETED"),
        ("B", "UID SEARCH UNDELETED"),
        ("A", r"STORE 1 +FLAGS.SILENT (\Deleted)"),
        ("B", "NOOP"),
        ("A", "EXPUNGE"),
        ("B", "UID SORT (ARRIVAL) UTF-8 UNDELETED"),
        appending(""),  # so that something stays
        ("B", "NOOP"),
        ("A", r"STORE 1 +FLAGS.SILENT (\Deleted)"),
        ("B", "NOOP"),
        ("A", "EXPUNGE"),
        ("B", "UID THREAD REFERENCES UTF-8 UNDELETED"),
        *AFTER,
    ]
    compare(dovecot_server, mailgate_server, script)
    b_search = normalised(transcript(mailgate_server, script))[5]
    assert b_search[:3] == [b"* SEARCH 2 4", b"* 3 EXPUNGE", b"* 1 EXPUNGE"], b_search


def test_own_move_is_told_with_other_sessions_expunges(
    dovecot_server: Server, mailgate_server: Server
) -> None:
    """The defect: B's MOVE told its own EXPUNGE first and other sessions' pending ones after,
    out of Dovecot's order (one batch, highest number first, after the flag FETCHes)."""
    script = [
        appending(""),  # so that something stays
        ("B", "NOOP"),
        ("A", "NOOP"),
        ("A", r"STORE 4 +FLAGS.SILENT (\Deleted)"),
        ("B", "NOOP"),
        ("A", "EXPUNGE"),
        ("A", r"STORE 3 +FLAGS (\Seen)"),
        ("B", "MOVE 2 {g}"),
        ("A", r"UID STORE 3 +FLAGS.SILENT (\Deleted)"),
        ("B", "NOOP"),
        ("A", "EXPUNGE"),
        ("B", "UID MOVE 1 {g}"),
        *AFTER[:2],
        ("A", "NOOP"),
        *AFTER[2:],
    ]
    compare(dovecot_server, mailgate_server, script)
    b_move = normalised(transcript(mailgate_server, script))[7]
    assert [line for line in b_move if line.endswith(b"EXPUNGE")] == [b"* 4 EXPUNGE", b"* 2 EXPUNGE"], b_move


def test_idle_continuation_comes_before_pending_responses(
    dovecot_server: Server, mailgate_server: Server
) -> None:
    script = [("A", "MOVE 1 {g}"), ("A", r"STORE 1 +FLAGS (\Seen)"), ("B", "IDLE"), ("B", "DONE")]
    compare(dovecot_server, mailgate_server, script)
    idle = normalised(transcript(mailgate_server, script))[-1]
    assert idle[0] == b"+", idle
    assert b"* 1 EXPUNGE" in idle, idle


def test_fetch_items_named_twice_are_answered_once(dovecot_server: Server, mailgate_server: Server) -> None:
    compare(
        dovecot_server,
        mailgate_server,
        [("B", "FETCH 1 (UID BODY FLAGS UID)"), ("B", "UID FETCH 2 (FLAGS UID FLAGS RFC822.SIZE UID)")],
    )


def test_new_keywords_are_announced_as_dovecot_does(dovecot_server: Server, mailgate_server: Server) -> None:
    """A new keyword brings ``* FLAGS`` and ``PERMANENTFLAGS`` to the session that stores it
    and to the others; a known one does not."""
    script = [
        ("A", "STORE 1 +FLAGS (Invoice)"),
        ("B", "STORE 2 +FLAGS (Paid)"),
        ("A", "NOOP"),
        ("B", "STORE 3 +FLAGS (Invoice)"),
        ("A", "UID STORE 4 +FLAGS (Paid $Forwarded)"),
        ("B", "UID FETCH 1:* (FLAGS)"),
        ("B", "SELECT {f}"),
    ]
    compare(dovecot_server, mailgate_server, script)


# --------------------------------------------------------------------------- \Recent


def test_recent_as_dovecot_keeps_it(dovecot_server: Server, mailgate_server: Server) -> None:
    """One session per message holds \\Recent, the first to see it; no re-select keeps it."""
    new = appending("")
    script = [
        ("B", "STATUS {f} (MESSAGES RECENT)"),
        ("B", "EXAMINE {f}"),
        ("B", "SEARCH RECENT"),
        ("B", "SELECT {f}"),
        ("A", "SELECT {f}"),
        ("B", "STATUS {g} (MESSAGES RECENT)"),
        ("B", "SEARCH NEW"),
        ("B", r"STORE 2 +FLAGS (\Seen)"),
        ("B", "SEARCH NEW"),
        ("B", "SEARCH OLD"),
        ("B", "SEARCH RECENT"),
        ("A", "SEARCH RECENT"),
        ("A", "SEARCH OLD"),
        ("B", "FETCH 1:* (FLAGS)"),
        new,
        ("B", "NOOP"),
        ("A", "NOOP"),
        ("A", "SEARCH RECENT"),
        ("A", "FETCH 5 (FLAGS)"),
        ("B", "MOVE 1 {g}"),
        ("B", "STATUS {g} (MESSAGES RECENT)"),
        new,
        ("B", "IDLE"),
        ("B", "DONE"),
        ("A", "NOOP"),
        ("B", "SELECT {f}"),
        ("B", "SEARCH RECENT"),
    ]
    compare(dovecot_server, mailgate_server, script, select=False)


# --------------------------------------------------------------------------- CONDSTORE


@pytest.mark.parametrize(
    "enable",
    ["FETCH 1 (MODSEQ)", "UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1)", "ENABLE CONDSTORE", "SEARCH MODSEQ 1"],
)
def test_condstore_as_dovecot_answers_it(
    dovecot_server: Server, mailgate_server: Server, enable: str
) -> None:
    """Enabling CONDSTORE by use reports HIGHESTMODSEQ; STORE replies and reports carry MODSEQ;
    UNCHANGEDSINCE answers MODIFIED; a search by MODSEQ answers the highest it found."""
    script = [
        ("B", r"STORE 1 +FLAGS (\Seen)"),
        ("B", enable),
        ("B", r"STORE 1 +FLAGS (\Answered)"),
        ("B", r"STORE 2 +FLAGS.SILENT (\Answered)"),
        ("A", r"STORE 3 +FLAGS (\Flagged)"),
        ("B", "NOOP"),
        ("B", r"STORE 1:4 (UNCHANGEDSINCE 1) +FLAGS (\Draft)"),
        ("B", r"UID STORE 1:4 (UNCHANGEDSINCE 1) +FLAGS (\Draft)"),
        ("B", r"STORE 4 (UNCHANGEDSINCE 100000) +FLAGS (\Draft)"),
        ("B", "SEARCH MODSEQ 2"),
        ("B", "SEARCH RETURN (ALL) MODSEQ 2"),
        ("B", "UID SEARCH RETURN (MIN MAX COUNT) MODSEQ 2"),
        ("B", "SEARCH RETURN (COUNT) SEEN"),
    ]
    compare(dovecot_server, mailgate_server, script)


# --------------------------------------------------------------------------- CONTEXT=SEARCH


def test_updating_searches_as_dovecot_tells_them(dovecot_server: Server, mailgate_server: Server) -> None:
    """RFC 5267 4.3: an updating search hears of messages entering and leaving its result through
    other sessions' and its own flag changes, new messages (after EXISTS), expunges (before the
    EXPUNGE, held back while expunges are) and during IDLE, until CANCELUPDATE or a re-SELECT."""
    script = [
        ("B", "SEARCH RETURN (UPDATE COUNT) UNSEEN"),  # B's tag T1
        ("A", r"STORE 2 +FLAGS (\Seen)"),
        ("B", "NOOP"),
        ("B", r"STORE 3 +FLAGS (\Seen)"),
        ("A", r"STORE 2 -FLAGS (\Seen)"),
        ("B", "NOOP"),
        appending(""),
        ("B", "NOOP"),
        ("A", r"STORE 1 +FLAGS.SILENT (\Deleted)"),
        ("B", "NOOP"),  # B sees \Deleted first (see the module docstring)
        ("A", "EXPUNGE"),
        ("B", "SEARCH 2"),
        ("B", "NOOP"),
        ("B", "UID SEARCH RETURN (UPDATE MIN) FLAGGED"),  # T11
        ("B", "IDLE"),
        ("A", r"STORE 2 +FLAGS (\Flagged)"),
        ("B", "DONE"),
        ("B", 'CANCELUPDATE "T1"'),
        ("A", r"STORE 3 -FLAGS (\Seen)"),
        ("B", "NOOP"),
        ("B", 'CANCELUPDATE "T1"'),
        ("B", "CANCELUPDATE T11"),
        ("B", "SEARCH RETURN (SAVE UPDATE) SEEN"),
        ("A", r"STORE 4 +FLAGS (\Seen)"),
        ("B", "NOOP"),
        ("B", "FETCH $ (FLAGS)"),
        ("B", "SELECT {f}"),
        ("A", r"STORE 2 -FLAGS (\Flagged)"),
        ("B", "NOOP"),
        ("B", 'CANCELUPDATE "T11"'),
        ("B", "UNSELECT"),
        ("B", 'CANCELUPDATE "T11"'),
    ]
    compare(dovecot_server, mailgate_server, script)


def test_too_many_updating_searches_as_dovecot_refuses_them(
    dovecot_server: Server, mailgate_server: Server
) -> None:
    """The eleventh updating search is answered without updates (``NO [NOUPDATE]``, RFC 5267
    4.3.1); a CANCELUPDATE stops at the first unknown tag, keeping those cancelled before it."""
    script = [
        *[("B", "SEARCH RETURN (UPDATE) UNSEEN")] * 11,
        ("A", r"STORE 1 +FLAGS (\Seen)"),
        ("B", "NOOP"),
        ("B", 'CANCELUPDATE "T1" "T2" "T99" "T3"'),
        ("A", r"STORE 1 -FLAGS (\Seen)"),
        ("B", "NOOP"),
    ]
    compare(dovecot_server, mailgate_server, script)


@pytest.mark.parametrize(
    "line",
    [
        "SEARCH RETURN (PARTIAL 2:3) ALL",
        "UID SEARCH RETURN (PARTIAL 3:1 COUNT) ALL",
        "SEARCH RETURN (PARTIAL 5:9) ALL",
        "SEARCH RETURN (MIN PARTIAL 1:1 MAX COUNT) SEEN",
        "SEARCH RETURN (PARTIAL 1:2 ALL) ALL",
        "SEARCH RETURN (PARTIAL 0:2) ALL",
        "SEARCH RETURN (PARTIAL -1:2) ALL",
        "SEARCH RETURN (PARTIAL 1:2 PARTIAL 3:4) ALL",
        "SEARCH RETURN (UPDATE UPDATE) ALL",
        "SEARCH RETURN (CONTEXT) ALL",
        "SEARCH RETURN (CONTEXT COUNT) UNSEEN",
        "SEARCH RETURN (MIN MAX ALL COUNT) ALL",
        "SEARCH RETURN (COUNT ALL) MODSEQ 1",
        "SORT RETURN (PARTIAL 1:2 MIN) (REVERSE ARRIVAL) UTF-8 ALL",
        "UID SORT RETURN (PARTIAL 2:4 COUNT) (REVERSE SUBJECT) UTF-8 ALL",
        'CANCELUPDATE "T9"',
    ],
)
def test_search_result_options_as_dovecot_answers_them(
    dovecot_server: Server, mailgate_server: Server, line: str
) -> None:
    """ESEARCH/ESORT with CONTEXT=SEARCH's PARTIAL and CONTEXT, item order and refusals."""
    compare(dovecot_server, mailgate_server, [("B", r"STORE 2,4 +FLAGS (\Seen)"), ("B", line)])


def _literal(data: bytes) -> str:
    return f"{{{len(data)}+}}\r\n{data.decode()}"


def test_multiappend_catenate_and_list_status_live_as_dovecot_answers(
    dovecot_server: Server, mailgate_server: Server
) -> None:
    """MULTIAPPEND (RFC 3502), CATENATE (RFC 4469) and LIST-EXTENDED/LIST-STATUS (RFC 5258, 5819)
    diffed against a live Dovecot on folder names without a hierarchy (its delimiter is "." where
    ours is "/"; tests/test_imap.py covers the hierarchical forms)."""
    first, second = message(21), message(22)
    text = b"Subject: catenated\r\n\r\n"
    script = [
        ("B", f"APPEND {{f}} (\\Seen) {_literal(first)} () {_literal(second)}"),
        ("B", "NOOP"),
        ("B", f'APPEND {{f}} CATENATE (TEXT {_literal(text)} URL "/{{f}}/;UID=2/;SECTION=TEXT")'),
        ("B", 'APPEND {f} CATENATE (URL "/{f}/;UID=99")'),
        ("B", 'APPEND {f} CATENATE (URL "/nosuch/;UID=1")'),
        ("B", f'APPEND {{f}} CATENATE (URL "/{{f}}/;UID=1" TEXT {_literal(b"-- appended")})'),
        ("B", "NOOP"),
        ("B", "FETCH 5:* (FLAGS RFC822.SIZE)"),  # (literals: the normaliser reads FETCH line by line)
        ("B", 'LIST "" "{f}" RETURN (STATUS (MESSAGES UNSEEN))'),
        ("B", 'LIST (SUBSCRIBED) "" "{f}*"'),
        ("B", "SUBSCRIBE {f}"),
        ("B", 'LIST (SUBSCRIBED) "" "{f}*" RETURN (CHILDREN)'),
        ("B", 'LIST "" "{g}" RETURN (SUBSCRIBED STATUS (MESSAGES UIDNEXT))'),
    ]
    compare(dovecot_server, mailgate_server, script)


def test_sequence_numbers_past_the_end_are_bad_as_dovecot_answers(
    dovecot_server: Server, mailgate_server: Server
) -> None:
    """The defect: FETCH 1:* in an empty folder and STORE of a number past the last message were
    answered OK (doing nothing); RFC 3501 9 (seq-number) and Dovecot say BAD. By UID, OK."""
    script = [
        ("B", "FETCH 9 (FLAGS)"),
        ("B", "FETCH 3:9 (UID)"),
        ("B", "FETCH 3:* (UID)"),
        ("B", r"STORE 9 +FLAGS (\Seen)"),
        ("B", "COPY 4:9 {g}"),
        ("B", "MOVE 9 {g}"),
        ("B", "UID FETCH 9 (FLAGS)"),
        ("B", "SEARCH 9"),
        ("B", "SELECT {g}"),
        ("B", "FETCH 1:* (FLAGS)"),
        ("B", "FETCH * (FLAGS)"),
        ("B", r"STORE 1:* +FLAGS (\Seen)"),
        ("B", "UID FETCH 1:* (FLAGS)"),
        ("B", "FETCH $ (FLAGS)"),
    ]
    compare(dovecot_server, mailgate_server, script)


if __name__ == "__main__":  # a probe: python -m tests.test_imap_multisession 'A:EXPUNGE' ...
    import sys
    import tempfile

    script = [(s.split(":", 1)[0], s.split(":", 1)[1]) for s in sys.argv[1:]]
    with running_dovecot({"p@acme.test": "pw"}) as d, Mailgate("sqlite", Path(tempfile.mkdtemp())) as m:
        for server in (
            Server("dovecot", d.port, "p@acme.test", "pw"),
            Server("mailgate", m.port, LOGIN, PASSWORD),
        ):
            print("=====", server.name)
            for (who, line), r in zip(
                [s for s in script if s[1] not in ("SLEEP", "IDLE", "MARK")],
                transcript(server, script),
                strict=True,
            ):
                print(f"--- {who}: {line}")
                print(r.decode("utf-8", "replace").rstrip())
