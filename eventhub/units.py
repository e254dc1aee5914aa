"""Parsing of the human units used in settings and resources: durations (``30s``, ``1m30s``,
``250ms``, ``2h``, or a bare number of seconds), rates (``50/s``, ``600/m``, ``1000/h``) and sizes
(``512KiB``, ``1MB``, ``1048576``) and RFC 3339 times."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d*)\s*(ms|s|m|h|d)\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_SIZE_FACTOR = {
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_duration(value: str | float | int) -> float:
    """Seconds in ``value``; raises ValueError with a readable message."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30s' or '5m'")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("a duration must be a finite number")
        if value < 0:
            raise ValueError("a duration must not be negative")
        return float(value)
    if not isinstance(value, str):  # a mapping or a list from YAML/JSON: a caller's mistake
        raise ValueError("expected a duration such as '30s' or '5m'")
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return parse_duration(seconds)
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"'{value}' is not a duration such as '30s', '1m30s' or '250ms'")
    return total


def format_duration(seconds: float) -> str:
    if seconds >= 1 and seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


@dataclass(frozen=True)
class Rate:
    """``count`` events per ``period`` seconds."""

    count: float
    period: float

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __str__(self) -> str:
        return f"{self.count:g}/{format_duration(self.period)}"


def parse_time(value: str) -> datetime:
    """An RFC 3339 time (``Z`` or an offset; a time without one is taken as UTC)."""
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_rate(value: str) -> Rate:
    match = _RATE.match(value)
    if not match:
        raise ValueError(f"'{value}' is not a rate such as '50/s', '600/m' or '10/5s'")
    count = float(match.group(1))
    period = float(match.group(2) or 1) * _UNIT_SECONDS[match.group(3)]
    if count <= 0 or period <= 0:
        raise ValueError(f"'{value}': a rate must be positive")
    return Rate(count=count, period=period)


def parse_size(value: str | int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("a size must not be negative")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"'{value}' is not a size such as '1MiB' or '512KB'")
    return int(match.group(1)) * _SIZE_FACTOR[(match.group(2) or "b").lower()]
