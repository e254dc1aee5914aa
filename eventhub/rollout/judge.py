"""How one step of a canary rollout is judged (pure: no I/O, no clock).

At each step the canary is compared with the stable version over the same window (the step's
time range so far), from the figures every hub process flushed
(:meth:`eventhub.stats.Stats.window`):

- nothing is decided before the canary made ``minCalls`` calls in the window: a step never
  passes on too little evidence, however long it runs;
- from then on, at every look, mid-step included, a threshold may break: the canary's error rate
  above ``maxErrorRate``, or its p95 latency above ``maxLatencyRatio`` times the stable version's;
- the stable p95 is the window's when the stable version made ``minCalls`` calls in it; else
  (at weight 100 it makes none) the stable version's since the rollout began; with fewer calls
  than that there too, latency is not compared, and the verdict says so;
- once the step's interval is over and nothing broke, the step held.

Only the canary's own error rate is judged (an absolute threshold): a stable version that fails
too does not excuse a failing canary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from eventhub.statbuckets import Figures

Outcome = Literal["pending", "held", "broke"]
Baseline = Literal["step", "rollout"]


@dataclass(frozen=True, slots=True)
class Analysis:
    """The thresholds a rollout judges each step by."""

    max_error_rate: float = 0.05
    max_latency_ratio: float = 1.5
    min_calls: int = 20

    def to_json(self) -> dict[str, Any]:
        return {
            "maxErrorRate": self.max_error_rate,
            "maxLatencyRatio": self.max_latency_ratio,
            "minCalls": self.min_calls,
        }


@dataclass(frozen=True, slots=True)
class Sample:
    """One version's calls in a window, reduced to what is judged."""

    calls: int = 0
    errors: int = 0
    p95: float | None = None  # seconds; None without calls

    @classmethod
    def of(cls, figures: Figures | None) -> Sample:
        if figures is None:
            return cls()
        return cls(figures.calls, figures.errors, figures.p95)

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "errors": self.errors,
            "errorRate": round(self.error_rate, 6),
            "p95Ms": None if self.p95 is None else round(self.p95 * 1000, 3),
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    """``pending``: look again later; ``held``: the step passed; ``broke``: roll back now.
    ``baseline`` names the stable figures the latency was compared with (None: not compared),
    ``stable`` is those figures."""

    outcome: Outcome
    reason: str | None = None
    baseline: Baseline | None = None
    stable: Sample | None = None


def judge(
    analysis: Analysis,
    *,
    canary: Sample,
    stable: Sample,
    stable_since_start: Sample | None,
    elapsed: bool,
) -> Verdict:
    """The verdict on a step. ``canary`` and ``stable``: the step's window so far;
    ``stable_since_start``: the stable version since the rollout began (needed only when
    ``stable`` has fewer than ``minCalls`` calls; None: unknown, latency is then not compared);
    ``elapsed``: the step's interval is over."""
    need = analysis.min_calls
    if canary.calls < need:
        return Verdict("pending", f"{canary.calls} of {need} canary calls so far")
    if canary.error_rate > analysis.max_error_rate:
        return Verdict(
            "broke",
            f"canary error rate {_pct(canary.error_rate)} is above"
            f" {_pct(analysis.max_error_rate)} ({canary.errors} of {canary.calls} calls failed)",
        )
    baseline: Baseline | None = None
    compared: Sample | None = None
    if stable.calls >= need:
        baseline, compared = "step", stable
    elif stable_since_start is not None and stable_since_start.calls >= need:
        baseline, compared = "rollout", stable_since_start
    if compared is not None and compared.p95 is not None and canary.p95 is not None:
        limit = analysis.max_latency_ratio * compared.p95
        if canary.p95 > limit:
            return Verdict(
                "broke",
                f"canary p95 {_ms(canary.p95)} is above {analysis.max_latency_ratio:g} x the"
                f" stable version's {_ms(compared.p95)}"
                + (" (since the rollout began)" if baseline == "rollout" else ""),
                baseline,
                compared,
            )
    if not elapsed:
        return Verdict("pending", "the step's interval is not over", baseline, compared)
    reason = None
    if compared is None:
        reason = f"latency not compared: the stable version made fewer than {need} calls"
    return Verdict("held", reason, baseline, compared if compared is not None else stable)


def needs_baseline(analysis: Analysis, stable: Sample) -> bool:
    """Whether the stable version's figures since the rollout began are needed."""
    return stable.calls < analysis.min_calls


def _pct(rate: float) -> str:
    return f"{rate * 100:.1f}%"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms"
