"""Invocation statistics without Redis: what records add up to, how the buckets of several
processes and seconds merge, which buckets a window reads, and what a failed flush keeps."""

from __future__ import annotations

import itertools

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from eventhub.histogram import Histogram
from eventhub.statbuckets import (
    COARSE_KEEP,
    FINE_KEEP,
    SPAN,
    Figures,
    cover,
    sum_hashes,
    written,
)
from eventhub.stats import Stats

NOW = 1_700_000_000 - 1_700_000_000 % 3600  # an hour boundary


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _stats(clock: Clock, url: str = "redis://127.0.0.1:6379/0") -> Stats:
    return Stats(aioredis.from_url(url), "ns", clock=clock)


def _stored(stats: Stats) -> list[dict[bytes, bytes]]:
    """The in-memory counts as Redis would hold them: one hash per (function, second)."""
    hashes: dict[tuple[str, int], dict[bytes, bytes]] = {}
    for (function, version, second), cell in stats._fine.items():
        fields = hashes.setdefault((function, second), {})
        for name, n in cell.fields(version):
            fields[name.encode()] = str(int(fields.get(name.encode(), b"0")) + n).encode()
    return list(hashes.values())


def test_records_add_up_per_version() -> None:
    stats = _stats(Clock(NOW))
    for latency in (0.010, 0.020, 0.030):
        stats.call("resize", "v1", True, latency)
    stats.call("resize", "v1", False, 2.0)
    stats.retry("resize", "v1")
    stats.call("resize", "v2", False, 0.5)
    stats.dead_letter("resize", "v2")
    figures = sum_hashes(_stored(stats))
    v1, v2 = figures["v1"], figures["v2"]
    assert (v1.calls, v1.errors, v1.successes, v1.retries, v1.dead_letters) == (4, 1, 3, 1, 0)
    assert (v2.calls, v2.errors, v2.retries, v2.dead_letters) == (1, 1, 0, 1)
    assert v1.error_rate == 0.25
    doc = v1.to_json()
    assert doc["invocations"] == 4 and doc["failures"] == 1 and doc["deadLetters"] == 0
    assert doc["p50Ms"] == pytest.approx(20.0, rel=0.05)
    assert doc["p99Ms"] == pytest.approx(2000.0, rel=0.05)  # nearest rank: the slowest of 4


def test_buckets_of_several_processes_and_seconds_sum_up() -> None:
    clock = Clock(NOW)
    one, two = _stats(clock), _stats(clock)
    expected = Histogram()
    for i in range(100):
        clock.now = NOW + i % 7  # several seconds
        latency = 0.001 * (i + 1)
        (one if i % 2 else two).call("f", "v1", i % 10 != 0, latency)
        expected.record(latency)
    merged = sum_hashes(_stored(one) + _stored(two))["v1"]
    assert merged.calls == 100 and merged.errors == 10
    assert merged.latency.counts == expected.counts
    assert merged.p95 == expected.percentile(0.95)


def test_figures_without_calls() -> None:
    empty = Figures()
    assert empty.error_rate == 0.0 and empty.p95 is None
    assert empty.to_json()["p50Ms"] is None


def _spans(buckets: list[tuple[str, int]]) -> list[tuple[int, int]]:
    return sorted((i * SPAN[t], (i + 1) * SPAN[t]) for t, i in buckets)


@given(
    st.integers(min_value=0, max_value=3 * 86400),
    st.floats(min_value=0, max_value=2 * 86400),
    st.floats(min_value=0.5, max_value=2 * 86400),
)
def test_a_window_is_tiled_by_buckets_without_gap_or_overlap(
    shift: int, back: float, length: float
) -> None:
    now = NOW + shift
    start = now - back
    buckets = cover(now, start, start + length)
    if not buckets:
        assert start + length <= now - COARSE_KEEP or start >= now + 1
        return
    spans = _spans(buckets)
    for (_, end), (begin, _) in itertools.pairwise(spans):
        assert end == begin
    first, last = spans[0][0], spans[-1][1]
    assert first <= max(start, now - COARSE_KEEP) < first + 60  # exact, or its whole minute
    assert last >= min(start + length, now + 1) - 1e-9
    for tier, index in buckets:
        if tier == "s":
            assert index >= now - FINE_KEEP  # one-second buckets only where they are kept
    assert len(buckets) <= 60 + 59 + 24 + 59 + 60


def test_a_recent_window_is_exact_to_the_second() -> None:
    assert cover(NOW, NOW - 30.5, NOW) == [("s", s) for s in range(NOW - 31, NOW)]
    # Never past now:
    assert cover(NOW, NOW - 5, NOW + 3600) == [("s", s) for s in range(NOW - 5, NOW + 1)]


def test_an_old_window_reads_whole_minutes() -> None:
    start = NOW - 7200 + 10  # ten seconds into a minute, two hours ago
    assert cover(NOW, start, start + 100) == [("m", (NOW - 7200) // 60 + i) for i in (0, 1)]


def test_the_last_24_hours_read_few_buckets() -> None:
    now = NOW + 1234
    buckets = cover(now, now - 86399, now + 1)
    assert sum(1 for t, _ in buckets if t == "h") == 23
    assert len(buckets) < 200
    assert cover(now, now - 10 * 86400, now - 9 * 86400) == []
    assert cover(now, now, now) == []


def test_a_count_is_written_to_each_tier_while_that_tier_keeps_it() -> None:
    assert [t for t, _ in written(NOW, NOW)] == ["s", "m", "h"]
    assert [t for t, _ in written(NOW - 2 * 3600, NOW)] == ["m", "h"]
    assert written(NOW - 2 * 86400, NOW) == []


async def test_a_failed_flush_keeps_the_counts_older_ones_per_minute() -> None:
    clock = Clock(NOW)
    stats = _stats(clock, "redis://127.0.0.1:1/0")  # nothing listens there
    stats.call("f", "v1", True, 0.01)
    clock.now = NOW + 700  # the first record is now older than ten minutes
    stats.call("f", "v1", False, 0.02)
    stats.retry("f", "v1")
    with pytest.raises((aioredis.RedisError, OSError)):
        await stats.flush()
    assert set(stats._fine) == {("f", "v1", NOW + 700)}
    assert set(stats._coarse) == {("f", "v1", NOW)}
    assert stats._coarse["f", "v1", NOW].calls == 1
    clock.now = NOW + COARSE_KEEP + 700
    with pytest.raises((aioredis.RedisError, OSError)):
        await stats.flush()
    later = NOW + 660  # the minute of NOW + 700; the other one is a day old: dropped
    assert set(stats._coarse) == {("f", "v1", later)}
    assert stats._coarse["f", "v1", later].retries == 1
    await stats.close(grace=1.0)  # logged, not raised


def test_the_last_hour_is_exact_to_the_second() -> None:
    now = NOW + 1234
    spans = _spans(cover(now, now - 3599, now + 1))
    assert (spans[0][0], spans[-1][1]) == (now - 3599, now + 1)
