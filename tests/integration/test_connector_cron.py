"""The cron source against a real hub and JetStream: tick events, one fire per tick across two
hub processes, missed ticks after a restart (seeded state, and a real kill -9)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import orjson
import pytest

from connectors.cron import rfc3339
from eventhub.resources import API_VERSION, Resource, parse_resource
from tests.support import Call, FunctionServer, HubProcess, RunningHub, client

pytestmark = pytest.mark.slow


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def ticks_of(calls: list[Call], source: str) -> list[int]:
    """The tick (Unix ms) of each call, from its event id ``<source>:<ms>``."""
    ticks = []
    for call in calls:
        name, _, tick = call.ce["id"].rpartition(":")
        assert name == source, call.ce
        ticks.append(int(tick))
    return ticks


def assert_contiguous(ticks: list[int], step: int = 1000) -> None:
    ordered = sorted(set(ticks))
    assert ordered == list(range(ordered[0], ordered[-1] + step, step)), ordered


async def declare(api: RunningHub, source: str, function_url: str, **spec: Any) -> None:
    """A function, the cron source, then its binding (ticks before it are not routed)."""
    fn = unique("fn")
    await api.function(fn, function_url)
    await api.put("sources", source, {"type": "cron", **spec})
    await api.bind(unique("bind"), fn, source=source)


def resource(kind: str, name: str, spec: dict[str, Any]) -> Resource:
    doc = {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}
    return parse_resource(doc)


async def test_every_second_fires_tick_events(hub: RunningHub, function: FunctionServer) -> None:
    source = unique("cron")
    payload = {"job": "report", "size": 3}
    await declare(
        hub, source, function.url("tick"), schedule="@every 1s", jitter="300ms", payload=payload
    )
    calls = await function.wait_for(3, "tick", wait=10)
    ticks = ticks_of(calls, source)
    assert all(t % 1000 == 0 for t in ticks)  # on the tick, whatever the jitter
    assert_contiguous(ticks)
    for call, tick in zip(calls, ticks, strict=True):
        # the HTTP binding percent-encodes header values (the space in the subject)
        assert {k: unquote(v) for k, v in call.ce.items()} == {
            "specversion": "1.0",
            "id": f"{source}:{tick}",
            "source": f"/eventhub/cron/{source}",
            "type": "eventhub.cron.tick",
            "subject": "@every 1s",
            "time": rfc3339(tick),
        }
        assert call.headers["content-type"] == "application/json"
        assert orjson.loads(call.body) == payload
    # saved once deliver returned, which may be just after the function was called
    assert hub.hub is not None
    deadline = time.monotonic() + 5
    while (state := await hub.hub.store.load_state(source) or {}).get("lastTickMs", 0) < max(ticks):
        assert time.monotonic() < deadline, state
        await asyncio.sleep(0.1)


async def test_two_processes_fire_each_tick_once(
    settings_factory: Callable[..., HubProcess], function: FunctionServer
) -> None:
    one, two = settings_factory(), settings_factory()
    await asyncio.gather(one.ready(), two.ready())
    source = unique("cron")
    async with client(one) as api:
        await declare(api, source, function.url("both"), schedule="@every 1s")
        await function.wait_for(5, "both", wait=30)  # about 4 s of ticks after the first
        ticks = ticks_of(function.calls_to("both"), source)
        assert len(ticks) == len(set(ticks)), sorted(ticks)  # no duplicates
        assert_contiguous(ticks)  # no gaps
        # and both processes did fire every tick: each delivered events
        deadline = time.monotonic() + 8
        while True:
            async with api.http.get(
                f"{api.base_url}/v1/sources/{source}/status", headers=api.auth()
            ) as response:
                processes = (await response.json())["processes"]
            if len(processes) == 2 and all(p["eventsIn"] > 0 for p in processes):
                break
            assert time.monotonic() < deadline, processes
            await asyncio.sleep(0.5)


def quiet_minute_schedule() -> tuple[str, int]:
    """An hourly schedule whose ticks are ~30 min away from now, and its latest tick (ms)."""
    now = datetime.now(UTC)
    minute = (now.minute + 30) % 60
    latest = now.replace(minute=minute, second=0, microsecond=0)
    if latest > now:
        latest -= timedelta(hours=1)
    return f"{minute} * * * *", round(latest.timestamp() * 1000)


@pytest.mark.parametrize(
    ("missed", "expected_hours_ago"),
    [("once", [0]), ("all", [1, 0]), ("skip", [])],
)
async def test_missed_ticks_from_the_saved_state_follow_the_policy(
    hub: RunningHub, function: FunctionServer, missed: str, expected_hours_ago: list[int]
) -> None:
    assert hub.hub is not None
    source = unique("cron")
    schedule, latest = quiet_minute_schedule()
    hour = 3_600_000
    # As if the hub was down for five hours: the last tick it fired is five ticks back.
    await hub.hub.store.save_state(source, {"lastTickMs": latest - 5 * hour})
    # Declared in one transaction, like `eventhub apply`: the binding is routed before the
    # source's first (catch-up) fire.
    fn = unique("fn")
    await hub.hub.store.apply(
        [
            resource("Function", fn, {"url": function.url(missed)}),
            resource(
                "Source",
                source,
                {"type": "cron", "schedule": schedule, "missed": missed, "startingDeadline": "2h"},
            ),
            resource("Binding", unique("bind"), {"source": source, "function": fn}),
        ],
        apply_set=source,
    )
    expected = [latest - h * hour for h in expected_hours_ago]
    if expected:
        calls = await function.wait_for(len(expected), missed, wait=10)
        assert sorted(ticks_of(calls, source)) == expected  # one batch: any order
    await asyncio.sleep(1.0)  # nothing else comes
    assert sorted(ticks_of(function.calls_to(missed), source)) == expected
    state = await hub.hub.store.load_state(source)
    if expected:
        assert state == {"lastTickMs": latest, "lastTick": rfc3339(latest)}
    else:
        assert state == {"lastTickMs": latest - 5 * hour}


async def test_ticks_missed_while_killed_fire_after_restart(
    settings_factory: Callable[..., HubProcess], function: FunctionServer
) -> None:
    first = settings_factory()
    await first.ready()
    source = unique("cron")
    async with client(first) as api:
        await declare(
            api,
            source,
            function.url("down"),
            schedule="@every 1s",
            missed="all",
            startingDeadline="1m",
        )
    await function.wait_for(2, "down", wait=10)
    first.kill()
    killed_at = int(time.time() * 1000)
    await asyncio.sleep(2.5)  # ticks pass with no hub
    second = settings_factory()
    await second.ready()
    restarted_at = int(time.time() * 1000)
    deadline = time.monotonic() + 15
    while max(ticks_of(function.calls_to("down"), source)) < restarted_at + 1000:
        assert time.monotonic() < deadline, "no tick after the restart"
        await function.wait_for(len(function.calls_to("down")) + 1, "down", wait=5)
    calls = function.calls_to("down")
    ticks = ticks_of(calls, source)
    assert_contiguous(ticks)  # the ticks of the downtime were fired late
    assert sum(killed_at < t < restarted_at for t in ticks) >= 2
    # one call per tick, but for an invocation redelivered because the kill cut it short
    firsts = [t for t, c in zip(ticks, calls, strict=True) if c.headers["eventhub-attempt"] == "1"]
    assert len(firsts) == len(set(firsts)), sorted(firsts)
