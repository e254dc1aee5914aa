"""Mergeable latency histograms: log-spaced buckets with a bounded relative error.

A latency ``x`` (seconds) is counted in bucket ``i = ceil(log(x) / log(GAMMA))``, which holds
the values in ``(GAMMA**(i-1), GAMMA**i]``. Reporting any value of that bucket as
``2 * GAMMA**i / (GAMMA + 1)`` is off by at most ``RELATIVE_ERROR`` (5 %) of the true value: the
scheme of DDSketch (Masson et al., VLDB 2019). Because buckets are fixed, two histograms merge by
adding their counts bucket by bucket: the counts of every hub process and of every second of a
window sum to the histogram of all their calls, and its percentiles keep the same 5 % bound.

Latencies are clamped to ``[MIN_LATENCY, MAX_LATENCY]`` (1 µs to a day): about 250 buckets
exist, of which a function's calls usually touch a few dozen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

RELATIVE_ERROR = 0.05
GAMMA = (1 + RELATIVE_ERROR) / (1 - RELATIVE_ERROR)
_LOG_GAMMA = math.log(GAMMA)
MIN_LATENCY = 1e-6
MAX_LATENCY = 86400.0


def bucket_of(latency_s: float) -> int:
    """The bucket a latency is counted in (cheap: one log, on the dispatch path)."""
    if not latency_s > MIN_LATENCY:  # NaN, zero, negative: the smallest bucket
        latency_s = MIN_LATENCY
    elif latency_s > MAX_LATENCY:
        latency_s = MAX_LATENCY
    return math.ceil(math.log(latency_s) / _LOG_GAMMA)


def value_of(bucket: int) -> float:
    """The value reported for every latency of ``bucket``: within 5 % of each of them."""
    return 2 * GAMMA**bucket / (GAMMA + 1)


class Histogram:
    """Counts per bucket; merged by :meth:`add`."""

    __slots__ = ("counts",)

    def __init__(self, counts: Mapping[int, int] | None = None) -> None:
        self.counts: dict[int, int] = dict(counts or {})

    def record(self, latency_s: float) -> None:
        bucket = bucket_of(latency_s)
        self.counts[bucket] = self.counts.get(bucket, 0) + 1

    def add(self, other: Histogram | Mapping[int, int]) -> None:
        counts = other.counts if isinstance(other, Histogram) else other
        for bucket, n in counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + n

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def percentile(self, q: float) -> float | None:
        """The latency (seconds) that a share ``q`` of the calls did not exceed, within 5 %:
        the nearest-rank percentile (the ``ceil(q * n)``-th smallest value, so the p99 of a few
        calls is the slowest of them); None when nothing was recorded."""
        return percentiles(self.counts, [q])[0]


def percentiles(counts: Mapping[int, int], qs: Iterable[float]) -> list[float | None]:
    """Several percentiles in one pass over the sorted buckets (``qs`` in any order)."""
    wanted = list(qs)
    total = sum(counts.values())
    if total <= 0:
        return [None] * len(wanted)
    order = sorted(range(len(wanted)), key=lambda k: wanted[k])
    out: list[float | None] = [None] * len(wanted)
    buckets = sorted(b for b, n in counts.items() if n > 0)
    seen, at = 0, 0
    for k in order:
        q = min(max(wanted[k], 0.0), 1.0)
        rank = max(math.ceil(q * total - 1e-9) - 1, 0)  # 0-based; 1e-9: 0.07 * 100 > 7
        while seen + counts[buckets[at]] <= rank:
            seen += counts[buckets[at]]
            at += 1
        out[k] = value_of(buckets[at])
    return out
