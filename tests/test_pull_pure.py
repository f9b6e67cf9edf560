"""Pure parts of pulling: UID sets, FETCH parsing, batching, modified UTF-7."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import mutf7
from gateway.pull.imap_client import parse_fetch, uid_set
from gateway.pull.puller import BATCH, BATCH_BYTES, batches


@pytest.mark.parametrize(
    ("uids", "expected"),
    [
        ([1], "1"),
        ([1, 2, 3], "1:3"),
        ([3, 1, 2, 7, 9, 10], "1:3,7,9:10"),
        ([5, 5, 6], "5:6"),
        ([], ""),
    ],
)
def test_uid_set(uids: list[int], expected: str) -> None:
    assert uid_set(uids) == expected


@given(st.sets(st.integers(min_value=1, max_value=500), max_size=60))
def test_uid_set_round_trip(uids: set[int]) -> None:
    text = uid_set(uids)
    back: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition(":")
        back.update(range(int(lo), int(hi or lo) + 1))
    assert back == uids


def test_parse_fetch_uid_before_and_after_the_literal() -> None:
    lines = [
        b"1 FETCH (UID 10 RFC822.SIZE 5 BODY[] {5}",
        bytearray(b"hello"),
        b")",
        b"2 FETCH (BODY[] {3}",
        bytearray(b"abc"),
        b" UID 11)",
        b"3 FETCH (UID 12 RFC822.SIZE 99)",
        b"Fetch completed (0.001 + 0.000 secs).",
    ]
    bodies, sizes = parse_fetch(lines)
    assert bodies == {10: b"hello", 11: b"abc"}
    assert sizes == {10: 5, 12: 99}


def test_parse_fetch_body_containing_fetch_like_text() -> None:
    lines = [b"1 FETCH (UID 3 BODY[] {20}", bytearray(b"2 FETCH (UID 999 x)\r\n"), b")"]
    assert parse_fetch(lines)[0] == {3: b"2 FETCH (UID 999 x)\r\n"}


def test_batches_bound_count_and_bytes() -> None:
    uids = list(range(1, 131))
    assert [len(b) for b in batches(uids, {})] == [BATCH, BATCH, 30]
    big = {1: BATCH_BYTES, 2: 10, 3: BATCH_BYTES - 10}
    assert list(batches([1, 2, 3], big)) == [[1], [2, 3]]


@pytest.mark.parametrize(
    ("name", "encoded"),
    [
        ("INBOX", "INBOX"),
        ("Wysłane", "Wys&AUI-ane"),
        ("a&b", "a&-b"),
        ("日本語", "&ZeVnLIqe-"),
        ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
    ],
)
def test_mutf7_known_values(name: str, encoded: str) -> None:
    assert mutf7.encode(name) == encoded
    assert mutf7.decode(encoded) == name


@given(st.text())
def test_mutf7_round_trip(name: str) -> None:
    assert mutf7.decode(mutf7.encode(name)) == name


@pytest.mark.parametrize("bad", ["&", "&AUI", "&!!!-"])
def test_mutf7_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError, match=r"UTF-7|shift"):
        mutf7.decode(bad)
