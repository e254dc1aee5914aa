"""CloudEvents Subscriptions API filter dialects for event bindings.

A binding's ``filter`` is a list of *filter expressions*, combined with AND
(the same model as Knative Eventing ``Trigger.spec.filters``).  An empty
list, or no filter at all, matches every event.  Each expression is a mapping
with exactly one dialect key:

``exact: {attr: value, ...}``
    Every listed attribute is present on the event and its canonical string
    form equals ``value``.
``prefix: {attr: value, ...}``
    Every listed attribute is present and starts with ``value``.
``suffix: {attr: value, ...}``
    Every listed attribute is present and ends with ``value``.
``all: [expr, ...]``
    Every nested expression matches (an empty list matches).
``any: [expr, ...]``
    At least one nested expression matches (an empty list never matches).
``not: expr``
    The nested expression does not match.
``cel: "expression"``
    The CEL expression is true for the event; it reads the context attributes by name and the
    payload as ``data`` (see :mod:`eventhub.expressions`, which also says why CEL and not
    CESQL). A runtime error (a missing field, a payload that is not JSON, a type mismatch) is
    "no match" (so ``not: {cel: ...}`` matches it: negate inside the expression instead).
    Compiled when the filter is; a filter with one is evaluated against a
    :class:`~eventhub.expressions.Scope`, which parses the payload once per event, on first use.

Attribute names are CloudEvents context attributes (``id``, ``source``,
``type``, ``subject``, ``specversion``, ``datacontenttype``, ``dataschema``,
``time``) or extension names: non-empty, lowercase ``a-z0-9``.  An attribute
absent from the event (or ``None``) never matches ``exact``/``prefix``/
``suffix``, so ``not: {exact: {...}}`` matches events lacking the attribute.
Filter values must be strings; an empty ``prefix``/``suffix`` value matches any
present attribute.  Event attribute values are compared through their
canonical CloudEvents string form: ``bool`` -> ``"true"``/``"false"``,
``int`` -> decimal, ``datetime`` -> RFC 3339 (``Z`` for UTC; naive values are
taken as UTC), ``bytes`` -> base64; anything else via ``str()``.

Example, as written in a binding resource::

    filter:
      - exact: {type: com.example.order.created}
      - any:
          - prefix: {subject: "orders/eu/"}
          - not: {suffix: {subject: ".tmp"}}
      - cel: "data.amount > 100 && data.currency == 'EUR'"

:func:`compile_filters` validates a specification once and returns a plain
predicate; evaluating it performs no parsing or validation.  Invalid
specifications raise :class:`FilterError` carrying the path of the first
problem, e.g. ``filter[0].all[1].exact.type``, and for ``cel`` the position in the text:
``filter[1].cel: syntax error at column 14: unexpected '>'``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeAlias

from eventhub.expressions import ExpressionError, Scope, compile_expression

__all__ = [
    "DIALECTS",
    "Attributes",
    "CompiledFilter",
    "FilterError",
    "Predicate",
    "canonical_string",
    "compile_filter",
    "compile_filters",
    "required_value",
]

Attributes: TypeAlias = Mapping[str, object]
Predicate: TypeAlias = Callable[[Attributes], bool]

DIALECTS: tuple[str, ...] = ("all", "any", "cel", "exact", "not", "prefix", "suffix")
_DIALECT_LIST = ", ".join(DIALECTS)
_ATTRIBUTE_NAME = re.compile(r"[a-z0-9]+")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_]+")
_STRINGLIKE = (str, bytes, bytearray, memoryview)
_ZERO = timedelta(0)


class FilterError(ValueError):
    """An invalid filter specification; ``path`` locates the problem."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def canonical_string(value: object) -> str | None:
    """Return the CloudEvents canonical string form of an attribute value.

    ``None`` (an absent attribute) yields ``None``.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, datetime):
        offset = value.utcoffset()
        if offset is None:
            return value.isoformat() + "Z"
        if offset == _ZERO:
            return value.replace(tzinfo=None).isoformat() + "Z"
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(value).decode("ascii")
    return str(value)


# --------------------------------------------------------------------------
# Predicates.  Closures are built once; the hot path avoids generic helpers
# for the common case of a plain ``str`` attribute value.


def _match_all(_attrs: Attributes) -> bool:
    return True


def _match_none(_attrs: Attributes) -> bool:
    return False


def _make_exact(pairs: tuple[tuple[str, str], ...]) -> Predicate:
    if len(pairs) == 1:
        ((name, expected),) = pairs

        def exact_one(attrs: Attributes) -> bool:
            value = attrs.get(name)
            if type(value) is not str:
                value = canonical_string(value)
            return value == expected

        return exact_one

    def exact_many(attrs: Attributes) -> bool:
        get = attrs.get
        for name, expected in pairs:
            value = get(name)
            if type(value) is not str:
                value = canonical_string(value)
            if value != expected:
                return False
        return True

    return exact_many


def _make_prefix(pairs: tuple[tuple[str, str], ...]) -> Predicate:
    if len(pairs) == 1:
        ((name, expected),) = pairs

        def prefix_one(attrs: Attributes) -> bool:
            value = attrs.get(name)
            text = value if type(value) is str else canonical_string(value)
            return text is not None and text.startswith(expected)

        return prefix_one

    def prefix_many(attrs: Attributes) -> bool:
        get = attrs.get
        for name, expected in pairs:
            value = get(name)
            text = value if type(value) is str else canonical_string(value)
            if text is None or not text.startswith(expected):
                return False
        return True

    return prefix_many


def _make_suffix(pairs: tuple[tuple[str, str], ...]) -> Predicate:
    if len(pairs) == 1:
        ((name, expected),) = pairs

        def suffix_one(attrs: Attributes) -> bool:
            value = attrs.get(name)
            text = value if type(value) is str else canonical_string(value)
            return text is not None and text.endswith(expected)

        return suffix_one

    def suffix_many(attrs: Attributes) -> bool:
        get = attrs.get
        for name, expected in pairs:
            value = get(name)
            text = value if type(value) is str else canonical_string(value)
            if text is None or not text.endswith(expected):
                return False
        return True

    return suffix_many


def _make_and(preds: tuple[Predicate, ...]) -> Predicate:
    if not preds:
        return _match_all
    if len(preds) == 1:
        return preds[0]

    def all_of(attrs: Attributes) -> bool:
        # An explicit loop: cheaper than all() over a generator on the routing hot path.
        for pred in preds:  # noqa: SIM110
            if not pred(attrs):
                return False
        return True

    return all_of


def _make_or(preds: tuple[Predicate, ...]) -> Predicate:
    if not preds:
        return _match_none
    if len(preds) == 1:
        return preds[0]

    def any_of(attrs: Attributes) -> bool:
        for pred in preds:  # noqa: SIM110
            if pred(attrs):
                return True
        return False

    return any_of


def _make_not(pred: Predicate) -> Predicate:
    if pred is _match_all:
        return _match_none
    if pred is _match_none:
        return _match_all

    def negate(attrs: Attributes) -> bool:
        return not pred(attrs)

    return negate


def _make_cel(value: object, path: str) -> Predicate:
    try:
        expression = compile_expression(value, path)  # type: ignore[arg-type]  # it checks
    except ExpressionError as exc:
        raise FilterError(exc.path, exc.message) from None
    matches = expression.matches

    def cel(attrs: Attributes) -> bool:
        if type(attrs) is Scope:
            return matches(attrs)
        # Not from the router: attributes as given (tests, tools), in their canonical form.
        strings = {k: text for k, v in attrs.items() if (text := canonical_string(v)) is not None}
        return matches(Scope(strings))

    return cel


_ATTRIBUTE_DIALECTS: dict[str, Callable[[tuple[tuple[str, str], ...]], Predicate]] = {
    "exact": _make_exact,
    "prefix": _make_prefix,
    "suffix": _make_suffix,
}


# --------------------------------------------------------------------------
# Compilation / validation.


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _key_path(base: str, key: object) -> str:
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key) is not None:
        return f"{base}.{key}"
    return f"{base}[{key!r}]"


def _compile_attributes(value: object, path: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        raise FilterError(
            path,
            f"must be a mapping of attribute name to string value, got {_type_name(value)}",
        )
    if not value:
        raise FilterError(path, "must name at least one attribute")
    pairs: list[tuple[str, str]] = []
    for name, expected in value.items():
        attr_path = _key_path(path, name)
        if not isinstance(name, str):
            raise FilterError(attr_path, f"attribute name must be a string, got {_type_name(name)}")
        if not name:
            raise FilterError(attr_path, "attribute name must not be empty")
        if _ATTRIBUTE_NAME.fullmatch(name) is None:
            raise FilterError(
                attr_path,
                f"invalid attribute name {name!r}: "
                "CloudEvents attribute names use only lowercase a-z and 0-9",
            )
        if not isinstance(expected, str):
            raise FilterError(
                attr_path,
                f"value must be a string, got {_type_name(expected)} (quote it in YAML)",
            )
        pairs.append((name, str.__str__(expected)))
    return tuple(pairs)


class _Found:
    """What compiling a filter found out about it besides its predicate."""

    def __init__(self) -> None:
        self.cel = False


def _compile_list(value: object, path: str, found: _Found) -> tuple[Predicate, ...]:
    if not isinstance(value, Sequence) or isinstance(value, _STRINGLIKE):
        raise FilterError(path, f"must be a list of filter expressions, got {_type_name(value)}")
    return tuple(
        _compile_expression(item, f"{path}[{index}]", found) for index, item in enumerate(value)
    )


def _compile_expression(expr: object, path: str, found: _Found) -> Predicate:
    if not isinstance(expr, Mapping):
        raise FilterError(
            path,
            "must be a filter expression mapping with exactly one dialect key, "
            f"got {_type_name(expr)}",
        )
    if len(expr) != 1:
        if not expr:
            raise FilterError(path, f"empty filter expression; expected one of: {_DIALECT_LIST}")
        keys = ", ".join(sorted(str(key) for key in expr))
        raise FilterError(
            path,
            f"filter expression must have exactly one dialect key, got {len(expr)}: {keys}",
        )
    ((dialect, value),) = expr.items()
    dialect_path = _key_path(path, dialect)
    if dialect in _ATTRIBUTE_DIALECTS:
        maker = _ATTRIBUTE_DIALECTS[dialect]
        return maker(_compile_attributes(value, dialect_path))
    if dialect == "all":
        return _make_and(_compile_list(value, dialect_path, found))
    if dialect == "any":
        return _make_or(_compile_list(value, dialect_path, found))
    if dialect == "not":
        return _make_not(_compile_expression(value, dialect_path, found))
    if dialect == "cel":
        found.cel = True
        return _make_cel(value, dialect_path)
    if dialect == "cesql":
        raise FilterError(
            dialect_path, "the CESQL dialect is not supported: write the condition in cel"
        )
    raise FilterError(
        dialect_path,
        f"unknown filter dialect {dialect!r}; expected one of: {_DIALECT_LIST}",
    )


@dataclass(frozen=True, slots=True)
class CompiledFilter:
    matches: Predicate
    # The filter has a ``cel`` expression: give ``matches`` a Scope (the payload parsed on
    # first use), not the bare attributes, in which ``data`` is null.
    scoped: bool = False


def compile_filter(
    spec: Sequence[Mapping[str, Any]] | None, path: str = "filter"
) -> CompiledFilter:
    """Validate and compile a binding filter into a predicate over attributes (or a Scope).

    ``spec`` is a list of filter expressions combined with AND; ``None`` or an
    empty list yields a predicate matching every event.  Raises
    :class:`FilterError` naming the path of the first problem (unknown
    dialect, several dialect keys, wrong value type, empty attribute map,
    invalid attribute name, a CEL expression that does not compile, ...).
    """
    if spec is None:
        return CompiledFilter(_match_all)
    found = _Found()
    return CompiledFilter(_make_and(_compile_list(spec, path, found)), found.cel)


def compile_filters(spec: Sequence[Mapping[str, Any]] | None, path: str = "filter") -> Predicate:
    """:func:`compile_filter`'s predicate alone."""
    return compile_filter(spec, path).matches


def required_value(spec: Sequence[Mapping[str, Any]] | None, attribute: str) -> str | None:
    """The value ``attribute`` must have for the filter to match, when an ``exact`` expression
    at the filter's top level (or inside a top-level ``all``) names it, or a top-level ``cel``
    expression requires it (``type == 'x' && ...``); ``None`` when events with other values of
    it may match. ``spec`` must be valid: compile it first.

    A router can then look a binding up by, say, the event's type, and try only the bindings
    that can match instead of every binding's predicate."""
    for expression in spec or ():
        ((dialect, value),) = expression.items()
        if dialect == "exact" and attribute in value:
            return str.__str__(value[attribute])
        if dialect == "all":
            found = required_value(value, attribute)
            if found is not None:
                return found
        if dialect == "cel":
            found = compile_expression(value).required(attribute)  # cached: not compiled again
            if found is not None:
                return found
    return None
