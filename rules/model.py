"""Plain data of the routing rules: operators, conditions, actions, rules, messages.

Everything here is an immutable value; validation happens in :mod:`rules.compiler`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

_NEGATION_PREFIX = "not_"


class Op(StrEnum):
    """Comparison operator of a condition (negation is carried by ``Condition.negate``)."""

    IS = "is"
    CONTAINS = "contains"
    MATCHES = "matches"
    GLOB = "glob"
    GT = "gt"
    LT = "lt"


class ActionKind(StrEnum):
    """What a matching rule does to the message."""

    FOLDER = "folder"
    LABEL = "label"
    SPAM = "spam"
    SEEN = "seen"
    FLAG = "flag"
    FORWARD = "forward"


class RuleError(ValueError):
    """An invalid rule; ``str(error)`` is ``"rule '<name>': <message>"``."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(rule, message)
        self.rule = rule
        self.message = message

    def __str__(self) -> str:
        return f"rule {self.rule!r}: {self.message}"


def parse_op(text: str, *, rule: str = "") -> tuple[Op, bool]:
    """Parse an operator such as ``"contains"`` or ``"not_contains"`` into ``(op, negate)``.

    ``rule`` only names the rule in the :class:`RuleError` raised for an unknown operator.
    """
    negate = text.startswith(_NEGATION_PREFIX)
    name = text.removeprefix(_NEGATION_PREFIX)
    try:
        return Op(name), negate
    except ValueError:
        known = ", ".join(op.value for op in Op)
        raise RuleError(
            rule, f"unknown operator {text!r} (expected one of {known}, optionally prefixed 'not_')"
        ) from None


@dataclass(frozen=True, slots=True)
class Condition:
    """One test: ``field`` compared with ``value`` by ``op``, inverted when ``negate``."""

    field: str
    op: Op
    value: str | int
    negate: bool = False


@dataclass(frozen=True, slots=True)
class Action:
    """One effect; ``value`` is the folder, label or forward address, ``""`` for flags.

    ``rewrite_from`` applies to ``forward`` only: False sends the copy with its
    original ``From:`` (its envelope sender is rewritten by SRS either way).
    """

    kind: ActionKind
    value: str = ""
    rewrite_from: bool = True


@dataclass(frozen=True, slots=True)
class Rule:
    """Named conditions combined by ``match``; ``stop`` ends evaluation when it matches."""

    name: str
    conditions: tuple[Condition, ...]
    actions: tuple[Action, ...]
    match: Literal["any", "all"] = "any"
    stop: bool = False


@dataclass(frozen=True, slots=True)
class MessageView:
    """The parts of a message rules can see, already decoded by the caller."""

    recipients: tuple[str, ...]
    senders: tuple[str, ...]
    subject: str
    headers: Mapping[str, tuple[str, ...]]
    size: int
