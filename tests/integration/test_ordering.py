"""Ordered bindings: one partitionkey's events one after another, different keys in parallel."""

from __future__ import annotations

import asyncio
import zlib

from eventhub.settings import Settings
from tests.support import FunctionServer, RunningHub


def keys_in_different_lanes(settings: Settings) -> tuple[str, str]:
    lanes = settings.ordered_lanes
    first = "alpha"
    lane = zlib.crc32(first.encode()) % lanes
    second = next(
        k for k in (f"key{i}" for i in range(100)) if zlib.crc32(k.encode()) % lanes != lane
    )
    return first, second


async def test_same_key_in_order_different_keys_in_parallel(
    hub: RunningHub, function: FunctionServer, settings: Settings
) -> None:
    function.delays["ord"] = 0.15
    await hub.function("ord", function.url("ord"), maxConcurrency=10)
    await hub.bind("to-ord", "ord", ordering="ordered")
    a, b = keys_in_different_lanes(settings)
    for i in range(5):
        for key in (a, b):
            assert (await hub.post_event(f"{key}-{i}", partitionkey=key)).status == 202
    calls = await function.wait_for(10, "ord")
    for key in (a, b):
        seen = [c.ce["id"] for c in calls if c.ce["partitionkey"] == key]
        assert seen == [f"{key}-{i}" for i in range(5)]
    assert function.max_in_flight == 2  # one per key: serial within, parallel across


async def test_a_retry_holds_back_the_events_after_it(
    hub: RunningHub, function: FunctionServer
) -> None:
    function.respond("strict", 500)  # the first call fails once
    retry = {"maxAttempts": 3, "initialDelay": "300ms", "jitter": 0}
    await hub.function("strict", function.url("strict"), retry=retry)
    await hub.bind("to-strict", "strict", ordering="ordered")
    for i in range(3):
        assert (await hub.post_event(f"s{i}", partitionkey="k")).status == 202
    calls = await function.wait_for(4, "strict")
    assert [c.ce["id"] for c in calls] == ["s0", "s0", "s1", "s2"]
    await asyncio.sleep(0.3)
    assert len(function.calls_to("strict")) == 4


async def test_unordered_bindings_run_in_parallel(
    hub: RunningHub, function: FunctionServer
) -> None:
    function.delays["free"] = 0.3
    await hub.function("free", function.url("free"), maxConcurrency=10)
    await hub.bind("to-free", "free")
    await asyncio.gather(*(hub.post_event(f"f{i}", partitionkey="same") for i in range(5)))
    await function.wait_for(5, "free")
    assert function.max_in_flight >= 3


async def test_a_function_named_like_a_lane_keeps_its_own_consumer(
    hub: RunningHub, function: FunctionServer, settings: Settings
) -> None:
    lane_key = next(
        k
        for k in (f"k{i}" for i in range(1000))
        if zlib.crc32(k.encode()) % settings.ordered_lanes == 3
    )
    await hub.function("resize", function.url("resize"))
    await hub.function("resize-o3", function.url("resize-o3"))
    await hub.bind(
        "ordered-resize", "resize", ordering="ordered", filter=[{"exact": {"type": "r"}}]
    )
    await hub.bind("plain-o3", "resize-o3", filter=[{"exact": {"type": "o"}}])
    for i in range(3):
        assert (await hub.post_event(f"r{i}", type_="r", partitionkey=lane_key)).status == 202
        assert (await hub.post_event(f"o{i}", type_="o")).status == 202
    await function.wait_for(3, "resize")
    await function.wait_for(3, "resize-o3")
    await asyncio.sleep(0.5)
    assert sorted(c.ce["id"] for c in function.calls_to("resize")) == ["r0", "r1", "r2"]
    assert sorted(c.ce["id"] for c in function.calls_to("resize-o3")) == ["o0", "o1", "o2"]
