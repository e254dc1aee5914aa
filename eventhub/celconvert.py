"""CEL's conversion functions, timestamps and durations, for :mod:`eventhub.celcompile`.

``int()``, ``uint()``, ``double()``, ``string()``, ``bool()``, ``bytes()``, ``timestamp()``,
``duration()``, ``dyn()`` and the timestamp parts (``getHours()`` ...), over the values of
:mod:`eventhub.celruntime`. A timestamp is an aware ``datetime`` (RFC 3339 in, UTC), a duration
a ``timedelta`` within CEL's range (about 10,000 years). A conversion that cannot be made is an
:class:`~eventhub.celruntime.EvalError`.
"""

from __future__ import annotations

import decimal
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from eventhub.celruntime import (
    INT_MIN,
    UINT_MAX,
    EvalError,
    Value,
    as_double,
    checked_duration,
    checked_int,
    no_overload,
    type_name,
)

_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_DOUBLE_TEXT = re.compile(
    r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)", re.I
)
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}  # fmt: skip
_TRUE = frozenset({"1", "t", "true", "TRUE", "True"})
_FALSE = frozenset({"0", "f", "false", "FALSE", "False"})


def to_int(value: Value) -> int:
    kind = type(value)
    if type(value) is int:
        return value
    if kind is float:
        if math.isfinite(value) and INT_MIN <= value < 2.0**63:
            return int(value)
        raise EvalError("double out of int range")
    if kind is str and _INT_TEXT.fullmatch(value):
        return checked_int(int(value))
    if kind is datetime:
        return int(value.timestamp() // 1)
    raise EvalError(f"cannot convert {type_name(value)} {value!r} to int")


def to_uint(value: Value) -> int:
    kind = type(value)
    if kind is float:
        if math.isfinite(value) and 0 <= value < 2.0**64:
            return int(value)
    elif (kind is int or (kind is str and _INT_TEXT.fullmatch(value))) and (
        0 <= int(value) <= UINT_MAX
    ):
        return int(value)
    raise EvalError(f"cannot convert {type_name(value)} {value!r} to uint")


def to_double(value: Value) -> float:
    kind = type(value)
    if type(value) is float:
        return value
    if kind is int:
        return as_double(value)
    if kind is str and _DOUBLE_TEXT.fullmatch(value):
        return float(value)
    raise EvalError(f"cannot convert {type_name(value)} {value!r} to double")


def to_string(value: Value) -> str:
    kind = type(value)
    if isinstance(value, str):
        return value
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is float:
        return format_double(value)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise EvalError("bytes are not UTF-8") from None
    if kind is datetime:
        return format_timestamp(value)
    if kind is timedelta:
        return format_duration(value)
    raise no_overload("string", value)


def format_double(value: float) -> str:
    """As CEL's reference implementation writes a double (Go's ``%g``: the shortest digits,
    an exponent below 1e-4 and from 1e6)."""
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    number = decimal.Decimal(repr(value)).normalize()
    sign, digits, exponent = number.as_tuple()
    places = len(digits) + int(exponent) - 1  # the decimal exponent of the first digit
    if places < -4 or places >= 6:
        mantissa = "".join(map(str, digits))
        body = mantissa[0] + ("." + mantissa[1:] if len(mantissa) > 1 else "")
        return f"{'-' if sign else ''}{body}e{'-' if places < 0 else '+'}{abs(places):02d}"
    return format(number, "f")


def to_bool(value: Value) -> bool:
    if type(value) is bool:
        return value
    if type(value) is str:
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
    raise EvalError(f"cannot convert {type_name(value)} {value!r} to bool")


def to_bytes(value: Value) -> bytes:
    if type(value) is bytes:
        return value
    if type(value) is str:
        return value.encode("utf-8")
    raise no_overload("bytes", value)


def to_timestamp(value: Value) -> datetime:
    kind = type(value)
    if isinstance(value, datetime):
        return value
    if kind is str and _RFC3339.fullmatch(value):
        try:
            return datetime.fromisoformat(value.upper()).astimezone(UTC)
        except ValueError as exc:
            raise EvalError(f"invalid timestamp {value!r}: {exc}") from None
    if kind is int:
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            raise EvalError("timestamp out of range") from None
    raise EvalError(f"cannot convert {type_name(value)} {value!r} to timestamp")


def to_duration(value: Value) -> timedelta:
    kind = type(value)
    if isinstance(value, timedelta):
        return value
    if kind is str:
        return checked_duration(parse_duration(value))
    raise EvalError(f"cannot convert {type_name(value)} {value!r} to duration")


def parse_duration(text: str) -> timedelta:
    """A duration as CEL (and Go) write it: ``1h30m``, ``1.5s``, ``-250ms``."""
    body = text[1:] if text[:1] in "+-" else text
    seconds, position = 0.0, 0
    for part in _DURATION_PART.finditer(body):
        if part.start() != position or part.group(1) in ("", "."):
            break
        seconds += float(part.group(1)) * _DURATION_UNITS[part.group(2)]
        position = part.end()
    if (not body or position != len(body)) and body != "0":
        raise EvalError(f"invalid duration {text!r}")
    try:
        return timedelta(seconds=-seconds if text.startswith("-") else seconds)
    except OverflowError:
        raise EvalError("duration out of range") from None


def format_timestamp(value: datetime) -> str:
    text = value.astimezone(UTC).isoformat()
    return text.replace("+00:00", "Z")


def format_duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def dyn(value: Value) -> Value:
    return value


# --------------------------------------------------------------------------- timestamp parts


def _local(at: Value, zone: Value, name: str) -> datetime:
    if type(at) is not datetime:
        raise no_overload(name, at)
    if zone is None:
        return at.astimezone(UTC)
    if type(zone) is not str:
        raise no_overload(name, at, zone)
    return at.astimezone(_zone(zone))


@lru_cache(maxsize=64)
def _zone(name: str) -> Any:
    offset = re.fullmatch(r"([+-])([0-9]{2}):([0-9]{2})", name)
    if offset:
        sign = -1 if offset.group(1) == "-" else 1
        delta = timedelta(hours=int(offset.group(2)), minutes=int(offset.group(3)))
        return timezone(sign * delta)
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise EvalError(f"unknown time zone {name!r}") from None


def _part(name: str, read: Callable[[datetime], int]) -> Callable[..., int]:
    def part(at: Value, zone: Value = None) -> int:
        if type(at) is timedelta and zone is None and name in _DURATION_PARTS:
            return _DURATION_PARTS[name](at)
        return read(_local(at, zone, name))

    part.__name__ = name
    return part


_DURATION_PARTS: dict[str, Callable[[timedelta], int]] = {
    "getHours": lambda d: int(d.total_seconds() // 3600),
    "getMinutes": lambda d: int(d.total_seconds() // 60),
    "getSeconds": lambda d: int(d.total_seconds()),
    "getMilliseconds": lambda d: int(d.total_seconds() * 1000) % 1000,
}

TIMESTAMP_PARTS: dict[str, Callable[..., int]] = {
    name: _part(name, read)
    for name, read in {
        "getFullYear": lambda t: t.year,
        "getMonth": lambda t: t.month - 1,
        "getDate": lambda t: t.day,
        "getDayOfMonth": lambda t: t.day - 1,
        "getDayOfWeek": lambda t: (t.weekday() + 1) % 7,
        "getDayOfYear": lambda t: t.timetuple().tm_yday - 1,
        "getHours": lambda t: t.hour,
        "getMinutes": lambda t: t.minute,
        "getSeconds": lambda t: t.second,
        "getMilliseconds": lambda t: t.microsecond // 1000,
    }.items()
}
