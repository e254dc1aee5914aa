"""Invocation statistics across hub processes, on the real Redis, NATS and PostgreSQL.

- the counts of several processes (here: several :class:`Stats`, each with its own Redis
  connection) add up, latency percentiles included;
- a window reads one-second buckets for the last hour and minute buckets before it;
- a Redis outage neither fails recording nor loses the counts: they are written once it is back;
- ``GET /v1/functions/{name}/stats`` and ``eventhub stats`` show what real calls through a hub's
  dispatcher did, per version, and the function's backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from eventhub.histogram import Histogram
from eventhub.settings import Settings
from eventhub.stats import Stats
from tests.support import FunctionServer, RunningHub, free_port, run_eventhub

WAIT = 20.0


@contextlib.asynccontextmanager
async def _stats(
    settings: Settings, url: str | None = None, clock: Callable[[], float] = time.time
) -> AsyncIterator[Stats]:
    client = aioredis.from_url(url or settings.redis_url.get_secret_value())
    try:
        yield Stats(client, settings.namespace, clock=clock)
    finally:
        await client.aclose()


async def test_the_counts_of_two_processes_add_up(settings: Settings) -> None:
    start = time.time()
    expected = {"v1": Histogram(), "v2": Histogram()}
    async with _stats(settings) as one, _stats(settings) as two, _stats(settings) as reader:
        for i in range(200):
            stats, version = (one, "v1") if i % 2 else (two, "v1" if i % 4 else "v2")
            latency = 0.001 * (1 + i % 50)
            stats.call("resize", version, i % 10 != 0, latency)
            expected[version].record(latency)
            if i % 10 == 0:
                stats.retry("resize", version)
        one.dead_letter("resize", "v1")
        two.dead_letter("resize", "v1")
        two.call("other", "v1", True, 0.5)  # another function: not counted below
        await one.flush()
        await two.flush()

        summary = await reader.summary("resize")
        window = await reader.window("resize", start - 1, time.time() + 1)

    assert summary["name"] == "resize"
    for name in ("5m", "1h", "24h"):
        figures = summary["windows"][name]
        v1, v2, total = figures["versions"]["v1"], figures["versions"]["v2"], figures["total"]
        assert set(figures["versions"]) == {"v1", "v2"}
        assert (v1["invocations"], v2["invocations"], total["invocations"]) == (150, 50, 200)
        assert total["failures"] == 20 and total["successes"] == 180
        assert total["retries"] == 20 and total["errorRate"] == 0.1
        assert (v1["deadLetters"], v2["deadLetters"]) == (2, 0)
        assert v1["p50Ms"] == pytest.approx(expected["v1"].percentile(0.5) * 1000, abs=1e-3)
        assert v1["p99Ms"] == pytest.approx(expected["v1"].percentile(0.99) * 1000, abs=1e-3)
        assert v2["p95Ms"] == pytest.approx(expected["v2"].percentile(0.95) * 1000, abs=1e-3)
    assert set(window) == {"v1", "v2"}
    assert window["v1"].calls == 150 and window["v2"].calls == 50
    assert window["v1"].errors + window["v2"].errors == 20
    assert window["v1"].latency.counts == expected["v1"].counts
    assert window["v2"].p95 == expected["v2"].percentile(0.95)


async def test_windows_have_second_resolution_for_the_last_hour(settings: Settings) -> None:
    now = float(int(time.time()))
    clock = {"now": now}
    async with _stats(settings, clock=lambda: clock["now"]) as stats:
        for ago, version in ((5, "canary"), (15, "canary"), (7200, "stable")):
            clock["now"] = now - ago
            stats.call("f", version, ago == 5, 0.01)
            await stats.flush()
        clock["now"] = now
        last_ten = await stats.window("f", now - 10, now + 1)
        last_twenty = await stats.window("f", now - 20, now + 1)
        two_hours_ago = await stats.window("f", now - 7200, now - 7199)
        summary = await stats.summary("f")

    assert set(last_ten) == {"canary"} and last_ten["canary"].calls == 1
    assert last_ten["canary"].error_rate == 0.0
    assert last_twenty["canary"].calls == 2 and last_twenty["canary"].errors == 1
    # Two hours back only the minute buckets are kept: the whole minute is read.
    assert set(two_hours_ago) == {"stable"} and two_hours_ago["stable"].calls == 1
    assert summary["windows"]["5m"]["total"]["invocations"] == 2
    assert summary["windows"]["24h"]["total"]["invocations"] == 3
    assert summary["windows"]["5m"]["versions"]["stable"]["invocations"] == 0


class _Proxy:
    """A TCP forwarder to Redis that can be stopped and started again on the same port: a
    Redis outage as a client sees it (connections reset, then refused)."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target = target_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}
            writer.close()
            up_writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def test_a_redis_outage_keeps_the_counts_until_it_is_back(settings: Settings) -> None:
    redis_port = int(settings.redis_url.get_secret_value().rsplit(":", 1)[1].split("/")[0])
    proxy = _Proxy(redis_port)
    await proxy.start()
    url = f"redis://127.0.0.1:{proxy.port}/0"
    async with _stats(settings, url) as stats, _stats(settings) as reader:
        loop = asyncio.create_task(stats.run())
        try:
            stats.call("f", "v1", True, 0.01)
            await _wait_calls(reader, "f", 1)
            await proxy.stop()
            for _ in range(50):
                stats.call("f", "v1", False, 0.02)  # recording never waits for Redis
            stats.dead_letter("f", "v1")
            with pytest.raises((aioredis.RedisError, OSError)):
                await stats.flush()
            assert (await reader.summary("f"))["windows"]["5m"]["total"]["invocations"] == 1
            await proxy.start()
            figures = await _wait_calls(reader, "f", 51)
            assert figures["failures"] == 50 and figures["deadLetters"] == 1
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        assert loop.cancelled()  # the flush loop passes its cancellation on
        await proxy.stop()


async def _wait_calls(reader: Stats, function: str, calls: int) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        figures: dict[str, Any] = (await reader.summary(function))["windows"]["5m"]["total"]
        if figures["invocations"] >= calls:
            assert figures["invocations"] == calls, figures
            return figures
        assert time.monotonic() < deadline, figures
        await asyncio.sleep(0.1)


# Through a hub: real calls, counted by the dispatcher.


async def _invoke(hub: RunningHub, target: str, count: int = 1) -> None:
    for _ in range(count):
        async with hub.http.post(
            f"{hub.base_url}/v1/functions/{target}/invocations", data=b"x", headers=hub.auth()
        ) as response:
            assert response.status == 202, await response.text()


async def _get_stats(hub: RunningHub, name: str) -> tuple[int, dict[str, Any]]:
    async with hub.http.get(
        f"{hub.base_url}/v1/functions/{name}/stats", headers=hub.auth()
    ) as response:
        return response.status, await response.json(content_type=None)


async def _wait_stats(
    hub: RunningHub, name: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        status, doc = await _get_stats(hub, name)
        assert status == 200, doc
        if done(doc):
            return doc
        assert time.monotonic() < deadline, doc
        await asyncio.sleep(0.1)


async def test_the_api_and_cli_show_what_the_dispatcher_did(
    hub: RunningHub, function: FunctionServer, settings: Settings
) -> None:
    fast_retry = {"maxAttempts": 2, "initialDelay": "50ms", "jitter": 0}
    await hub.function(
        "resize",
        function.url("latest"),
        retry={"maxAttempts": 3, "initialDelay": "50ms", "jitter": 0},
        versions={
            "v1": {"url": function.url("v1")},
            "v2": {"url": function.url("v2"), "retry": fast_retry},
        },
    )
    await hub.wait_routed("resize")
    function.respond("v2", 500)  # v2's first call fails and is retried
    function.rules["latest"] = lambda call: 500  # latest always fails: a dead letter
    await _invoke(hub, "resize:v1", 3)
    await _invoke(hub, "resize:v2", 2)
    await _invoke(hub, "resize")  # the default version: latest
    await function.wait_for(3, "v1")
    await function.wait_for(3, "v2")

    def settled(doc: dict[str, Any]) -> bool:
        total = doc["windows"]["5m"]["total"]
        return total["invocations"] >= 9 and total["deadLetters"] >= 1

    doc = await _wait_stats(hub, "resize", settled)
    for window in ("5m", "1h", "24h"):
        versions = doc["windows"][window]["versions"]
        assert set(versions) == {"v1", "v2", "latest"}
        v1, v2, latest = versions["v1"], versions["v2"], versions["latest"]
        assert (v1["invocations"], v1["failures"], v1["retries"]) == (3, 0, 0)
        assert (v2["invocations"], v2["successes"], v2["failures"], v2["retries"]) == (3, 2, 1, 1)
        assert (latest["invocations"], latest["failures"], latest["retries"]) == (3, 3, 2)
        assert latest["deadLetters"] == 1
        assert v1["p50Ms"] is not None and v1["p99Ms"] >= v1["p50Ms"]
        assert doc["windows"][window]["total"]["invocations"] == 9
    assert doc["backlog"] == {
        "queued": 0,
        "inFlight": 0,
        "retrying": 0,
        "oldestWaitingSeconds": None,
    }

    table = await asyncio.to_thread(run_eventhub, settings, "stats", "resize")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("Function/resize backlog: queued=0 in-flight=0 retrying=0")
    rows = {tuple(line.split()[:2]): line.split() for line in lines[2:]}
    assert rows["VERSION", "WINDOW"][:8] == [
        "VERSION", "WINDOW", "CALLS", "OK", "FAILED", "ERROR%", "RETRIES", "DEAD"
    ]  # fmt: skip
    assert rows["all", "5m"][2:8] == ["9", "5", "4", "44.4%", "3", "1"]
    assert rows["v2", "24h"][2:8] == ["3", "2", "1", "33.3%", "1", "0"]
    raw = await asyncio.to_thread(run_eventhub, settings, "stats", "resize", "--json")
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout)["windows"]["24h"]["versions"]["latest"]["deadLetters"] == 1

    unknown = await asyncio.to_thread(run_eventhub, settings, "stats", "nope")
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert unknown.stderr.strip() == "eventhub: Function 'nope' does not exist"
    status, problem = await _get_stats(hub, "nope")
    assert status == 404 and problem["status"] == 404 and "nope" in problem["detail"]


async def test_the_backlog_shows_what_waits_and_for_how_long(
    hub: RunningHub, function: FunctionServer
) -> None:
    gate = function.gates["slow"] = asyncio.Event()
    await hub.function("slow", function.url("slow"), maxConcurrency=1)
    await hub.wait_routed("slow")
    await _invoke(hub, "slow", 3)
    await function.wait_for(1, "slow")
    try:
        doc = await _wait_stats(hub, "slow", lambda d: d["backlog"]["queued"] == 2)
        backlog = doc["backlog"]
        assert backlog["inFlight"] == 1 and backlog["retrying"] == 0
        assert isinstance(backlog["oldestWaitingSeconds"], float)
        assert backlog["oldestWaitingSeconds"] >= 0
    finally:
        gate.set()
    doc = await _wait_stats(hub, "slow", lambda d: d["windows"]["5m"]["total"]["invocations"] == 3)
    assert doc["backlog"]["oldestWaitingSeconds"] is None
