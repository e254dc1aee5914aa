"""CEL values and operators over plain JSON values, for :mod:`eventhub.celcompile`
(conversions, timestamps and durations: :mod:`eventhub.celconvert`).

A value is what ``orjson.loads`` gives (``None``, ``bool``, ``int``, ``float``, ``str``,
``list``, ``dict``), so an event's payload is evaluated as parsed, never converted; literals add
``bytes``, ``tuple`` (a list), ``datetime`` (a CEL timestamp, always aware) and ``timedelta``
(a duration). Types are told apart by exact type: ``bool`` is not a number in CEL.

What CEL leaves open, or where JSON makes the standard awkward, decided here:
- Equality across types is ``false``, never an error; numbers compare by value across int,
  uint and double (``1 == 1.0``), as the current CEL specification says.
- Ordering (``<`` ...) and arithmetic across int and double are allowed, the result of mixed
  arithmetic a double: JSON has one number type, and ``data.price * 2`` should not depend on
  whether the producer wrote ``10`` or ``10.0``. Standard CEL refuses mixed arithmetic, so an
  expression valid there means the same here.
- uint values are ints here (JSON has no unsigned type); ``uint()`` and ``1u`` check the range.
- Integer overflow beyond 64 bits, division or modulo by zero, a missing map key, an operator
  on the wrong types: an :class:`EvalError`, which the compiled ``&&``, ``||`` and macros absorb
  as CEL says, and which makes a filter not match.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import re2

Value = Any  # a JSON value, bytes, tuple, datetime or timedelta
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
UINT_MAX = 2**64 - 1
MAX_DURATION = timedelta(seconds=315_576_000_000)  # about 10,000 years, as CEL says
_NUMBERS = (int, float)
_SEQUENCES = (list, tuple)
_ORDERED = frozenset({int, float, str, bytes, bool, datetime, timedelta})


class EvalError(Exception):
    """A CEL runtime error: the expression has no value for this event."""


_TYPE_NAMES: dict[type, str] = {
    type(None): "null",
    bool: "bool",
    int: "int",
    float: "double",
    str: "string",
    bytes: "bytes",
    list: "list",
    tuple: "list",
    dict: "map",
    datetime: "timestamp",
    timedelta: "duration",
}


def type_name(value: Value) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def no_overload(operator: str, *operands: Value) -> EvalError:
    return EvalError(f"no such overload: {operator}({', '.join(map(type_name, operands))})")


def is_number(value: Value) -> bool:
    kind = type(value)
    return kind is int or kind is float


# --------------------------------------------------------------------------- equality, order


def equals(a: Value, b: Value) -> bool:
    """CEL ``==``: heterogeneous, never an error; numbers by value, lists and maps deeply."""
    kind_a, kind_b = type(a), type(b)
    if kind_a is kind_b:
        if kind_a is dict:
            return _maps_equal(a, b)
        if kind_a is list or kind_a is tuple:
            return _lists_equal(a, b)
        return bool(a == b)
    if kind_a in _NUMBERS and kind_b in _NUMBERS:
        return bool(a == b)
    if kind_a in _SEQUENCES and kind_b in _SEQUENCES:
        return _lists_equal(a, b)
    return False


def _lists_equal(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(equals(x, y) for x, y in zip(a, b, strict=True))


def _maps_equal(a: dict[Any, Any], b: dict[Any, Any]) -> bool:
    # Python's own key lookup matches 1 with 1.0, as CEL's key equality does.
    return len(a) == len(b) and all(key in b and equals(a[key], b[key]) for key in a)


def ordered(operator: str, a: Value, b: Value) -> None:
    """Raise unless ``a`` and ``b`` can be ordered (same type, or two numbers)."""
    kind_a, kind_b = type(a), type(b)
    if kind_a is kind_b and kind_a in _ORDERED:
        return
    if kind_a in _NUMBERS and kind_b in _NUMBERS:
        return
    raise no_overload(operator, a, b)


def less(a: Value, b: Value) -> bool:
    ordered("_<_", a, b)
    return bool(a < b)


def less_equal(a: Value, b: Value) -> bool:
    ordered("_<=_", a, b)
    return bool(a <= b)


def greater(a: Value, b: Value) -> bool:
    ordered("_>_", a, b)
    return bool(a > b)


def greater_equal(a: Value, b: Value) -> bool:
    ordered("_>=_", a, b)
    return bool(a >= b)


def contained(item: Value, container: Value) -> bool:
    """CEL ``in``: an element of a list, or a key of a map."""
    kind = type(container)
    if kind is list or kind is tuple:
        return any(equals(item, element) for element in container)
    if kind is dict:
        return map_get(container, item, missing=_MISSING) is not _MISSING
    raise no_overload("@in", item, container)


# --------------------------------------------------------------------------- arithmetic


def checked_int(value: int) -> int:
    if INT_MIN <= value <= INT_MAX:
        return value
    raise EvalError("integer overflow")


def as_double(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:
        raise EvalError("double overflow") from None


def add(a: Value, b: Value) -> Value:
    kind_a, kind_b = type(a), type(b)
    if kind_a is int and kind_b is int:
        return checked_int(a + b)
    if kind_a in _NUMBERS and kind_b in _NUMBERS:
        return as_double(a) + as_double(b)
    if kind_a is kind_b and (kind_a is str or kind_a is bytes):
        return a + b
    if kind_a in _SEQUENCES and kind_b in _SEQUENCES:
        return [*a, *b]
    if kind_a is timedelta and kind_b is timedelta:
        return checked_duration(a + b)
    if kind_a is datetime and kind_b is timedelta:
        return _shifted(a, b)
    if kind_a is timedelta and kind_b is datetime:
        return _shifted(b, a)
    raise no_overload("_+_", a, b)


def subtract(a: Value, b: Value) -> Value:
    kind_a, kind_b = type(a), type(b)
    if kind_a is int and kind_b is int:
        return checked_int(a - b)
    if kind_a in _NUMBERS and kind_b in _NUMBERS:
        return as_double(a) - as_double(b)
    if kind_a is timedelta and kind_b is timedelta:
        return checked_duration(a - b)
    if kind_a is datetime and kind_b is timedelta:
        return _shifted(a, -b)
    if kind_a is datetime and kind_b is datetime:
        return checked_duration(a - b)
    raise no_overload("_-_", a, b)


def multiply(a: Value, b: Value) -> Value:
    kind_a, kind_b = type(a), type(b)
    if kind_a is int and kind_b is int:
        return checked_int(a * b)
    if kind_a in _NUMBERS and kind_b in _NUMBERS:
        return as_double(a) * as_double(b)
    raise no_overload("_*_", a, b)


def divide(a: Value, b: Value) -> Value:
    kind_a, kind_b = type(a), type(b)
    if kind_a is int and kind_b is int:
        if b == 0:
            raise EvalError("division by zero")
        quotient = abs(a) // abs(b)  # CEL truncates toward zero
        return checked_int(quotient if (a < 0) == (b < 0) else -quotient)
    if kind_a in _NUMBERS and kind_b in _NUMBERS:
        x, y = as_double(a), as_double(b)
        if y == 0.0:  # IEEE 754, as CEL: a double divided by zero is infinite (or NaN)
            return (
                math.nan
                if x == 0.0 or math.isnan(x)
                else math.copysign(math.inf, x) * (math.copysign(1.0, y))
            )
        return x / y
    raise no_overload("_/_", a, b)


def modulo(a: Value, b: Value) -> Value:
    if type(a) is int and type(b) is int:
        if b == 0:
            raise EvalError("modulus by zero")
        remainder = abs(a) % abs(b)  # the sign of the dividend, as CEL
        return remainder if a >= 0 else -remainder
    raise no_overload("_%_", a, b)


def negate(a: Value) -> Value:
    kind = type(a)
    if kind is int:
        return checked_int(-a)
    if kind is float:
        return -a
    if kind is timedelta:
        return checked_duration(-a)
    raise no_overload("-_", a)


def logical_not(a: Value) -> bool:
    if type(a) is bool:
        return not a
    raise no_overload("!_", a)


def checked_duration(value: timedelta) -> timedelta:
    if -MAX_DURATION <= value <= MAX_DURATION:
        return value
    raise EvalError("duration out of range")


def _shifted(at: datetime, by: timedelta) -> datetime:
    try:
        return at + by
    except OverflowError:
        raise EvalError("timestamp out of range") from None


# --------------------------------------------------------------------------- maps and lists


_MISSING = object()


def map_get(mapping: dict[Any, Any], key: Value, missing: Any = None) -> Value:
    """``mapping[key]``, an integral double finding an int key; ``missing`` if absent
    (None: raise)."""
    kind = type(key)
    if kind is float and key.is_integer():
        key, kind = int(key), int
    if kind is not str and kind is not int and kind is not bool:
        raise EvalError(f"unsupported map key type: {type_name(key)}")
    found = mapping.get(key, _MISSING)
    if found is not _MISSING:
        return found
    if missing is not None:
        return missing
    raise EvalError(f"no such key: {key!r}")


def index(container: Value, key: Value) -> Value:
    """CEL ``container[key]``."""
    kind = type(container)
    if kind is dict:
        return map_get(container, key)
    if kind is list or kind is tuple:
        if type(key) is float and key.is_integer():
            key = int(key)
        if type(key) is not int:
            raise no_overload("_[_]", container, key)
        if 0 <= key < len(container):
            return container[key]
        raise EvalError(f"index out of range: {key}")
    raise no_overload("_[_]", container, key)


def select(operand: Value, field: str) -> Value:
    """CEL ``operand.field``: a map's key."""
    if type(operand) is dict:
        try:
            return operand[field]
        except KeyError:
            raise EvalError(f"no such key: {field!r}") from None
    raise EvalError(f"no such field {field!r} on {type_name(operand)}")


def has_field(operand: Value, field: str) -> bool:
    """CEL ``has(operand.field)``."""
    if type(operand) is dict:
        return field in operand
    raise EvalError(f"has() needs a map, got {type_name(operand)}")


def iterate(container: Value) -> Any:
    """What a macro ranges over: a list's elements, a map's keys."""
    kind = type(container)
    if kind is list or kind is tuple or kind is dict:
        return container
    raise EvalError(f"a macro ranges over a list or a map, got {type_name(container)}")


def new_map(pairs: list[tuple[Value, Value]]) -> dict[Any, Any]:
    result: dict[Any, Any] = {}
    for key, value in pairs:
        if type(key) not in (str, int, bool):
            raise EvalError(f"unsupported map key type: {type_name(key)}")
        if map_get(result, key, missing=_MISSING) is not _MISSING:
            raise EvalError(f"duplicate map key: {key!r}")
        result[key] = value
    return result


# --------------------------------------------------------------------------- functions


def size(value: Value) -> int:
    kind = type(value)
    if kind in (str, bytes, list, tuple, dict):
        return len(value)
    raise no_overload("size", value)


def _strings(name: str, a: Value, b: Value) -> None:
    if type(a) is not str or type(b) is not str:
        raise no_overload(name, a, b)


def contains(text: Value, part: Value) -> bool:
    _strings("contains", text, part)
    return bool(part in text)


def starts_with(text: Value, part: Value) -> bool:
    _strings("startsWith", text, part)
    return bool(text.startswith(part))


def ends_with(text: Value, part: Value) -> bool:
    _strings("endsWith", text, part)
    return bool(text.endswith(part))


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a bad pattern is reported as an EvalError, not on stderr


@lru_cache(maxsize=256)
def regex(pattern: str) -> Any:
    """RE2, as CEL specifies: linear time in the text, whatever the pattern."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise EvalError(f"invalid regular expression: {detail}") from None


def matches(text: Value, pattern: Value) -> bool:
    _strings("matches", text, pattern)
    return regex(pattern).search(text) is not None
