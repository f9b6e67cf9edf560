"""Issue #10, defect 1: no pattern a user controls may cost unbounded CPU.

LIST/LSUB patterns (a wildcard matcher instead of a backtracking regex, a
bound on pattern length, on folder-name length), rules' ``matches`` (RE2) and
the text rules see, SEARCH (parser bounds, matching off the event loop).
"""

from __future__ import annotations

import imaplib
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import ConfigError, parse_config
from gateway.imap import search as search_module
from gateway.imap.parser import MAX_LIST_PATTERN, ParseError, parse
from gateway.imap.parser import Line as ParserLine
from gateway.imap.session import MAX_NAME
from gateway.imap.wildcard import Matcher
from rules import Condition, MessageView, Op, Rule, compile_rules, evaluate
from rules.compiler import TEXT_LIMIT
from rules.model import Action, ActionKind, RuleError
from tests.conftest import config_dict
from tests.test_imap import Server, imap, ok, run

__all__ = ["imap"]  # the fixture, used by name

# --- the LIST matcher ---------------------------------------------------------------------


def reference(pattern: str, name: str) -> bool:
    """What the regex version answered (RFC 3501 6.3.8), for small inputs only."""
    if pattern.upper() == "INBOX":
        return name == "INBOX"
    regex = "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, name, re.DOTALL) is not None


WILDCARD_CASES: list[tuple[str, str, bool]] = [
    ("*", "", True),
    ("*", "a/b/c", True),
    ("%", "", True),
    ("%", "Orders", True),
    ("%", "Orders/2024", False),
    ("", "", True),
    ("", "a", False),
    ("Orders", "Orders", True),
    ("Orders", "orders", False),
    ("Orders", "Orders/2024", False),
    ("Orders/%", "Orders/2024", True),
    ("Orders/%", "Orders/2024/05", False),
    ("Orders/*", "Orders/2024/05", True),
    ("Orders*", "Orders", True),
    ("Orders%", "Orders/x", False),
    ("*/%", "a/b/c", True),
    ("%/%", "a/b/c", False),
    ("%/%/%", "a/b/c", True),
    ("a%b%c", "a/b/c", False),
    ("a%b%c", "axbyc", True),
    ("%a/", "xa/", True),
    ("x%a/%y", "xa/a/y", False),
    ("x%a/%y", "xqa/y", True),
    ("%a/a%", "aa/aa", True),
    ("*a*a*ab", "a" * 30, False),
    ("*a*a*ab", "a" * 30 + "b", True),
    ("*%*", "a/b", True),
    ("%*%", "a/b", True),
    ("%%", "a/b", False),
    ("*%a", "x/ya", True),
    ("inbox", "INBOX", True),
    ("InBoX", "INBOX", True),
    ("inbox", "inbox", False),
    ("INBOX*", "INBOX/x", True),
    ("inbox*", "INBOX", False),
    ("zażółć/%", "zażółć/gęślą", True),
]


@pytest.mark.parametrize(("pattern", "name", "expected"), WILDCARD_CASES)
def test_wildcard_table(pattern: str, name: str, expected: bool) -> None:
    assert reference(pattern, name) is expected  # the table itself says what the RFC says
    assert Matcher([pattern])(name) is expected


@given(
    pattern=st.text(alphabet="ab/*%", max_size=10),
    name=st.text(alphabet="ab/", max_size=12),
)
def test_wildcard_agrees_with_the_regex(pattern: str, name: str) -> None:
    assert Matcher([pattern])(name) is reference(pattern, name)


@given(
    patterns=st.lists(st.text(alphabet="ab/*%", max_size=6), min_size=1, max_size=4),
    name=st.text(alphabet="ab/", max_size=10),
)
def test_wildcard_any_of_several(patterns: list[str], name: str) -> None:
    assert Matcher(patterns)(name) is any(reference(p, name) for p in patterns)


def list_line(text: str) -> ParserLine:
    return ParserLine((text.encode(),))


def test_list_patterns_are_bounded_by_the_parser() -> None:
    fits = "%" * (MAX_LIST_PATTERN - 4)
    assert parse(list_line(f'A1 LIST "abcd" "{fits}"')).tag == "A1"
    with pytest.raises(ParseError, match="patterns longer than 1024"):
        parse(list_line(f'A1 LIST "abcde" "{fits}"'))
    with pytest.raises(ParseError, match="patterns longer than 1024"):
        parse(list_line('A1 LIST "' + "r" * 300 + '" (' + " ".join(["%"] * 4) + ")"))
    with pytest.raises(ParseError, match="patterns longer than 1024"):
        parse(list_line(f'A1 LSUB "" "{"*" * (MAX_LIST_PATTERN + 1)}"'))


# --- LIST over IMAP -----------------------------------------------------------------------

HOSTILE = "*a*a*a*a*a*a*a*a*a*ab"  # ten stars: the old regex backtracked ~n**9 times a name


@pytest.mark.timeout(60)  # the old code holds the event loop for hours: fail, don't hang
async def test_list_pattern_is_linear_on_long_names(imap: Server) -> None:
    a, ab, halves = "a" * MAX_NAME, "a" * (MAX_NAME - 1) + "b", "a" * 127 + "/" + "a" * 127

    def names(response: tuple[str, list[Any]]) -> set[str]:
        return {line.decode().rpartition('"/" ')[2] for line in ok(response)}

    def scenario() -> None:
        c = imap.connect()
        for name in (a, ab, halves):  # and halves' parent, "a" * 127
            ok(c.create(f'"{name}"'))
            ok(c.subscribe(f'"{name}"'))  # CREATE does not subscribe; LSUB below lists subscriptions
        # imaplib's socket timeout (10 s) bounds the wait for each answer.
        assert ok(c.list('""', f'"{HOSTILE}"')) == [b'(\\HasNoChildren) "/" ' + ab.encode()]
        assert names(c.list('""', '"*a%a*a%a*a%a*a%a*a%a"')) == {a, halves, "a" * 127}
        assert names(c.list('""', '"a%"')) == {a, ab, "a" * 127}
        assert names(c.list('"a"', '"*/%"')) == {halves}
        assert ok(c.lsub('""', f'"{HOSTILE}"')) == [b'() "/" ' + ab.encode()]
        with pytest.raises(imaplib.IMAP4.error, match=r"BAD.*patterns longer than 1024 characters"):
            c.list('""', '"' + "*" * (MAX_LIST_PATTERN + 1) + '"')
        c.logout()

    await run(scenario)


async def test_folder_names_are_bounded(imap: Server) -> None:
    def scenario() -> None:
        c = imap.connect()
        typ, data = c.create('"' + "x" * (MAX_NAME + 1) + '"')
        assert typ == "NO"
        assert b"[CANNOT] folder names are at most 255 characters" in data[0]
        ok(c.create('"p/' + "c" * (MAX_NAME - 2) + '"'))
        typ, data = c.rename("p", "pp")  # its subfolder would get 256 characters
        assert (typ, data) == ("NO", [b"[CANNOT] folder names are at most 255 characters"])
        typ, data = c.rename('"p/' + "c" * (MAX_NAME - 2) + '"', '"' + "d" * (MAX_NAME + 1) + '"')
        assert typ == "NO"
        ok(c.rename("p", "q"))
        assert b"q/" + b"c" * (MAX_NAME - 2) in b"".join(ok(c.list('""', '"q/%"')))
        c.logout()

    await run(scenario)


# --- rules --------------------------------------------------------------------------------


def decide(field: str, op: Op, value: str, view: MessageView) -> bool:
    ruleset = compile_rules([Rule("r", (Condition(field, op, value),), (Action(ActionKind.SPAM),))])
    return evaluate(ruleset, view).spam


def view(subject: str = "", **headers: tuple[str, ...]) -> MessageView:
    return MessageView(recipients=(), senders=(), subject=subject, headers=headers, size=0)


@pytest.mark.timeout(30)  # Python's re takes longer than the universe's age: fail, don't hang
def test_rule_regex_is_linear() -> None:
    hostile = "a" * 5000 + "!"
    assert decide("subject", Op.MATCHES, r"(a+)+$", view(hostile)) is False
    assert decide("header:x-h", Op.MATCHES, r"^(a|aa)+$", view(**{"x-h": (hostile,)})) is False
    assert decide("subject", Op.MATCHES, r"(a+)+!$", view(hostile)) is True


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"(faktura)\s+\1", r"invalid escape sequence: \1"),
        (r"(?P<n>x)(?P=n)", "invalid perl operator: (?P"),
        (r"faktura(?= nr)", "invalid perl operator: (?="),
        (r"(?<!pro )forma", "invalid perl operator: (?<!"),
    ],
)
def test_rule_regex_refuses_backreferences(tmp_path: Path, pattern: str, reason: str) -> None:
    data: dict[str, Any] = config_dict(tmp_path)
    data["tenants"][0]["rules"][0]["conditions"][0].update(op="not_matches", value=pattern)
    with pytest.raises(ConfigError) as excinfo:
        parse_config(data)
    (error,) = excinfo.value.errors
    assert error.startswith(
        f"tenants[0].rules[0].conditions[0]: rule 'orders': invalid pattern {pattern!r}: "
    )
    assert reason in error
    assert "no backreferences or lookaround" in error
    with pytest.raises(RuleError):
        compile_rules([Rule("r", (Condition("subject", Op.MATCHES, pattern),), (Action(ActionKind.SPAM),))])


def test_rule_text_is_bounded() -> None:
    far = "x" * TEXT_LIMIT + "faktura"
    for op in (Op.CONTAINS, Op.MATCHES, Op.GLOB):
        value = "*faktura*" if op is Op.GLOB else "faktura"
        assert decide("subject", op, value, view(far)) is False
        assert decide("subject", op, value, view(far[-TEXT_LIMIT:])) is True


def test_rule_regex_on_undecodable_header_bytes() -> None:
    # A header may keep bytes that are not UTF-8 as lone surrogates (surrogateescape).
    assert decide("header:x-h", Op.MATCHES, "zam.wienie", view(**{"x-h": ("zam\udcf3wienie",)})) is True
    assert decide("subject", Op.MATCHES, "ZAMÓWIENIE", view("zamówienie")) is True


@pytest.mark.timeout(30)
def test_rule_glob_is_linear() -> None:
    hostile = "a" * 20000
    assert decide("subject", Op.GLOB, "*a*a*a*a*a*a*a*a*a*ab", view(hostile)) is False


# --- SEARCH -------------------------------------------------------------------------------


def test_search_keys_and_nesting_are_bounded_by_the_parser() -> None:
    with pytest.raises(ParseError, match="more than 1000 search keys"):
        parse(list_line("A1 SEARCH " + " ".join(['BODY "x"'] * 1001)))
    with pytest.raises(ParseError, match="nested too deeply"):
        parse(list_line("A1 SEARCH " + "OR BODY x " * 101 + "ALL"))
    assert parse(list_line("A1 SEARCH " + " ".join(['TEXT "x"'] * 1000))).tag == "A1"


async def test_search_matches_off_the_event_loop(imap: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []
    match = search_module._match

    def counting(key: Any, m: Any) -> bool:
        threads.append(threading.get_ident())
        return match(key, m)

    monkeypatch.setattr(search_module, "_match", counting)
    loop_thread = threading.get_ident()

    def scenario() -> None:
        c = imap.connect()
        ok(c.select("INBOX"))
        # Flags only (no message text): this used to run key by key on the event loop.
        flags = " ".join(["OR UNSEEN NOT DELETED"] * 200)
        assert ok(c.search(None, flags)) == [b"1 2 3"]
        assert ok(c.search(None, 'OR BODY "Body 2" SUBJECT "HELLO 3"')) == [b"2 3"]
        c.logout()

    await run(scenario)
    assert threads
    assert loop_thread not in threads
