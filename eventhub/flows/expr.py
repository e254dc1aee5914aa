"""The expressions of a Flow: choice conditions (``when``) and input mappings (``input``).

Both are CEL, the language of binding filters (:mod:`eventhub.expressions`), evaluated against
a JSON value bound to ``data``: the result of the step before (for the first step, the trigger
event's data). A condition is true or not (an error is "not"); a mapping yields the value the
next step receives, and a mapping that fails at run time (a missing field) fails the run.

This module is the one place flows touch the expression engine: :func:`compile_condition` and
:func:`compile_mapping` take ``(text, path)`` and raise :class:`ExpressionError` naming the
path and the position; what they return has ``evaluate(data)``.
"""

from __future__ import annotations

import base64
from datetime import timedelta
from typing import Any

import orjson

from eventhub.expressions import (
    EvaluationError,
    Expression,
    ExpressionError,
    compile_expression,
    compile_value,
)

__all__ = [
    "Condition",
    "ExpressionError",
    "Mapping",
    "MappingFailed",
    "compile_condition",
    "compile_mapping",
    "to_json_bytes",
]


class MappingFailed(Exception):
    """A mapping has no value for this data (a missing field, a type mismatch ...)."""


class Condition:
    """A choice rule's ``when``: true or not for a JSON value."""

    __slots__ = ("_expression", "text")

    def __init__(self, expression: Expression) -> None:
        self._expression = expression
        self.text = expression.text

    def evaluate(self, data: object) -> bool:
        """True only when the expression yields ``true``; never raises."""
        return self._expression.evaluate_data(data)


class Mapping:
    """An ``input`` mapping: the value a step receives, computed from a JSON value."""

    __slots__ = ("_expression", "text")

    def __init__(self, expression: Expression) -> None:
        self._expression = expression
        self.text = expression.text

    def evaluate(self, data: object) -> object:
        """The mapped value (CEL values as JSON: see :func:`to_json_bytes`); raises
        :class:`MappingFailed` when the expression has no value for ``data``."""
        try:
            return self._expression.value(data)
        except EvaluationError as exc:
            raise MappingFailed(str(exc)) from None


def compile_condition(text: object, path: str) -> Condition:
    """Raises :class:`ExpressionError` naming ``path`` and the position."""
    return Condition(compile_expression(text, path))  # type: ignore[arg-type]  # it checks


def compile_mapping(text: object, path: str) -> Mapping:
    """Raises :class:`ExpressionError` naming ``path`` and the position."""
    return Mapping(compile_value(text, path))  # type: ignore[arg-type]  # it checks


def _default(value: Any) -> Any:
    if isinstance(value, timedelta):
        return f"{value.total_seconds():g}s"
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def to_json_bytes(value: object) -> bytes:
    """A mapped value as JSON, as CEL's JSON conversion has it: a timestamp as RFC 3339 text,
    a duration as seconds (``"1.5s"``), bytes as base64, map keys as strings."""
    return orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS)
