"""Tests of the pure routing-rules package."""

from __future__ import annotations

import fnmatch
import pickle
import re
from collections.abc import Mapping
from typing import Any, Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rules import (
    Action,
    ActionKind,
    Condition,
    Decision,
    MessageView,
    Op,
    Rule,
    RuleError,
    compile_rules,
    evaluate,
    parse_op,
)

HEADERS: Mapping[str, tuple[str, ...]] = {
    "x-priority": ("1",),
    "list-id": ("<news.acme.test>",),
    "received": ("from a", "from b"),
}


def message(
    *,
    recipients: tuple[str, ...] = ("sklep@acme.test", "info@acme.test"),
    senders: tuple[str, ...] = ("jan@example.pl",),
    subject: str = "Nowe zamówienie nr 42",
    headers: Mapping[str, tuple[str, ...]] = HEADERS,
    size: int = 2048,
) -> MessageView:
    return MessageView(recipients=recipients, senders=senders, subject=subject, headers=headers, size=size)


def cond(field: str, op_text: str, value: str | int) -> Condition:
    op, negate = parse_op(op_text)
    return Condition(field, op, value, negate)


def rule(
    name: str = "r",
    *conditions: Condition,
    actions: tuple[Action, ...] = (Action(ActionKind.LABEL, "L"),),
    match: Literal["any", "all"] = "any",
    stop: bool = False,
) -> Rule:
    return Rule(name, conditions, actions, match, stop)


def folder(name: str) -> Action:
    return Action(ActionKind.FOLDER, name)


def label(name: str) -> Action:
    return Action(ActionKind.LABEL, name)


def run(*rules: Rule, view: MessageView | None = None) -> Decision:
    return evaluate(compile_rules(rules), view or message())


def condition_holds(condition: Condition, view: MessageView) -> bool:
    return run(rule("r", condition), view=view).trace[0].conditions[0].matched


# --- field x operator --------------------------------------------------------------------

FIELD_OP_CASES: list[tuple[str, str, str | int, dict[str, Any], bool]] = [
    # recipient: multi-valued, any value may match
    ("recipient", "is", "sklep@acme.test", {}, True),
    ("recipient", "is", "SKLEP@ACME.TEST", {}, True),
    ("recipient", "is", "info@acme.test", {}, True),
    ("recipient", "is", "other@acme.test", {}, False),
    ("recipient", "is", "sklep@acme", {}, False),
    ("recipient", "not_is", "other@acme.test", {}, True),
    ("recipient", "not_is", "info@acme.test", {}, False),
    ("recipient", "contains", "@acme.", {}, True),
    ("recipient", "contains", "@ACME.", {}, True),
    ("recipient", "contains", "example", {}, False),
    ("recipient", "not_contains", "@acme.", {}, False),
    ("recipient", "not_contains", "example", {}, True),
    ("recipient", "glob", "*@acme.test", {}, True),
    ("recipient", "glob", "INFO@*", {}, True),
    ("recipient", "glob", "*@acme", {}, False),
    ("recipient", "glob", "s?ep@acme.test", {}, False),
    ("recipient", "glob", "sk?ep@[a-c]cme.test", {}, True),
    ("recipient", "not_glob", "*@example.*", {}, True),
    ("recipient", "not_glob", "info@*", {}, False),
    ("recipient", "matches", r"^info@", {}, True),
    ("recipient", "matches", r"^INFO@", {}, True),
    ("recipient", "matches", r"example", {}, False),
    ("recipient", "not_matches", r"example", {}, True),
    ("recipient", "not_matches", r"acme\.test$", {}, False),
    # no values: positive -> False, negated -> True
    ("recipient", "is", "sklep@acme.test", {"recipients": ()}, False),
    ("recipient", "contains", "", {"recipients": ()}, False),
    ("recipient", "glob", "*", {"recipients": ()}, False),
    ("recipient", "matches", "", {"recipients": ()}, False),
    ("recipient", "not_is", "sklep@acme.test", {"recipients": ()}, True),
    ("recipient", "not_contains", "", {"recipients": ()}, True),
    ("recipient", "not_glob", "*", {"recipients": ()}, True),
    ("recipient", "not_matches", "", {"recipients": ()}, True),
    # sender
    ("sender", "is", "jan@example.pl", {}, True),
    ("sender", "is", "Jan@Example.PL", {}, True),
    ("sender", "not_is", "jan@example.pl", {}, False),
    ("sender", "contains", "@example.pl", {}, True),
    ("sender", "not_contains", "@acme", {}, True),
    ("sender", "glob", "*@example.pl", {}, True),
    ("sender", "not_glob", "*@example.pl", {}, False),
    ("sender", "matches", r"@example\.(pl|de)$", {}, True),
    ("sender", "not_matches", r"@example\.(pl|de)$", {}, False),
    ("sender", "is", "a@b.test", {"senders": ("x@y.test", "a@b.test")}, True),
    ("sender", "not_is", "a@b.test", {"senders": ("x@y.test", "a@b.test")}, False),
    ("sender", "contains", "x", {"senders": ()}, False),
    ("sender", "not_contains", "x", {"senders": ()}, True),
    # subject, with Polish text
    ("subject", "is", "nowe zamówienie nr 42", {}, True),
    ("subject", "is", "NOWE ZAMÓWIENIE NR 42", {}, True),
    ("subject", "is", "zamówienie", {}, False),
    ("subject", "not_is", "zamówienie", {}, True),
    ("subject", "contains", "zamówienie", {}, True),
    ("subject", "contains", "ZAMÓWIENIE", {}, True),
    ("subject", "contains", "zamówienie", {"subject": "ZAMÓWIENIE PILNE"}, True),
    ("subject", "contains", "zamowienie", {}, False),
    ("subject", "contains", "strasse", {"subject": "Straße 1"}, True),
    ("subject", "not_contains", "faktura", {}, True),
    ("subject", "not_contains", "ZAMÓWIENIE", {}, False),
    ("subject", "glob", "*zamówienie*", {}, True),
    ("subject", "glob", "*ZAMÓWIENIE NR ??", {}, True),
    ("subject", "glob", "zamówienie*", {}, False),
    ("subject", "not_glob", "zamówienie*", {}, True),
    ("subject", "matches", r"zamówienie nr \d+", {}, True),
    ("subject", "matches", "ZAMÓWIENIE", {}, True),
    ("subject", "matches", r"^zamówienie", {}, False),
    ("subject", "not_matches", r"^zamówienie", {}, True),
    ("subject", "is", "", {"subject": ""}, True),
    ("subject", "not_is", "", {"subject": ""}, False),
    # header:<Name>, looked up case-insensitively, multi-valued
    ("header:X-Priority", "is", "1", {}, True),
    ("header:x-priority", "is", "1", {}, True),
    ("header:X-PRIORITY", "not_is", "1", {}, False),
    ("header:Received", "is", "FROM B", {}, True),
    ("header:Received", "contains", "from b", {}, True),
    ("header:Received", "not_contains", "from b", {}, False),
    ("header:Received", "not_contains", "from c", {}, True),
    ("header:List-Id", "glob", "<*.acme.test>", {}, True),
    ("header:List-Id", "not_glob", "<*.acme.test>", {}, False),
    ("header:List-Id", "matches", r"news\.ACME", {}, True),
    ("header:List-Id", "not_matches", r"news\.acme", {}, False),
    ("header:X-Missing", "is", "", {}, False),
    ("header:X-Missing", "contains", "", {}, False),
    ("header:X-Missing", "glob", "*", {}, False),
    ("header:X-Missing", "matches", "", {}, False),
    ("header:X-Missing", "not_is", "", {}, True),
    ("header:X-Missing", "not_contains", "", {}, True),
    ("header:X-Missing", "not_glob", "*", {}, True),
    ("header:X-Missing", "not_matches", "", {}, True),
    ("header:X-Empty", "contains", "x", {"headers": {"x-empty": ()}}, False),
    ("header:X-Empty", "not_contains", "x", {"headers": {"x-empty": ()}}, True),
    # size (2048 bytes)
    ("size", "is", 2048, {}, True),
    ("size", "is", 2047, {}, False),
    ("size", "not_is", 2048, {}, False),
    ("size", "not_is", 2047, {}, True),
    ("size", "gt", 2047, {}, True),
    ("size", "gt", 2048, {}, False),
    ("size", "not_gt", 2048, {}, True),
    ("size", "not_gt", 2047, {}, False),
    ("size", "lt", 2049, {}, True),
    ("size", "lt", 2048, {}, False),
    ("size", "not_lt", 2048, {}, True),
    ("size", "not_lt", 2049, {}, False),
    ("size", "gt", 0, {"size": 0}, False),
    ("size", "is", 0, {"size": 0}, True),
]


@pytest.mark.parametrize(("field", "op_text", "value", "overrides", "expected"), FIELD_OP_CASES)
def test_field_op(
    field: str, op_text: str, value: str | int, overrides: dict[str, Any], expected: bool
) -> None:
    assert condition_holds(cond(field, op_text, value), message(**overrides)) is expected


@pytest.mark.parametrize(
    ("condition", "overrides", "actual"),
    [
        (cond("recipient", "is", "info@acme.test"), {}, "info@acme.test"),
        (cond("recipient", "not_is", "info@acme.test"), {}, "info@acme.test"),
        (cond("recipient", "is", "x@y.test"), {}, "sklep@acme.test, info@acme.test"),
        (cond("recipient", "is", "x@y.test"), {"recipients": ()}, ""),
        (cond("subject", "contains", "ZAMÓWIENIE"), {}, "Nowe zamówienie nr 42"),
        (cond("header:Received", "contains", "b"), {}, "from b"),
        (cond("header:X-Missing", "not_contains", "b"), {}, ""),
        (cond("size", "gt", 10), {}, "2048"),
        (cond("subject", "contains", "x"), {"subject": "y" * 500}, "y" * 77 + "..."),
    ],
)
def test_trace_actual(condition: Condition, overrides: dict[str, Any], actual: str) -> None:
    trace = run(rule("r", condition), view=message(**overrides)).trace[0]
    assert trace.conditions[0].actual == actual
    assert len(trace.conditions[0].actual) <= 80


# --- parse_op --------------------------------------------------------------------------


@pytest.mark.parametrize("op", list(Op))
def test_parse_op(op: Op) -> None:
    assert parse_op(op.value) == (op, False)
    assert parse_op(f"not_{op.value}") == (op, True)


@pytest.mark.parametrize("text", ["", "equals", "not_", "not_not_is", "NOT_IS", "Contains", "not"])
def test_parse_op_unknown(text: str) -> None:
    with pytest.raises(RuleError, match="unknown operator") as info:
        parse_op(text, rule="orders")
    assert info.value.rule == "orders"
    assert "'orders'" in str(info.value)


# --- rule combination, stop, actions -----------------------------------------------------

TRUE = cond("subject", "contains", "zamówienie")
FALSE = cond("subject", "contains", "faktura")


@pytest.mark.parametrize(
    ("match", "conditions", "expected"),
    [
        ("any", (TRUE, FALSE), True),
        ("any", (FALSE, TRUE), True),
        ("any", (FALSE, FALSE), False),
        ("any", (TRUE,), True),
        ("all", (TRUE, TRUE), True),
        ("all", (TRUE, FALSE), False),
        ("all", (FALSE, TRUE), False),
        ("all", (FALSE,), False),
        ("any", (), True),
        ("all", (), True),
    ],
)
def test_match_any_all(
    match: Literal["any", "all"], conditions: tuple[Condition, ...], expected: bool
) -> None:
    decision = run(rule("r", *conditions, match=match))
    assert decision.trace[0].matched is expected
    assert len(decision.trace[0].conditions) == len(conditions)
    assert decision.labels == (("L",) if expected else ())


def test_stop_on_matching_rule_ends_evaluation() -> None:
    decision = run(
        rule("first", TRUE, actions=(label("A"),), stop=True),
        rule("second", actions=(label("B"),)),
    )
    assert [t.rule for t in decision.trace] == ["first"]
    assert decision.trace[0].stopped
    assert decision.labels == ("A",)


def test_stop_on_non_matching_rule_is_ignored() -> None:
    decision = run(
        rule("first", FALSE, actions=(label("A"),), stop=True),
        rule("second", actions=(label("B"),)),
    )
    assert [(t.rule, t.matched, t.stopped) for t in decision.trace] == [
        ("first", False, False),
        ("second", True, False),
    ]
    assert decision.trace[0].applied == ()
    assert decision.labels == ("B",)


def test_folder_first_wins() -> None:
    decision = run(
        rule("miss", FALSE, actions=(folder("Never"),)),
        rule("orders", TRUE, actions=(folder("Orders"), folder("Also"), label("Orders"))),
        rule("later", actions=(folder("Later"), label("Later"))),
    )
    assert decision.folder == "Orders"
    assert decision.trace[1].applied == (folder("Orders"), label("Orders"))
    assert decision.trace[2].applied == (label("Later"),)
    assert decision.labels == ("Orders", "Later")


def test_labels_forwards_and_flags_accumulate() -> None:
    decision = run(
        rule("a", actions=(label("B"), label("A"), Action(ActionKind.FORWARD, "x@y.test"))),
        rule("b", actions=(label("A"), label("C"), Action(ActionKind.SPAM))),
        rule("c", FALSE, actions=(label("Z"), Action(ActionKind.FLAG))),
        rule(
            "d",
            actions=(
                Action(ActionKind.SEEN),
                Action(ActionKind.FORWARD, "x@y.test"),
                Action(ActionKind.FORWARD, "z@y.test"),
            ),
        ),
    )
    assert decision.labels == ("B", "A", "C")
    assert decision.forwards == ("x@y.test", "z@y.test")
    assert (decision.spam, decision.seen, decision.flagged) == (True, True, False)
    assert decision.folder is None


def test_forward_rewrite_from_option_first_action_wins() -> None:
    keep = Action(ActionKind.FORWARD, "x@y.test", rewrite_from=False)
    decision = run(
        rule("a", actions=(keep, Action(ActionKind.FORWARD, "z@y.test"))),
        rule(
            "b",
            actions=(Action(ActionKind.FORWARD, "x@y.test"), Action(ActionKind.FORWARD, "w@y.test", False)),
        ),
    )
    assert decision.forwards == ("x@y.test", "z@y.test", "w@y.test")
    assert decision.keep_from == frozenset({"x@y.test", "w@y.test"})
    text = decision.explain()
    assert "applied: forward 'x@y.test' (From kept), forward 'z@y.test'" in text
    assert "  forwards: x@y.test (From kept), z@y.test, w@y.test (From kept)" in text


def test_rewrite_from_applies_to_forward_only() -> None:
    with pytest.raises(RuleError, match="rewrite_from applies to forward actions only"):
        compile_rules([rule("bad", actions=(Action(ActionKind.FOLDER, "X", rewrite_from=False),))])


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ({"forward": "boss@else.test"}, Action(ActionKind.FORWARD, "boss@else.test")),
        (
            {"forward": "boss@else.test", "rewrite_from": False},
            Action(ActionKind.FORWARD, "boss@else.test", rewrite_from=False),
        ),
        ({"forward": "boss@else.test", "rewrite_from": True}, Action(ActionKind.FORWARD, "boss@else.test")),
        ({"folder": "X", "rewrite_from": False}, "rewrite_from applies to forward actions only"),
        ({"forward": "boss@else.test", "rewrite_from": "no"}, "rewrite_from takes true or false"),
        ({"forward": "a@b.test", "label": "X"}, "exactly one key"),
        ({"rewrite_from": False}, "exactly one key"),
    ],
)
def test_forward_rewrite_from_in_the_configuration(action: dict[str, Any], expected: Action | str) -> None:
    from gateway.config import ConfigError, parse_config

    data = {"tenants": [{"id": "t", "domains": ["t.test"], "rules": [{"name": "r", "actions": [action]}]}]}
    if isinstance(expected, str):
        with pytest.raises(ConfigError) as exc:
            parse_config(data)
        assert exc.value.errors[0].startswith("tenants[0].rules[0].actions[0]: ")
        assert expected in exc.value.errors[0]
    else:
        assert parse_config(data).tenants[0].rules[0].actions == (expected,)


@pytest.mark.parametrize(
    ("kind", "attribute"),
    [(ActionKind.SPAM, "spam"), (ActionKind.SEEN, "seen"), (ActionKind.FLAG, "flagged")],
)
def test_flag_actions(kind: ActionKind, attribute: str) -> None:
    decision = run(rule("r", actions=(Action(kind),)))
    assert getattr(decision, attribute) is True
    assert decision.trace[0].applied == (Action(kind),)


def test_no_rules() -> None:
    decision = evaluate(compile_rules([]), message())
    assert decision == Decision(None, (), False, False, False, (), ())
    assert "folder: default (no rule chose one)" in decision.explain()


def test_ruleset_is_reusable_and_stateless() -> None:
    ruleset = compile_rules([rule("orders", TRUE, actions=(folder("Orders"), label("Orders")), stop=True)])
    first = evaluate(ruleset, message())
    other = evaluate(ruleset, message(subject="hello"))
    again = evaluate(ruleset, message())
    assert first == again
    assert first.folder == "Orders"
    assert other.folder is None
    assert other.labels == ()
    assert ruleset == compile_rules(list(ruleset.rules))


def test_evaluation_compiles_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    ruleset = compile_rules(
        [
            rule(
                "all-string-ops",
                cond("subject", "matches", r"zamówienie \w+"),
                cond("subject", "glob", "*ZAMÓWIENIE*"),
                cond("recipient", "contains", "ACME"),
                cond("sender", "not_is", "X@Y"),
            )
        ]
    )

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("compiled during evaluation")

    for name in ("compile", "search", "match", "fullmatch"):
        monkeypatch.setattr(re, name, forbidden)
    for name in ("fnmatch", "fnmatchcase", "translate"):
        monkeypatch.setattr(fnmatch, name, forbidden)
    decision = evaluate(ruleset, message())
    assert [c.matched for c in decision.trace[0].conditions] == [True, True, True, True]


# --- the TOML example from the configuration ---------------------------------------------


def test_config_example() -> None:
    orders = Rule(
        name="orders",
        match="any",
        conditions=(
            cond("subject", "contains", "zamówienie"),
            cond("recipient", "is", "sklep@acme.test"),
        ),
        actions=(folder("Orders"), label("Orders")),
        stop=True,
    )
    ruleset = compile_rules([orders, rule("after")])
    by_subject = evaluate(ruleset, message(subject="ZAMÓWIENIE 7", recipients=("x@acme.test",)))
    by_recipient = evaluate(ruleset, message(subject="hi", recipients=("sklep@acme.test",)))
    neither = evaluate(ruleset, message(subject="hi", recipients=("x@acme.test",)))
    assert by_subject.folder == by_recipient.folder == "Orders"
    assert by_subject.labels == ("Orders",)
    assert len(by_subject.trace) == 1
    assert neither.folder is None
    assert neither.labels == ("L",)
    assert [t.rule for t in neither.trace] == ["orders", "after"]


# --- explain -----------------------------------------------------------------------------


def test_explain_with_folder() -> None:
    decision = run(
        rule("spam", cond("header:X-Spam", "is", "yes"), actions=(Action(ActionKind.SPAM),)),
        rule(
            "orders",
            cond("subject", "contains", "ZAMÓWIENIE"),
            cond("recipient", "not_is", "info@acme.test"),
            actions=(folder("Orders"), label("Orders"), Action(ActionKind.SEEN)),
            stop=True,
        ),
        rule("never", actions=(folder("Never"),)),
    )
    text = decision.explain()
    assert text.splitlines() == [
        "rule 'spam': not matched",
        "  - header:X-Spam is 'yes' (actual: '')",
        "rule 'orders': matched",
        "  + subject contains 'ZAMÓWIENIE' (actual: 'Nowe zamówienie nr 42')",
        "  - recipient not_is 'info@acme.test' (actual: 'info@acme.test')",
        "  applied: folder 'Orders', label 'Orders', seen",
        "  stop: later rules not evaluated",
        "decision:",
        "  folder: Orders (rule 'orders')",
        "  labels: Orders",
        "  flags: seen",
        "  forwards: none",
    ]


def test_explain_without_folder() -> None:
    decision = run(
        rule("catch-all", actions=(label("A"), label("B"), Action(ActionKind.FLAG))),
        rule("big", cond("size", "gt", 10_000), actions=(folder("Big"),)),
        rule("fwd", actions=(Action(ActionKind.FORWARD, "ops@acme.test"),)),
    )
    text = decision.explain()
    assert "rule 'catch-all': matched\n  (no conditions: always matches)" in text
    assert "rule 'big': not matched\n  - size gt 10000 (actual: '2048')" in text
    assert "  folder: default (no rule chose one)" in text
    assert "  labels: A, B" in text
    assert "  flags: flagged" in text
    assert "  forwards: ops@acme.test" in text


def test_explain_escapes_line_breaks() -> None:
    decision = run(rule("r", cond("subject", "contains", "a")), view=message(subject="a\r\nb"))
    assert len(decision.explain().splitlines()) == 8


# --- errors ------------------------------------------------------------------------------

ERROR_CASES: list[tuple[Rule, str]] = [
    (rule("bad", cond("body", "contains", "x")), "unknown field 'body'"),
    (rule("bad", cond("Subject", "contains", "x")), "unknown field 'Subject'"),
    (rule("bad", cond("header", "contains", "x")), "unknown field 'header'"),
    (rule("bad", cond("header:", "contains", "x")), "invalid header name"),
    (rule("bad", cond("header:X Y", "contains", "x")), "invalid header name"),
    (rule("bad", cond("header:X:Y", "contains", "x")), "invalid header name"),
    (rule("bad", cond("header:Zażółć", "contains", "x")), "invalid header name"),
    (rule("bad", cond("header:X\tY", "contains", "x")), "invalid header name"),
    (rule("bad", cond("subject", "gt", "x")), "'gt' does not apply to field 'subject'"),
    (rule("bad", cond("recipient", "lt", 5)), "'lt' does not apply to field 'recipient'"),
    (rule("bad", cond("header:X-A", "not_gt", 5)), "'gt' does not apply"),
    (rule("bad", cond("size", "contains", 5)), "'contains' does not apply to field 'size'"),
    (rule("bad", cond("size", "matches", "5")), "'matches' does not apply to field 'size'"),
    (rule("bad", cond("size", "not_glob", "5*")), "'glob' does not apply to field 'size'"),
    (rule("bad", cond("size", "gt", "1 MB")), "field 'size' needs a whole number"),
    (rule("bad", cond("size", "lt", -1)), "field 'size' needs a whole number"),
    (rule("bad", cond("size", "is", True)), "field 'size' needs a whole number"),
    (rule("bad", cond("subject", "is", 5)), "needs a text value"),
    (rule("bad", cond("sender", "not_matches", 5)), "needs a text value"),
    (rule("bad", cond("subject", "matches", "(zamówienie")), "missing ): (zamówienie"),
    (rule("bad", cond("subject", "matches", "a{1001}")), "invalid repetition size"),
    (rule("bad", cond("subject", "matches", "*x")), "no argument for repetition operator"),
    (rule("bad", cond("subject", "matches", r"(a)\1")), "no backreferences or lookaround"),
    (rule("bad", cond("subject", "matches", "(?=a)")), "invalid perl operator: (?="),
    (rule("bad", cond("subject", "matches", "(?<!a)b")), "invalid perl operator: (?<!"),
    (rule("bad", cond("subject", "matches", "\ud800")), "invalid pattern"),
    (rule("bad", Condition("subject", "equals", "x")), "unknown operator 'equals'"),  # type: ignore[arg-type]
    (rule("bad", actions=()), "at least one action"),
    (rule("bad", actions=(folder(""),)), "action 'folder' needs a value"),
    (rule("bad", actions=(label(""),)), "action 'label' needs a value"),
    (rule("bad", actions=(Action(ActionKind.FORWARD),)), "action 'forward' needs a value"),
    (rule("bad", actions=(Action(ActionKind.SPAM, "x"),)), "'spam' takes no value"),
    (rule("bad", actions=(Action(ActionKind.SEEN, "x"),)), "'seen' takes no value"),
    (rule("bad", actions=(Action(ActionKind.FLAG, "x"),)), "'flag' takes no value"),
    (rule("bad", actions=(Action("move", "x"),)), "unknown action 'move'"),  # type: ignore[arg-type]
    (rule("bad", actions=(folder("In\r\nbox"),)), "control characters"),
    (rule("bad", actions=(Action(ActionKind.FORWARD, "ops"),)), "not of the form"),
    (rule("bad", actions=(Action(ActionKind.FORWARD, "@acme.test"),)), "not of the form"),
    (rule("bad", actions=(Action(ActionKind.FORWARD, "ops@"),)), "not of the form"),
    (rule("bad", actions=(Action(ActionKind.FORWARD, "a b@acme.test"),)), "not of the form"),
    (rule("bad", actions=(Action(ActionKind.FORWARD, "<a@acme.test>"),)), "not of the form"),
    (rule("bad", actions=(Action(ActionKind.FORWARD, "a@b\r\nRCPT TO:<c@d>"),)), "control"),
    (rule("bad", match="some"), "match must be 'any' or 'all'"),  # type: ignore[arg-type]
    *[
        (rule("bad", actions=(label(text),)), "not a valid IMAP keyword")
        for text in [
            "two words",
            "(x",
            "x)",
            "{3}",
            "%",
            "a*",
            'say"',
            "\\Seen",
            "x]",
            "zamówienie",
            "tab\t",
            "del\x7f",
        ]
    ],
]


@pytest.mark.parametrize(("bad", "fragment"), ERROR_CASES)
def test_rule_errors(bad: Rule, fragment: str) -> None:
    good = rule("good", TRUE)
    with pytest.raises(RuleError) as info:
        compile_rules([good, bad, rule("", actions=())])
    assert info.value.rule == "bad"
    assert str(info.value).startswith("rule 'bad': ")
    assert fragment in str(info.value)


def test_duplicate_rule_names() -> None:
    with pytest.raises(RuleError, match="duplicate rule name") as info:
        compile_rules([rule("orders"), rule("other"), rule("orders")])
    assert str(info.value) == "rule 'orders': duplicate rule name"


def test_empty_rule_name() -> None:
    with pytest.raises(RuleError, match="must not be empty"):
        compile_rules([rule("")])


@pytest.mark.parametrize("text", ["Orders", "$Forwarded", "Junk", "a.b-c_d", "!#&'+,./;<=>?@[^`|}~"])
def test_valid_labels(text: str) -> None:
    assert run(rule("r", actions=(label(text),))).labels == (text,)


def test_rule_error_shape() -> None:
    error = RuleError("orders", "something is wrong")
    assert isinstance(error, ValueError)
    assert (error.rule, error.message) == ("orders", "something is wrong")
    assert str(error) == "rule 'orders': something is wrong"
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own data
    assert (type(copy), str(copy)) == (RuleError, str(error))


# --- properties --------------------------------------------------------------------------

EVERY_OP_CONDITIONS: list[tuple[str, str, str | int]] = [
    ("recipient", "is", "a@b"),
    ("recipient", "contains", "ó"),
    ("recipient", "glob", "*[a-z]?"),
    ("recipient", "matches", r"^\w+@"),
    ("sender", "is", ""),
    ("sender", "contains", "ZAMÓWIENIE"),
    ("sender", "glob", "[!x]*"),
    ("sender", "matches", r"(a|b)+$"),
    ("subject", "is", "zamówienie"),
    ("subject", "contains", "ß"),
    ("subject", "glob", "*\\*"),
    ("subject", "matches", r"\d{2,}"),
    ("header:X-Test", "is", "x"),
    ("header:X-Test", "contains", ""),
    ("header:X-Test", "glob", "[*"),
    ("header:x-test", "matches", "İ"),
    ("size", "is", 0),
    ("size", "gt", 1000),
    ("size", "lt", 1000),
    ("size", "gt", 0),
]

EVERY_OP = compile_rules(
    [
        rule(
            f"r{index}",
            condition,
            actions=(folder(f"F{index}"), label(f"L{index % 3}"), Action(ActionKind.SEEN)),
            match="all" if index % 2 else "any",
            stop=index == 20,
        )
        for index, condition in enumerate(
            cond(field, f"{negation}{op}", value)
            for negation in ("", "not_")
            for field, op, value in EVERY_OP_CONDITIONS
        )
    ]
    + [rule("catch-all", actions=(Action(ActionKind.FLAG), Action(ActionKind.FORWARD, "a@b")))]
)

texts = st.text(max_size=40)
views = st.builds(
    MessageView,
    recipients=st.lists(texts, max_size=4).map(tuple),
    senders=st.lists(texts, max_size=4).map(tuple),
    subject=texts,
    headers=st.dictionaries(
        st.sampled_from(["x-test", "X-Test", "subject"]) | texts,
        st.lists(texts, max_size=3).map(tuple),
        max_size=4,
    ),
    size=st.integers(),
)


@given(views)
def test_evaluate_never_raises(view: MessageView) -> None:
    decision = evaluate(EVERY_OP, view)
    assert 1 <= len(decision.trace) <= len(EVERY_OP.rules)
    assert len(set(decision.labels)) == len(decision.labels)
    assert decision.folder is None or decision.folder.startswith("F")
    assert decision.seen == (decision.folder is not None)
    for trace in decision.trace:
        assert all(len(c.actual) <= 80 for c in trace.conditions)
    assert isinstance(decision.explain(), str)


@given(
    view=views,
    field=st.sampled_from(["recipient", "sender", "subject", "header:X-Test"]),
    op=st.sampled_from([Op.IS, Op.CONTAINS, Op.GLOB, Op.MATCHES]),
    value=st.text(alphabet="abcxóÓAB.^$", max_size=4),
)
def test_negation_is_complement(view: MessageView, field: str, op: Op, value: str) -> None:
    positive = condition_holds(Condition(field, op, value), view)
    negative = condition_holds(Condition(field, op, value, negate=True), view)
    assert positive is not negative


@given(text=st.text(max_size=20), pattern=st.text(alphabet="ab*?[]!-Óó", max_size=6))
def test_glob_is_fnmatchcase_casefolded(text: str, pattern: str) -> None:
    expected = fnmatch.fnmatchcase(text.casefold(), pattern.casefold())
    view = message(subject=text)
    assert condition_holds(Condition("subject", Op.GLOB, pattern), view) is expected
