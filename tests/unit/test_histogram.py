"""Latency histograms: every reported value is within 5 % of the truth, and histograms merge
by addition without losing that bound (so processes and buckets can be summed)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from eventhub.histogram import (
    MAX_LATENCY,
    MIN_LATENCY,
    RELATIVE_ERROR,
    Histogram,
    bucket_of,
    percentiles,
    value_of,
)

LATENCY = st.floats(min_value=MIN_LATENCY, max_value=MAX_LATENCY, allow_nan=False)
BOUND = RELATIVE_ERROR * (1 + 1e-9)  # float rounding at the bucket edges


def _exact(values: list[float], q: float) -> float:
    """The nearest-rank percentile: the ceil(q * n)-th smallest value."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered) - 1e-9) - 1, 0)]


@given(LATENCY)
def test_a_bucket_reports_its_values_within_five_percent(latency: float) -> None:
    reported = value_of(bucket_of(latency))
    assert abs(reported - latency) <= BOUND * latency


def test_latencies_out_of_range_are_clamped_not_refused() -> None:
    assert bucket_of(0.0) == bucket_of(-1.0) == bucket_of(float("nan")) == bucket_of(MIN_LATENCY)
    assert bucket_of(1e9) == bucket_of(MAX_LATENCY)


@settings(max_examples=200)
@given(st.lists(LATENCY, min_size=1, max_size=300), st.sampled_from([0.0, 0.5, 0.95, 0.99, 1.0]))
def test_a_percentile_is_within_five_percent_of_the_exact_one(
    values: list[float], q: float
) -> None:
    histogram = Histogram()
    for value in values:
        histogram.record(value)
    reported = histogram.percentile(q)
    exact = _exact(values, q)
    assert reported is not None
    assert abs(reported - exact) <= BOUND * exact


@given(st.lists(LATENCY, max_size=100), st.lists(LATENCY, max_size=100))
def test_merged_histograms_are_the_histogram_of_all_values(a: list[float], b: list[float]) -> None:
    left, right, both = Histogram(), Histogram(), Histogram()
    for value in a:
        left.record(value)
        both.record(value)
    for value in b:
        right.record(value)
        both.record(value)
    left.add(right)
    assert left.counts == both.counts
    assert left.total == len(a) + len(b)
    qs = [0.5, 0.95, 0.99]
    assert percentiles(left.counts, qs) == percentiles(both.counts, qs)


def test_several_percentiles_in_any_order_in_one_pass() -> None:
    histogram = Histogram()
    for ms in range(1, 101):  # 1 ms .. 100 ms
        histogram.record(ms / 1000)
    p99, p50, p95 = percentiles(histogram.counts, [0.99, 0.5, 0.95])
    assert p50 is not None and p95 is not None and p99 is not None
    assert abs(p50 - 0.050) <= BOUND * 0.050
    assert abs(p95 - 0.095) <= BOUND * 0.095
    assert abs(p99 - 0.099) <= BOUND * 0.099


def test_nothing_recorded_has_no_percentile() -> None:
    assert Histogram().percentile(0.5) is None
    assert percentiles({}, [0.5, 0.99]) == [None, None]
