"""What a rollout request says, checked field by field (pure: the API and the CLI share it).

A request names the alias, the canary version (``to``), the canary's weights step by step, how
long each step lasts at least, the thresholds, and what becomes of invocations still queued for
the canary if it is rolled back. The alias must point at exactly one version (the stable one)
and ``to`` must be another version of the same function. Every problem names its field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from eventhub.errors import FieldProblem, InvalidInput
from eventhub.resources import FunctionSpec
from eventhub.rollout.judge import Analysis
from eventhub.units import parse_duration
from eventhub.versions import LATEST

OnRollback = Literal["stable", "dead-letter"]
DEFAULT_STEPS = (10, 25, 50, 100)
DEFAULT_INTERVAL = 60.0
MIN_INTERVAL = 1.0  # statistics have one-second resolution
MAX_INTERVAL = 86400.0  # ... and are kept for a day
MAX_STEPS = 20
MAX_MIN_CALLS = 1_000_000
_FIELDS = ("alias", "to", "steps", "interval", "analysis", "onRollback")
_ANALYSIS = ("maxErrorRate", "maxLatencyRatio", "minCalls")


@dataclass(frozen=True)
class Request:
    """A rollout request, each field checked on its own (not yet against the function)."""

    alias: str
    to: str
    steps: tuple[int, ...] = DEFAULT_STEPS
    interval: float = DEFAULT_INTERVAL
    analysis: Analysis = field(default_factory=Analysis)
    on_rollback: OnRollback = "stable"


@dataclass(frozen=True)
class Plan:
    """A request checked against the function: the stable version is what the alias names."""

    function: str
    request: Request
    stable: str


def _bad(path: str, message: str) -> InvalidInput:
    return InvalidInput(f"{path}: {message}", problems=(FieldProblem(path, message),))


def parse_request(body: object) -> Request:
    """A request from a JSON body; InvalidInput naming the first field at fault."""
    if not isinstance(body, Mapping):
        raise InvalidInput("the body must be a JSON object with alias and to")
    for name in body:
        if name not in _FIELDS:
            raise _bad(str(name), f"is not a rollout field ({', '.join(_FIELDS)})")
    alias = _name(body.get("alias"), "alias")
    to = _name(body.get("to"), "to")
    steps = _steps(body.get("steps", list(DEFAULT_STEPS)))
    interval = _interval(body.get("interval", DEFAULT_INTERVAL))
    analysis = _analysis(body.get("analysis", {}))
    on_rollback = body.get("onRollback", "stable")
    if on_rollback not in ("stable", "dead-letter"):
        raise _bad("onRollback", "must be 'stable' or 'dead-letter'")
    return Request(alias, to, steps, interval, analysis, cast(OnRollback, on_rollback))


def plan(function: str, spec: FunctionSpec, request: Request) -> Plan:
    """``request`` against the function as stored now."""
    value = spec.aliases.get(request.alias)
    if value is None:
        raise _bad("alias", f"Function '{function}' has no alias '{request.alias}'")
    if isinstance(value, str):
        stable = value
    else:
        weighted = [v for v, w in value.items() if w > 0]
        if len(weighted) != 1:
            raise _bad(
                "alias",
                f"alias '{request.alias}' must point at exactly one version (it splits"
                f" {', '.join(f'{v}: {w}' for v, w in value.items())})",
            )
        stable = weighted[0]
    versions = set(spec.versions) | ({LATEST} if spec.url is not None else set())
    if request.to not in versions:
        raise _bad("to", f"Function '{function}' has no version '{request.to}'")
    if request.to == stable:
        raise _bad("to", f"alias '{request.alias}' already points at '{stable}'")
    return Plan(function, request, stable)


def _name(value: object, path: str) -> str:
    if value is None:
        raise _bad(path, "is required")
    if not isinstance(value, str) or not value or len(value) > 63:
        raise _bad(path, "must be a version or alias name")
    return value


def _steps(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise _bad("steps", "must be a list of canary weights such as [10, 25, 50, 100]")
    if len(value) > MAX_STEPS:
        raise _bad("steps", f"must have at most {MAX_STEPS} steps")
    previous = 0
    for i, weight in enumerate(value):
        if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= 100:
            raise _bad(f"steps[{i}]", "must be a whole percentage from 1 to 100")
        if weight <= previous:
            raise _bad(f"steps[{i}]", "each step must weigh more than the one before")
        previous = weight
    if previous != 100:
        # The last step is the one judged at full weight before the alias moves.
        raise _bad(f"steps[{len(value) - 1}]", "the last step must be 100")
    return tuple(value)


def _interval(value: object) -> float:
    try:
        seconds = parse_duration(cast(Any, value))
    except ValueError as exc:
        raise _bad("interval", str(exc)) from None
    if not MIN_INTERVAL <= seconds <= MAX_INTERVAL:
        raise _bad("interval", "must be from 1s to 24h")
    return seconds


def _analysis(value: object) -> Analysis:
    if not isinstance(value, Mapping):
        raise _bad("analysis", "must be an object with maxErrorRate, maxLatencyRatio, minCalls")
    for name in value:
        if name not in _ANALYSIS:
            raise _bad(f"analysis.{name}", f"is not a threshold ({', '.join(_ANALYSIS)})")
    default = Analysis()
    error_rate = _number(value.get("maxErrorRate", default.max_error_rate), "maxErrorRate")
    if not 0 <= error_rate <= 1:
        raise _bad("analysis.maxErrorRate", "must be a fraction from 0 to 1")
    ratio = _number(value.get("maxLatencyRatio", default.max_latency_ratio), "maxLatencyRatio")
    if not 1 <= ratio <= 1000:
        raise _bad("analysis.maxLatencyRatio", "must be a number from 1 to 1000")
    min_calls = value.get("minCalls", default.min_calls)
    if (
        not isinstance(min_calls, int)
        or isinstance(min_calls, bool)
        or not 1 <= min_calls <= MAX_MIN_CALLS
    ):
        raise _bad("analysis.minCalls", f"must be a whole number from 1 to {MAX_MIN_CALLS}")
    return Analysis(error_rate, ratio, min_calls)


def _number(value: object, name: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise _bad(f"analysis.{name}", "must be a number")
    return float(value)
