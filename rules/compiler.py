"""Validation of rules and their compilation into matchers.

:func:`compile_rules` checks every rule (see :mod:`rules.evaluator` for the semantics) and
does all the expensive work once: regexes and globs are compiled, string operands are
casefolded. The resulting :class:`RuleSet` is immutable and reused for every message.

A hostile sender controls the text rules look at, so no condition may cost more than
linear time in it: ``matches`` runs on RE2 (``google-re2``: an automaton, no backtracking;
a pattern RE2 cannot run that way, with backreferences or lookaround, is refused here),
``glob`` on :func:`fnmatch.translate`'s regex (which spells every ``*`` but the last as an
atomic group, so it never backtracks across stars), ``is``/``contains`` are string
comparisons. Each value is cut to :data:`TEXT_LIMIT` characters first.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import re2

from rules.model import Action, ActionKind, Condition, MessageView, Op, Rule, RuleError

TRACE_LIMIT = 80
"""Longest ``actual`` value kept in a trace, in characters."""

TEXT_LIMIT = 16 * 1024
"""Characters of each value (subject, header value, address) a condition looks at."""

Matcher = Callable[[MessageView], tuple[bool, str]]
"""Returns whether a condition (negation included) holds, and the value to show for it."""

_Values = Callable[[MessageView], tuple[str, ...]]
_StringTest = Callable[[str], bool]

_HEADER_PREFIX = "header:"
_STRING_OPS = frozenset({Op.IS, Op.CONTAINS, Op.MATCHES, Op.GLOB})
_SIZE_OPS = frozenset({Op.IS, Op.GT, Op.LT})
_VALUELESS_ACTIONS = frozenset({ActionKind.SPAM, ActionKind.SEEN, ActionKind.FLAG})
_LABEL_SPECIALS = frozenset('(){%*"\\]')
_REGEX_OPTIONS = re2.Options()
_REGEX_OPTIONS.case_sensitive = False
_REGEX_OPTIONS.log_errors = False  # the error is raised (and reported at its config path), not logged


@dataclass(frozen=True, slots=True)
class CompiledCondition:
    """A validated condition with its matcher."""

    condition: Condition
    match: Matcher


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A validated rule with compiled conditions."""

    rule: Rule
    conditions: tuple[CompiledCondition, ...]


@dataclass(frozen=True)
class RuleSet:
    """Validated, compiled rules in evaluation order; immutable and reusable."""

    rules: tuple[Rule, ...]
    compiled: tuple[CompiledRule, ...] = field(repr=False, compare=False)


def compile_rules(rules: Sequence[Rule]) -> RuleSet:
    """Validate and compile ``rules``; raise :class:`RuleError` for the first invalid one."""
    seen: set[str] = set()
    compiled: list[CompiledRule] = []
    for rule in rules:
        if not rule.name:
            raise RuleError(rule.name, "rule name must not be empty")
        if rule.name in seen:
            raise RuleError(rule.name, "duplicate rule name")
        seen.add(rule.name)
        compiled.append(_compile_rule(rule))
    return RuleSet(rules=tuple(rules), compiled=tuple(compiled))


def _shorten(text: str, limit: int = TRACE_LIMIT) -> str:
    """Cut ``text`` to at most ``limit`` characters, marking a cut with ``...``."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _compile_rule(rule: Rule) -> CompiledRule:
    if rule.match not in ("any", "all"):
        raise RuleError(rule.name, f"match must be 'any' or 'all', not {rule.match!r}")
    if not rule.actions:
        raise RuleError(rule.name, "a rule needs at least one action")
    for action in rule.actions:
        _check_action(rule.name, action)
    conditions = tuple(
        CompiledCondition(condition, _compile_condition(rule.name, condition))
        for condition in rule.conditions
    )
    return CompiledRule(rule, conditions)


def _check_action(rule: str, action: Action) -> None:
    try:
        kind = ActionKind(action.kind)
    except ValueError:
        raise RuleError(rule, f"unknown action {action.kind!r}") from None
    value = action.value
    if not action.rewrite_from and kind is not ActionKind.FORWARD:
        raise RuleError(rule, f"rewrite_from applies to forward actions only, not {kind.value!r}")
    if kind in _VALUELESS_ACTIONS:
        if value:
            raise RuleError(rule, f"action {kind.value!r} takes no value, got {value!r}")
        return
    if not value:
        raise RuleError(rule, f"action {kind.value!r} needs a value")
    if kind is ActionKind.LABEL:
        if not _is_imap_atom(value):
            raise RuleError(
                rule,
                f"label {value!r} is not a valid IMAP keyword (printable ASCII without "
                'spaces or any of (){%*"\\])',
            )
    elif any(_is_control(char) for char in value):
        raise RuleError(rule, f"{kind.value} {value!r} contains control characters")
    elif kind is ActionKind.FORWARD and not _looks_like_address(value):
        raise RuleError(rule, f"forward address {value!r} is not of the form local@domain")


def _is_imap_atom(text: str) -> bool:
    return all(33 <= ord(char) <= 126 and char not in _LABEL_SPECIALS for char in text)


def _is_control(char: str) -> bool:
    return ord(char) < 32 or ord(char) == 127


def _looks_like_address(text: str) -> bool:
    local, _, domain = text.rpartition("@")
    return bool(local) and bool(domain) and not any(c.isspace() or c in "<>" for c in text)


def _compile_condition(rule: str, condition: Condition) -> Matcher:
    try:
        op = Op(condition.op)
    except ValueError:
        raise RuleError(rule, f"unknown operator {condition.op!r}") from None
    name = condition.field
    value = condition.value
    if name == "size":
        if op not in _SIZE_OPS:
            raise RuleError(rule, f"operator {op.value!r} does not apply to field 'size'")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RuleError(rule, f"field 'size' needs a whole number of bytes >= 0, not {value!r}")
        return _size_matcher(op, value, condition.negate)
    values = _string_field(rule, name)
    if op not in _STRING_OPS:
        raise RuleError(rule, f"operator {op.value!r} does not apply to field {name!r}")
    if not isinstance(value, str):
        raise RuleError(rule, f"operator {op.value!r} on field {name!r} needs a text value")
    return _string_matcher(values, _string_test(rule, op, value), condition.negate)


def _string_field(rule: str, name: str) -> _Values:
    if name == "recipient":
        return _recipients
    if name == "sender":
        return _senders
    if name == "subject":
        return _subject
    if name.startswith(_HEADER_PREFIX):
        header = name.removeprefix(_HEADER_PREFIX)
        if not header or not all(33 <= ord(c) <= 126 and c != ":" for c in header):
            raise RuleError(rule, f"invalid header name in field {name!r}")
        key = header.lower()
        return lambda message: message.headers.get(key, ())
    raise RuleError(
        rule, f"unknown field {name!r} (expected recipient, sender, subject, size or header:<Name>)"
    )


def _recipients(message: MessageView) -> tuple[str, ...]:
    return message.recipients


def _senders(message: MessageView) -> tuple[str, ...]:
    return message.senders


def _subject(message: MessageView) -> tuple[str, ...]:
    return (message.subject,)


def _string_test(rule: str, op: Op, value: str) -> _StringTest:
    if op is Op.MATCHES:
        search = _compile_regex(rule, value).search
        # Encoded here, not by re2: a header may keep undecodable bytes as lone surrogates.
        return lambda text: search(text.encode("utf-8", "replace")) is not None
    folded = value.casefold()
    if op is Op.GLOB:
        glob = re.compile(fnmatch.translate(folded)).match
        return lambda text: glob(text.casefold()) is not None
    if op is Op.CONTAINS:
        return lambda text: folded in text.casefold()
    return lambda text: text.casefold() == folded


def _compile_regex(rule: str, pattern: str) -> re2._Regexp:
    try:
        return re2.compile(pattern, _REGEX_OPTIONS)
    except (re2.error, UnicodeEncodeError) as exc:
        reason = exc.args[0] if isinstance(exc, re2.error) and exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise RuleError(
            rule,
            f"invalid pattern {pattern!r}: {reason} (patterns use RE2 syntax, which runs"
            " in linear time: no backreferences or lookaround)",
        ) from None


def _string_matcher(values: _Values, test: _StringTest, negate: bool) -> Matcher:
    def match(message: MessageView) -> tuple[bool, str]:
        found = values(message)
        for text in found:
            if test(text[:TEXT_LIMIT]):
                return not negate, _shorten(text)
        return negate, _shorten(", ".join(_shorten(text) for text in found))

    return match


def _size_matcher(op: Op, limit: int, negate: bool) -> Matcher:
    def match(message: MessageView) -> tuple[bool, str]:
        size = message.size
        if op is Op.GT:
            hit = size > limit
        elif op is Op.LT:
            hit = size < limit
        else:
            hit = size == limit
        return hit != negate, str(size)

    return match
