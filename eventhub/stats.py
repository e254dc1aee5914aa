"""Invocation statistics per function and version, summed over every hub process.

What is counted (the dispatcher reports it, see :class:`Stats`): every call of a function (each
attempt counts, with its outcome and latency), every decision to retry, every dead letter. The
counts first add up in the process, on the dispatch path, as dict increments keyed by function,
version and second; about once a second the flush loop writes them to Redis in one script call
(one round trip), into one-second, one-minute and one-hour buckets (see
:mod:`eventhub.statbuckets`), so the counts of every process land in the same buckets and a
query sums them all. A record lands in the buckets of the second it was made, however late it
is written. Latencies are counted in log-spaced histograms (:mod:`eventhub.histogram`): their
percentiles are within 5 % of the true ones, summed over processes and buckets.

Resolution: one second for the last hour (what a canary judged over a few seconds or minutes
needs), one minute before that, back 24 hours. :meth:`Stats.summary` reports the last 5
minutes, hour and 24 hours; :meth:`Stats.window` any window within the last 24 hours. Figures
lag the calls by about a second: the other processes' last flush.

While Redis is away the counts stay in memory and are written once it is back; nothing on the
dispatch path waits for Redis or fails because of it. Counts held back longer than ten minutes
are kept per minute only, so memory stays bounded: after a longer outage, the one-second
buckets of its earlier part stay empty (a window reads its whole minutes from the minute
buckets, which are complete). Counts older than 24 hours are dropped. A flush cut short may
have been applied already: it is then counted twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson
import redis.asyncio as aioredis
import structlog

from eventhub.errors import DependencyDown
from eventhub.histogram import bucket_of
from eventhub.queue import InvocationQueue
from eventhub.statbuckets import (
    COARSE_KEEP,
    Bucket,
    Figures,
    cover,
    expires_at,
    sum_hashes,
    total,
    written,
)

log = structlog.get_logger(__name__)

_FOLD_AFTER = 600  # counts unwritten for longer are kept per minute only
FLUSH_EVERY = 1.0
_FLUSH_TIMEOUT = 5.0
WINDOWS = (("5m", 300), ("1h", 3600), ("24h", 86400))
_REDIS_DOWN = (aioredis.RedisError, OSError, TimeoutError)
_Key = tuple[str, str, int]  # (function, version, unix second)

# KEYS: bucket hashes; ARGV[1]: JSON list, one item per key: [expire-at, field, n, field, n, ...]
_ADD = """
local batch = cjson.decode(ARGV[1])
for i, key in ipairs(KEYS) do
  local item = batch[i]
  for j = 2, #item, 2 do redis.call('HINCRBY', key, item[j], item[j + 1]) end
  redis.call('EXPIREAT', key, item[1])
end
return #KEYS
"""


# KEYS: bucket hashes; ARGV[1]: how many windows; ARGV[1 + i]: the windows KEYS[i] belongs to
# (bit n set: window n + 1). Returns, per window, its fields summed: [field, n, field, n, ...].
_SUM = """
local windows = tonumber(ARGV[1])
local sums = {}
for w = 1, windows do sums[w] = {} end
for i, key in ipairs(KEYS) do
  local mask = tonumber(ARGV[i + 1])
  local flat = redis.call('HGETALL', key)
  for w = 1, windows do
    if bit.band(mask, 2 ^ (w - 1)) ~= 0 then
      local sum = sums[w]
      for j = 1, #flat, 2 do sum[flat[j]] = (sum[flat[j]] or 0) + tonumber(flat[j + 1]) end
    end
  end
end
local out = {}
for w = 1, windows do
  local list = {}
  for name, n in pairs(sums[w]) do
    list[#list + 1] = name
    list[#list + 1] = string.format('%.0f', n)
  end
  out[w] = list
end
return out
"""


class _Cell:
    """What one version of one function did in one second (or minute)."""

    __slots__ = ("calls", "dead", "errors", "hist", "retries")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.retries = 0
        self.dead = 0
        self.hist: dict[int, int] = {}

    def merge(self, other: _Cell) -> None:
        self.calls += other.calls
        self.errors += other.errors
        self.retries += other.retries
        self.dead += other.dead
        for bucket, n in other.hist.items():
            self.hist[bucket] = self.hist.get(bucket, 0) + n

    def fields(self, version: str) -> Iterable[tuple[str, int]]:
        for name, n in (
            ("c", self.calls),
            ("e", self.errors),
            ("r", self.retries),
            ("d", self.dead),
        ):
            if n:
                yield f"{name}:{version}", n
        for bucket, n in self.hist.items():
            yield f"h:{bucket}:{version}", n


class Stats:
    """Records calls, retries and dead letters per function and version; answers queries.

    The record methods are synchronous and cheap (the dispatcher calls them on every attempt).
    :meth:`run` owns the flushing; :meth:`close` flushes once more on stop. A process that only
    queries (the CLI, the API role) never needs :meth:`run`.
    """

    def __init__(
        self, client: aioredis.Redis, namespace: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._redis = client
        self._prefix = f"{namespace}:stats:"
        self._script = client.register_script(_ADD)
        self._sum_script = client.register_script(_SUM)
        self._clock = clock
        self._fine: dict[_Key, _Cell] = {}
        self._coarse: dict[_Key, _Cell] = {}  # held back long: written per minute only
        self._lock = asyncio.Lock()
        self._failing = False

    # Recording: on the dispatch path, no I/O.

    def _cell(self, function: str, version: str) -> _Cell:
        key = (function, version, int(self._clock()))
        cell = self._fine.get(key)
        if cell is None:
            cell = self._fine[key] = _Cell()
        return cell

    def call(self, function: str, version: str, ok: bool, latency_s: float) -> None:
        """One call of the function made (any attempt), with its outcome and latency."""
        cell = self._cell(function, version)
        cell.calls += 1
        if not ok:
            cell.errors += 1
        bucket = bucket_of(latency_s)
        cell.hist[bucket] = cell.hist.get(bucket, 0) + 1

    def retry(self, function: str, version: str) -> None:
        """A failed attempt will be tried again."""
        self._cell(function, version).retries += 1

    def dead_letter(self, function: str, version: str) -> None:
        """An invocation became a dead letter."""
        self._cell(function, version).dead += 1

    # Flushing.

    async def run(self) -> None:
        """Flush about once a second until cancelled; a failed flush keeps the counts for the
        next one (logged once per outage)."""
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            await self._flush_logged(_FLUSH_TIMEOUT)

    async def close(self, grace: float = _FLUSH_TIMEOUT) -> None:
        """Flush once more (on stop); what cannot be written in time is lost, and logged."""
        if not await self._flush_logged(grace) and (self._fine or self._coarse):
            log.warning("stats_lost", buckets=len(self._fine) + len(self._coarse))

    async def _flush_logged(self, grace: float) -> bool:
        try:
            async with asyncio.timeout(grace):
                await self.flush()
        except Exception as exc:  # Redis away, slow, or refusing: the counts wait here
            if not self._failing:
                log.warning("stats_flush_failed", error=str(exc) or repr(exc))
            self._failing = True
            return False
        if self._failing:
            log.info("stats_flush_recovered")
            self._failing = False
        return True

    async def flush(self) -> None:
        """Write every count recorded so far to Redis, in one script call. On failure (raised)
        the counts are kept for the next flush."""
        async with self._lock:
            fine, coarse = self._fine, self._coarse
            if not fine and not coarse:
                return
            self._fine, self._coarse = {}, {}
            try:
                await self._write(fine, coarse)
            except BaseException:  # cancelled too: the counts stay, the cancellation goes on
                self._keep(fine, coarse)
                raise

    def _keep(self, fine: dict[_Key, _Cell], coarse: dict[_Key, _Cell]) -> None:
        """Take back the counts of a failed flush: the older ones per minute only (keyed by the
        minute's first second), none older than 24 hours."""
        now = self._clock()
        for (function, version, second), cell in fine.items():
            if second < now - _FOLD_AFTER:
                _merge_into(self._coarse, (function, version, second - second % 60), cell)
            else:
                _merge_into(self._fine, (function, version, second), cell)
        for key, cell in coarse.items():
            if key[2] + 60 > now - COARSE_KEEP:
                _merge_into(self._coarse, key, cell)

    async def _write(self, fine: dict[_Key, _Cell], coarse: dict[_Key, _Cell]) -> None:
        now = self._clock()
        writes: dict[str, dict[str, int]] = {}
        expiry: dict[str, int] = {}

        def add(function: str, version: str, cell: _Cell, buckets: Iterable[Bucket]) -> None:
            for tier, index in buckets:
                key = self._key(function, tier, index)
                fields = writes.setdefault(key, {})
                expiry[key] = expires_at(tier, index)
                for name, n in cell.fields(version):
                    fields[name] = fields.get(name, 0) + n

        for (function, version, second), cell in fine.items():
            add(function, version, cell, written(second, now))
        for (function, version, second), cell in coarse.items():
            add(function, version, cell, [b for b in written(second, now) if b[0] != "s"])
        keys = [key for key, fields in writes.items() if fields]
        if keys:
            batch = [[expiry[key], *_flat(writes[key])] for key in keys]
            await self._script(keys=keys, args=[orjson.dumps(batch)])

    def _key(self, function: str, tier: str, index: int) -> str:
        return f"{self._prefix}{function}:{tier}:{index}"

    # Queries: across every process.

    async def summary(self, function: str) -> dict[str, Any]:
        """The figures of the last 5 minutes, hour and 24 hours, in total and per version
        (a version appears once it has a count in the last 24 hours), ready for JSON."""
        await self._flush_logged(_FLUSH_TIMEOUT)  # this process's latest counts too
        now = int(self._clock())
        covers = {name: cover(now, now - length + 1, now + 1) for name, length in WINDOWS}
        sums = await self._read(function, covers)
        by_window = {name: sum_hashes([fields]) for name, fields in sums.items()}
        versions = sorted(by_window["24h"])
        windows: dict[str, Any] = {}
        for name, length in WINDOWS:
            figures = by_window[name]
            windows[name] = {
                "seconds": length,
                "total": total(figures.values()).to_json(),
                "versions": {v: figures.get(v, Figures()).to_json() for v in versions},
            }
        return {"name": function, "windows": windows}

    async def window(self, function: str, start_unix: float, end_unix: float) -> dict[str, Figures]:
        """The figures per version of the calls made from ``start_unix`` up to ``end_unix``,
        within the last 24 hours: exact to the second within the last hour, to the minute
        before it (a minute cut by the window counts whole)."""
        await self._flush_logged(_FLUSH_TIMEOUT)
        buckets = cover(int(self._clock()), start_unix, end_unix)
        sums = await self._read(function, {"window": buckets})
        return sum_hashes(sums.values())

    async def _read(
        self, function: str, windows: Mapping[str, Iterable[Bucket]]
    ) -> dict[str, Mapping[bytes, bytes]]:
        """Each window's buckets summed field by field, by Redis: one script call, which
        answers a few hundred fields rather than every field of every bucket."""
        masks: dict[Bucket, int] = {}
        for n, buckets in enumerate(windows.values()):
            for bucket in buckets:
                masks[bucket] = masks.get(bucket, 0) | 1 << n
        if not masks:
            return {name: {} for name in windows}
        keys = [self._key(function, tier, index) for tier, index in masks]
        try:
            sums = await self._sum_script(keys=keys, args=[len(windows), *masks.values()])
        except _REDIS_DOWN as exc:
            raise DependencyDown(f"Redis is unavailable: {type(exc).__name__}") from exc
        return {
            name: dict(zip(flat[::2], flat[1::2], strict=True))
            for name, flat in zip(windows, sums, strict=True)
        }


async def report(stats: Stats, queue: InvocationQueue, function: str) -> dict[str, Any]:
    """What ``GET /v1/functions/{name}/stats`` and ``eventhub stats`` show: the summary and
    the function's backlog now (every version shares the function's one queue)."""
    summary = await stats.summary(function)
    backlog: dict[str, Any] = dict(await queue.function_status(function))
    age = await queue.oldest_waiting(function) if backlog["queued"] else None
    backlog["oldestWaitingSeconds"] = None if age is None else round(age, 3)
    return {"name": function, "backlog": backlog, "windows": summary["windows"]}


def _merge_into(cells: dict[_Key, _Cell], key: _Key, cell: _Cell) -> None:
    mine = cells.get(key)
    if mine is None:
        mine = cells[key] = _Cell()
    mine.merge(cell)


def _flat(fields: dict[str, int]) -> list[str | int]:
    out: list[str | int] = []
    for name, n in fields.items():
        out += (name, n)
    return out
