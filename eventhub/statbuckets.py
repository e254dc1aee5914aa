"""The buckets invocation statistics are kept in, and how a window is read from them (pure: no
I/O; :mod:`eventhub.stats` does the reading and writing).

Three tiers of buckets, one Redis hash per function and bucket::

    tier  bucket     kept          key
    s     1 second   1 hour 2 min  <ns>:stats:<function>:s:<unix second>
    m     1 minute   24 hours      <ns>:stats:<function>:m:<unix minute>
    h     1 hour     24 hours      <ns>:stats:<function>:h:<unix hour>

Every count is written to the three buckets its second falls in, in the same script call, so a
minute bucket always holds exactly the sum of its seconds, and an hour bucket of its minutes.

A window is read with the coarsest buckets that lie wholly inside it: seconds at its edges,
minutes between, hours in the middle (at most about 60 + 59 + 23 + 59 + 60 hashes for 24
hours). Its edges are exact to the second within the last hour; before that, one-second
buckets are gone, and a minute cut by an edge counts whole.

Fields of a hash: ``c:<version>`` calls, ``e:<version>`` failed calls, ``r:<version>`` retries,
``d:<version>`` dead letters, ``h:<bucket>:<version>`` calls per latency bucket of
:mod:`eventhub.histogram`; all of them add up across processes and buckets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from eventhub.histogram import Histogram, percentiles

# Seconds during which one-second buckets are kept: a little over an hour, so that a window of
# the last hour is exact to the second at both ends.
FINE_KEEP = 3720
COARSE_KEEP = 86400  # ... minute and hour buckets
MARGIN = 300  # a bucket outlives its use by this much (late writes, clock skew)
SPAN = {"s": 1, "m": 60, "h": 3600}  # seconds per bucket of each tier
Bucket = tuple[str, int]  # (tier, unix time // SPAN[tier])


def expires_at(tier: str, index: int) -> int:
    """When a bucket's hash expires (unix time): its end plus how long its tier is kept."""
    span = SPAN[tier]
    return (index + 1) * span + (FINE_KEEP if tier == "s" else COARSE_KEEP) + MARGIN


def written(second: int, now: float) -> list[Bucket]:
    """The buckets a count of ``second`` is written to now (none that would expire at once)."""
    return [
        (tier, second // span)
        for tier, span in SPAN.items()
        if expires_at(tier, second // span) > now + MARGIN
    ]


def cover(now: int, start_unix: float, end_unix: float) -> list[Bucket]:
    """The buckets that add up to the window ``[start_unix, end_unix)``, limited to the last
    24 hours and to ``now``."""
    a = max(math.floor(start_unix), now - COARSE_KEEP)
    b = min(math.ceil(end_unix), now + 1)
    if b <= a:
        return []
    fine_from = _up(now - FINE_KEEP + 60, 60)  # one-second buckets from here are surely kept
    if a < fine_from:
        a -= a % 60
    if b % 60 and b - b % 60 < fine_from:
        b = _up(b, 60)
    lo, hi = _up(a, 60), b - b % 60  # whole minutes
    if lo > hi:  # within one minute
        return _range("s", a, b)
    middle: list[Bucket]
    hours_lo, hours_hi = _up(lo, 3600), hi - hi % 3600
    if hours_lo < hours_hi:
        middle = [
            *_range("m", lo, hours_lo),
            *_range("h", hours_lo, hours_hi),
            *_range("m", hours_hi, hi),
        ]
    else:
        middle = _range("m", lo, hi)
    return [*_range("s", a, lo), *middle, *_range("s", hi, b)]


def _up(t: int, step: int) -> int:
    return -(-t // step) * step


def _range(tier: str, start: int, end: int) -> list[Bucket]:
    """The buckets of ``tier`` from ``start`` to ``end`` (both multiples of its span)."""
    span = SPAN[tier]
    return [(tier, i) for i in range(start // span, end // span)]


@dataclass
class Figures:
    """One version's figures over a window (or the sum of every version's)."""

    calls: int = 0
    errors: int = 0  # failed calls
    retries: int = 0
    dead_letters: int = 0
    latency: Histogram = field(default_factory=Histogram)

    @property
    def successes(self) -> int:
        return self.calls - self.errors

    @property
    def error_rate(self) -> float:
        """Failed calls over calls; 0 when there was none."""
        return self.errors / self.calls if self.calls else 0.0

    @property
    def p95(self) -> float | None:
        """Seconds, within 5 %; None without calls."""
        return self.latency.percentile(0.95)

    def add(self, other: Figures) -> None:
        self.calls += other.calls
        self.errors += other.errors
        self.retries += other.retries
        self.dead_letters += other.dead_letters
        self.latency.add(other.latency)

    def to_json(self) -> dict[str, Any]:
        p50, p95, p99 = percentiles(self.latency.counts, (0.5, 0.95, 0.99))
        return {
            "invocations": self.calls,
            "successes": self.successes,
            "failures": self.errors,
            "retries": self.retries,
            "deadLetters": self.dead_letters,
            "errorRate": round(self.error_rate, 6),
            "p50Ms": _ms(p50),
            "p95Ms": _ms(p95),
            "p99Ms": _ms(p99),
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def total(figures: Iterable[Figures]) -> Figures:
    out = Figures()
    for each in figures:
        out.add(each)
    return out


def sum_hashes(hashes: Iterable[Mapping[bytes, bytes]]) -> dict[str, Figures]:
    """Add up bucket hashes (as Redis returns them), per version."""
    out: dict[str, Figures] = {}
    for fields in hashes:
        for raw_name, raw_n in fields.items():
            kind, _, rest = raw_name.decode().partition(":")
            n = int(raw_n)
            if kind == "h":
                bucket, _, version = rest.partition(":")
                counts = _figures(out, version).latency.counts
                counts[int(bucket)] = counts.get(int(bucket), 0) + n
            elif kind == "c":
                _figures(out, rest).calls += n
            elif kind == "e":
                _figures(out, rest).errors += n
            elif kind == "r":
                _figures(out, rest).retries += n
            elif kind == "d":
                _figures(out, rest).dead_letters += n
    return out


def _figures(out: dict[str, Figures], version: str) -> Figures:
    figures = out.get(version)
    if figures is None:
        figures = out[version] = Figures()
    return figures
