"""Routing rules of mailgate: pure data, validation/compilation and evaluation.

See :mod:`rules.evaluator` for the semantics.
"""

from rules.compiler import RuleSet, compile_rules
from rules.evaluator import ConditionTrace, Decision, RuleTrace, evaluate
from rules.model import (
    Action,
    ActionKind,
    Condition,
    MessageView,
    Op,
    Rule,
    RuleError,
    parse_op,
)

__all__ = [
    "Action",
    "ActionKind",
    "Condition",
    "ConditionTrace",
    "Decision",
    "MessageView",
    "Op",
    "Rule",
    "RuleError",
    "RuleSet",
    "RuleTrace",
    "compile_rules",
    "evaluate",
    "parse_op",
]
