"""Combinations of events: a Binding that fires on a condition over several dependencies.

A binding with ``dependencies`` (each a name, a source and a filter, like a binding's own)
collects the events that match them per correlation key (``correlate``, a CEL value over each
event), and fires once when ``condition`` over the dependencies seen within ``window`` becomes
true (Argo Events' sensor conditions)::

    dependencies:
      - {name: a, source: api, filter: [{exact: {type: com.example.a}}]}
      - {name: b, source: orders}
    condition: "a && (b || c)"     # names of dependencies, &&, ||, parentheses; default: all
    correlate: "data.orderId"      # default: every event of the binding shares one key
    window: 10m

This module is the pure part: the spec, the condition's grammar and its evaluation, and the
compiled :class:`Combination` the router keeps. The collecting is :mod:`eventhub.combiner`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eventhub.errors import FieldProblem
from eventhub.expressions import EvaluationError, Expression, ExpressionError, compile_value
from eventhub.filters import FilterError, compile_filter
from eventhub.flows.expr import to_json_bytes

DEPENDENCY_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
MAX_WINDOW = 24 * 3600.0  # events that fired are kept a day to recognise repeats
_TOKEN = re.compile(r"\s*(?:(&&|\|\|)|([()])|([A-Za-z_][A-Za-z0-9_]*)|(\S))")

Condition = Callable[[frozenset[str]], bool]


class ConditionError(ValueError):
    """A condition that does not parse; the message names the column."""


def parse_condition(text: str, names: Sequence[str]) -> Condition:
    """``a && (b || c)`` as a function of the set of dependencies seen. ``&&`` binds tighter
    than ``||``; every name must be a dependency. Raises :class:`ConditionError`."""
    tokens = _tokens(text)
    known = set(names)
    pos = 0

    def peek() -> tuple[str, str, int] | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> tuple[str, str, int]:
        nonlocal pos
        token = peek()
        if token is None:
            raise ConditionError("the condition ends too early")
        pos += 1
        return token

    def either() -> Condition:
        parts = [both()]
        while (token := peek()) is not None and token[1] == "||":
            take()
            parts.append(both())
        return parts[0] if len(parts) == 1 else _any(parts)

    def both() -> Condition:
        parts = [atom()]
        while (token := peek()) is not None and token[1] == "&&":
            take()
            parts.append(atom())
        return parts[0] if len(parts) == 1 else _all(parts)

    def atom() -> Condition:
        kind, value, column = take()
        if value == "(":
            inner = either()
            kind, value, column = take()
            if value != ")":
                raise ConditionError(f"at column {column}: expected ')', got '{value}'")
            return inner
        if kind != "name":
            raise ConditionError(f"at column {column}: expected a dependency, got '{value}'")
        if value not in known:
            raise ConditionError(
                f"at column {column}: '{value}' is not a dependency (declared: {', '.join(names)})"
            )
        return lambda seen: value in seen

    if not tokens:
        raise ConditionError("must not be empty")
    condition = either()
    if (token := peek()) is not None:
        raise ConditionError(f"at column {token[2]}: unexpected '{token[1]}'")
    return condition


def _any(parts: list[Condition]) -> Condition:
    return lambda seen: any(part(seen) for part in parts)


def _all(parts: list[Condition]) -> Condition:
    return lambda seen: all(part(seen) for part in parts)


def _tokens(text: str) -> list[tuple[str, str, int]]:
    tokens: list[tuple[str, str, int]] = []
    at = 0
    while at < len(text) and text[at:].strip():
        match = _TOKEN.match(text, at)
        if match is None:  # pragma: no cover: the last alternative matches any character
            break
        operator, paren, name, other = match.groups()
        column = match.start(match.lastindex or 0) + 1
        if other is not None:
            raise ConditionError(f"at column {column}: '{other}' is not allowed (use &&, ||, ())")
        kind = "name" if name is not None else "op"
        tokens.append((kind, operator or paren or name, column))
        at = match.end()
    return tokens


@dataclass(frozen=True)
class Combination:
    """A combination binding as the router keeps it, compiled."""

    binding: str
    dependencies: tuple[str, ...]
    condition: Condition
    correlate: Expression | None
    window: float

    def key(self, data: object, attributes: Mapping[str, str]) -> str:
        """The correlation key of an event (its data parsed); raises EvaluationError."""
        if self.correlate is None:
            return ""
        value = self.correlate.value(data, attributes)
        if isinstance(value, str):
            return value
        try:
            return to_json_bytes(value).decode()
        except TypeError as exc:
            raise EvaluationError(str(exc)) from None


def compile_combination(binding: str, spec: Any) -> Combination:
    """``spec`` a validated BindingSpec with dependencies."""
    names = tuple(d.name for d in spec.dependencies)
    condition = parse_condition(spec.condition or " && ".join(names), names)
    correlate = compile_value(spec.correlate, "spec.correlate") if spec.correlate else None
    return Combination(binding, names, condition, correlate, spec.window)


def problems(spec: Any) -> list[FieldProblem]:
    """What is wrong with a combination binding's dependencies, condition and correlate,
    each naming its field (the shapes are checked by the model already)."""
    found: list[FieldProblem] = []
    names: dict[str, int] = {}
    for i, dependency in enumerate(spec.dependencies):
        if dependency.name in names:
            found.append(
                FieldProblem(
                    f"spec.dependencies[{i}].name",
                    f"'{dependency.name}' is declared twice"
                    f" (spec.dependencies[{names[dependency.name]}] too)",
                )
            )
        names.setdefault(dependency.name, i)
        if dependency.source.startswith("function:"):
            # Result events are routed by the dispatcher, which does not collect yet.
            found.append(
                FieldProblem(
                    f"spec.dependencies[{i}].source",
                    "a function's result events cannot be a dependency yet",
                )
            )
        try:
            compile_filter(dependency.filter, path=f"spec.dependencies[{i}].filter")
        except FilterError as exc:
            found.append(FieldProblem(exc.path, exc.message))
    if spec.condition is not None:
        try:
            parse_condition(spec.condition, list(names))
        except ConditionError as exc:
            found.append(FieldProblem("spec.condition", str(exc)))
    if spec.correlate is not None:
        try:
            compile_value(spec.correlate, "spec.correlate")
        except ExpressionError as exc:
            found.append(FieldProblem(exc.path, exc.message))
    return found
