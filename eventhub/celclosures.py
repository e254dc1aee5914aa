"""The closures a compiled CEL expression is made of, for :mod:`eventhub.celcompile`.

Each takes ``(scope, bound)``: the event (``scope.data``, ``scope.attribute(name)``) and the
values of the enclosing macros' variables, by position. Comparisons against a constant are
specialised for the common case (``data.amount > 100``: a number against a number, no generic
type check), ``in`` a constant list of strings is a set lookup, and a constant pattern of
``matches()`` is compiled once. Macros absorb errors as CEL says: ``all`` is false if any
element is false, whatever errors others raise; ``exists`` true if any is true.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from eventhub import celconvert as cv
from eventhub import celruntime as rt
from eventhub.celruntime import EvalError, Value

Fn = Callable[[Any, tuple[Any, ...]], Value]
NOT_CONST: Any = object()


@dataclass(frozen=True, slots=True)
class Node:
    fn: Fn
    kind: str | None = None  # the static type, when it is known ("bool", "int", ...)
    const: Any = NOT_CONST  # the value, when it is the same for every event
    # (attribute, value) pairs that must be equal for the node to be true
    facts: tuple[tuple[str, str], ...] = ()


def data(s: Any, _b: tuple[Any, ...]) -> Value:
    return s.data


def not_equal(a: Value, b: Value) -> bool:
    return not rt.equals(a, b)


ORDER: dict[str, tuple[Callable[[Any, Any], bool], Callable[[Value, Value], bool]]] = {
    "relation_lt": (operator.lt, rt.less),
    "relation_le": (operator.le, rt.less_equal),
    "relation_gt": (operator.gt, rt.greater),
    "relation_ge": (operator.ge, rt.greater_equal),
}


def ordering(
    left: Node,
    right: Node,
    fast: Callable[[Any, Any], bool],
    checked: Callable[[Value, Value], bool],
) -> Fn:
    """``left < right`` and the like; a number or string constant on one side is compared
    without the generic type check when the other side has the same type (the common case)."""
    if type(right.const) in (int, float, str):
        return _against_constant(left.fn, right.const, fast, checked, swapped=False)
    if type(left.const) in (int, float, str):
        return _against_constant(right.fn, left.const, fast, checked, swapped=True)
    lf, rf = left.fn, right.fn
    return lambda s, b: checked(lf(s, b), rf(s, b))


def _against_constant(
    other: Fn,
    c: Value,
    fast: Callable[[Any, Any], bool],
    checked: Callable[[Value, Value], bool],
    *,
    swapped: bool,
) -> Fn:
    same = (str,) if type(c) is str else (int, float)
    if swapped:
        return lambda s, b: fast(c, v) if type(v := other(s, b)) in same else checked(c, v)
    return lambda s, b: fast(v, c) if type(v := other(s, b)) in same else checked(v, c)


def equality(left: Node, right: Node, *, negated: bool) -> Fn:
    lf, rf, equals = left.fn, right.fn, rt.equals
    if not negated and type(right.const) is str:
        return _equals_string(lf, right.const)
    if not negated and type(left.const) is str:
        return _equals_string(rf, left.const)
    if negated:
        return lambda s, b: not equals(lf(s, b), rf(s, b))
    return lambda s, b: equals(lf(s, b), rf(s, b))


def _equals_string(other: Fn, c: str) -> Fn:
    equals = rt.equals
    return lambda s, b: v == c if type(v := other(s, b)) is str else equals(v, c)


def contained_in(item: Node, container: Node) -> Fn:
    f, g, contained = item.fn, container.fn, rt.contained
    constant = container.const
    if type(constant) is tuple and all(type(v) is str for v in constant):
        strings = frozenset(constant)

        def in_strings(s: Any, b: tuple[Any, ...]) -> Value:
            v = f(s, b)
            return v in strings if type(v) is str else contained(v, constant)

        return in_strings
    return lambda s, b: contained(f(s, b), g(s, b))


def matches_constant(text: Fn, pattern: Any) -> Fn:
    """``text.matches('constant')``: the pattern compiled once."""
    search, checked = pattern.search, rt.matches

    def matches(s: Any, b: tuple[Any, ...]) -> Value:
        value = text(s, b)
        if type(value) is str:
            return search(value) is not None
        return checked(value, pattern.pattern)

    return matches


def call2(function: Callable[[Value, Value], Value], left: Node, right: Node) -> Fn:
    lf, rf = left.fn, right.fn
    if right.const is not NOT_CONST:
        c = right.const
        return lambda s, b: function(lf(s, b), c)
    return lambda s, b: function(lf(s, b), rf(s, b))


def call_n(function: Callable[..., Value], args: list[Node]) -> Fn:
    fns = [arg.fn for arg in args]
    if len(fns) == 1:
        (only,) = fns
        return lambda s, b: function(only(s, b))
    if len(fns) == 2:
        return call2(function, args[0], args[1])
    return lambda s, b: function(*(f(s, b) for f in fns))


def _quantifier(name: str, decisive: bool) -> Callable[[Fn, Fn], Fn]:
    """``all`` (decided by the first false) and ``exists`` (by the first true): an item that
    decides wins over errors met before it; otherwise the first error, else ``not decisive``."""

    def build(source: Fn, predicate: Fn) -> Fn:
        def quantify(s: Any, b: tuple[Any, ...]) -> Value:
            error: EvalError | None = None
            for item in rt.iterate(source(s, b)):
                try:
                    result = predicate(s, (*b, item))
                except EvalError as exc:
                    error = error or exc
                    continue
                if result is decisive:
                    return decisive
                if result is not (not decisive):
                    error = error or rt.no_overload(name, result)
            if error is not None:
                raise error
            return not decisive

        return quantify

    return build


_macro_all = _quantifier("all", decisive=False)
_macro_exists = _quantifier("exists", decisive=True)


def _macro_exists_one(source: Fn, predicate: Fn) -> Fn:
    def exists_one(s: Any, b: tuple[Any, ...]) -> Value:
        count = 0
        for item in rt.iterate(source(s, b)):
            result = predicate(s, (*b, item))
            if type(result) is not bool:
                raise rt.no_overload("exists_one", result)
            count += result
        return count == 1

    return exists_one


def _macro_filter(source: Fn, predicate: Fn) -> Fn:
    def filter_(s: Any, b: tuple[Any, ...]) -> Value:
        kept = []
        for item in rt.iterate(source(s, b)):
            result = predicate(s, (*b, item))
            if type(result) is not bool:
                raise rt.no_overload("filter", result)
            if result:
                kept.append(item)
        return kept

    return filter_


def _macro_map(source: Fn, first: Fn, second: Fn | None = None) -> Fn:
    def map_(s: Any, b: tuple[Any, ...]) -> Value:
        mapped = []
        for item in rt.iterate(source(s, b)):
            scope = (*b, item)
            if second is None:
                mapped.append(first(s, scope))
                continue
            keep = first(s, scope)
            if type(keep) is not bool:
                raise rt.no_overload("map", keep)
            if keep:
                mapped.append(second(s, scope))
        return mapped

    return map_


MACROS: dict[str, Callable[..., Fn]] = {
    "all": _macro_all,
    "exists": _macro_exists,
    "exists_one": _macro_exists_one,
    "filter": _macro_filter,
    "map": _macro_map,
}


@dataclass(frozen=True, slots=True)
class Function:
    implementation: Callable[..., Value]
    arity: tuple[int, int]  # arguments, the receiver of a method included
    kind: str | None


FUNCTIONS: dict[str, Function] = {
    "size": Function(rt.size, (1, 1), "int"),
    "int": Function(cv.to_int, (1, 1), "int"),
    "uint": Function(cv.to_uint, (1, 1), "int"),
    "double": Function(cv.to_double, (1, 1), "double"),
    "string": Function(cv.to_string, (1, 1), "string"),
    "bool": Function(cv.to_bool, (1, 1), "bool"),
    "bytes": Function(cv.to_bytes, (1, 1), "bytes"),
    "timestamp": Function(cv.to_timestamp, (1, 1), "timestamp"),
    "duration": Function(cv.to_duration, (1, 1), "duration"),
    "dyn": Function(cv.dyn, (1, 1), None),
    "matches": Function(rt.matches, (2, 2), "bool"),
}
METHODS: dict[str, Function] = {
    "size": Function(rt.size, (1, 1), "int"),
    "contains": Function(rt.contains, (2, 2), "bool"),
    "startsWith": Function(rt.starts_with, (2, 2), "bool"),
    "endsWith": Function(rt.ends_with, (2, 2), "bool"),
    "matches": Function(rt.matches, (2, 2), "bool"),
    **{name: Function(part, (1, 2), "int") for name, part in cv.TIMESTAMP_PARTS.items()},
}
