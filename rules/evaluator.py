"""Pure evaluation of compiled rules against one message, with an explanation.

Theory of operation
-------------------
Configuration is turned into :class:`~rules.model.Rule` values, validated and compiled once
by :func:`~rules.compiler.compile_rules` into a :class:`~rules.compiler.RuleSet`; every
incoming message is reduced by the caller to a :class:`~rules.model.MessageView` and passed
with the rule set to :func:`evaluate`, which returns a :class:`Decision`. Nothing here does
I/O, and evaluation never raises: all validation happened at compile time.

Fields
    ``recipient`` (every envelope/header recipient), ``sender`` (every sender), ``subject``
    (one value), ``header:<Name>`` (every decoded value of that header; the name is any
    printable ASCII except ``:`` and is looked up lower-cased) and ``size`` (bytes, an int).
    Field keywords are lower-case and exact.

Operators
    ``is``, ``contains``, ``glob`` (:func:`fnmatch.fnmatchcase` semantics) and ``matches``
    (a search anywhere in the value, RE2 syntax: no backreferences or lookaround, and
    ``\\w``, ``\\d``, ``\\s``, ``\\b`` are ASCII-only, ``\\pL`` is any letter) compare text
    case-insensitively, like Sieve's default comparator: ``is``/``contains``/``glob``
    casefold both sides, ``matches`` uses RE2's Unicode case folding. Every string test
    sees at most the first :data:`~rules.compiler.TEXT_LIMIT` (16 KiB) characters of each
    value, in time linear in it for a given pattern. ``is``, ``gt`` and ``lt`` compare ``size`` with a
    whole number of bytes. Any operator may be negated with a ``not_`` prefix
    (:func:`~rules.model.parse_op`).

Multi-valued fields
    A positive condition holds if ANY value matches; a negated one holds if NO value
    matches. With no values at all (missing header, no recipients) a positive condition
    is false and a negated one true.

Rules
    ``match = "all"`` needs every condition, ``"any"`` at least one; a rule without
    conditions always matches. Rules run in order; a matching rule with ``stop`` ends the
    evaluation and later rules are not evaluated (nor traced). Every condition of an
    evaluated rule is evaluated, so the trace is complete.

Actions of matching rules
    The first ``folder`` action wins; later ones are skipped and left out of the rule's
    ``applied`` actions. Labels and forward addresses accumulate, de-duplicated in
    first-seen order (a forward's ``rewrite_from`` is the one of its first action:
    an address forwarded with ``rewrite_from = false`` is in ``keep_from``).
    ``spam``, ``seen`` and ``flag`` set their flag.
"""

from __future__ import annotations

from dataclasses import dataclass

from rules.compiler import RuleSet
from rules.model import Action, ActionKind, Condition, MessageView


@dataclass(frozen=True)
class ConditionTrace:
    """How one condition fared; ``actual`` is the matching value or a short summary."""

    condition: Condition
    matched: bool
    actual: str


@dataclass(frozen=True)
class RuleTrace:
    """How one evaluated rule fared and which of its actions took effect."""

    rule: str
    matched: bool
    conditions: tuple[ConditionTrace, ...]
    applied: tuple[Action, ...]
    stopped: bool


@dataclass(frozen=True)
class Decision:
    """What to do with a message, with the trace that led there."""

    folder: str | None
    labels: tuple[str, ...]
    spam: bool
    seen: bool
    flagged: bool
    forwards: tuple[str, ...]
    trace: tuple[RuleTrace, ...]
    keep_from: frozenset[str] = frozenset()  # forwards sent with the original From:

    def explain(self) -> str:
        """Describe, line by line, every evaluated rule and the final decision."""
        lines = [line for rule in self.trace for line in _explain_rule(rule)]
        if not self.trace:
            lines.append("no rules")
        lines.append("decision:")
        lines.append(f"  folder: {self._folder_text()}")
        lines.append(f"  labels: {', '.join(self.labels) or 'none'}")
        states = (("spam", self.spam), ("seen", self.seen), ("flagged", self.flagged))
        flags = [name for name, on in states if on]
        lines.append(f"  flags: {', '.join(flags) or 'none'}")
        forwards = [f"{a} (From kept)" if a in self.keep_from else a for a in self.forwards]
        lines.append(f"  forwards: {', '.join(forwards) or 'none'}")
        return "\n".join(lines)

    def _folder_text(self) -> str:
        for rule in self.trace:
            if any(action.kind is ActionKind.FOLDER for action in rule.applied):
                return f"{self.folder} (rule {rule.rule!r})"
        return "default (no rule chose one)"


def evaluate(ruleset: RuleSet, message: MessageView) -> Decision:
    """Run ``ruleset`` over ``message`` and return the resulting :class:`Decision`."""
    folder: str | None = None
    labels: dict[str, None] = {}
    forwards: dict[str, bool] = {}  # address: rewrite_from
    spam = seen = flagged = False
    traces: list[RuleTrace] = []
    for compiled in ruleset.compiled:
        rule = compiled.rule
        conditions = tuple(ConditionTrace(c.condition, *c.match(message)) for c in compiled.conditions)
        if not conditions:
            matched = True
        elif rule.match == "all":
            matched = all(trace.matched for trace in conditions)
        else:
            matched = any(trace.matched for trace in conditions)
        applied: list[Action] = []
        for action in rule.actions if matched else ():
            kind = ActionKind(action.kind)
            if kind is ActionKind.FOLDER:
                if folder is not None:
                    continue
                folder = action.value
            elif kind is ActionKind.LABEL:
                labels.setdefault(action.value)
            elif kind is ActionKind.FORWARD:
                forwards.setdefault(action.value, action.rewrite_from)
            elif kind is ActionKind.SPAM:
                spam = True
            elif kind is ActionKind.SEEN:
                seen = True
            else:
                flagged = True
            applied.append(action)
        stopped = matched and rule.stop
        traces.append(RuleTrace(rule.name, matched, conditions, tuple(applied), stopped))
        if stopped:
            break
    return Decision(
        folder=folder,
        labels=tuple(labels),
        spam=spam,
        seen=seen,
        flagged=flagged,
        forwards=tuple(forwards),
        trace=tuple(traces),
        keep_from=frozenset(a for a, rewrite in forwards.items() if not rewrite),
    )


def _explain_rule(trace: RuleTrace) -> list[str]:
    outcome = "matched" if trace.matched else "not matched"
    lines = [f"rule {trace.rule!r}: {outcome}"]
    if not trace.conditions:
        lines.append("  (no conditions: always matches)")
    for cond in trace.conditions:
        mark = "+" if cond.matched else "-"
        c = cond.condition
        op = f"not_{c.op}" if c.negate else str(c.op)
        lines.append(f"  {mark} {c.field} {op} {c.value!r} (actual: {cond.actual!r})")
    if trace.applied:
        lines.append("  applied: " + ", ".join(_action_text(a) for a in trace.applied))
    if trace.stopped:
        lines.append("  stop: later rules not evaluated")
    return lines


def _action_text(action: Action) -> str:
    kind = ActionKind(action.kind)
    text = f"{kind.value} {action.value!r}" if action.value else kind.value
    return text if action.rewrite_from else text + " (From kept)"
