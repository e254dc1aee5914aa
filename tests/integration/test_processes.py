"""Hub processes: kill -9 mid-invocation, graceful SIGTERM, two processes sharing limits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.support import FunctionServer, HubProcess, client

pytestmark = pytest.mark.slow


async def test_sigkill_during_invocation_then_restart_delivers(
    hub_process: Callable[[], HubProcess], function: FunctionServer
) -> None:
    first = hub_process()
    await first.ready()
    function.delays["slow"] = 2.0
    async with client(first) as api:
        await api.function("slow", function.url("slow"), timeout="10s")
        await api.bind("to-slow", "slow")
        assert (await api.post_event("survivor")).status == 202
    await function.wait_for(1, "slow")  # the call is in flight ...
    first.kill()  # ... and the hub dies before it can ack
    second = hub_process()
    await second.ready()
    calls = await function.wait_for(2, "slow", wait=30)  # redelivered after ack_wait
    assert [c.ce["id"] for c in calls] == ["survivor", "survivor"]
    assert calls[1].headers["eventhub-attempt"] == "2"


async def test_sigterm_finishes_in_flight_work_and_loses_nothing(
    hub_process: Callable[[], HubProcess], function: FunctionServer
) -> None:
    first = hub_process()
    await first.ready()
    function.delays["work"] = 1.0
    async with client(first) as api:
        await api.function("work", function.url("work"), maxConcurrency=2)
        await api.bind("to-work", "work")
        for i in range(6):
            assert (await api.post_event(f"w{i}")).status == 202
    await function.wait_for(2, "work")
    # In-flight calls finish, then the process exits (in a thread: the function server runs on
    # this event loop and must keep answering meanwhile).
    assert await asyncio.to_thread(first.terminate, 20) == 0, first.output()
    assert "dispatch_handed_back" not in first.output()
    second = hub_process()
    await second.ready()
    calls = await function.wait_for(6, "work", wait=30)
    await asyncio.sleep(6)  # longer than ack_wait: anything unacked would come back
    ids = sorted(c.ce["id"] for c in function.calls_to("work"))
    assert ids == [f"w{i}" for i in range(6)], ids  # each exactly once
    assert len(calls) >= 6


async def test_max_concurrency_holds_across_two_processes(
    hub_process: Callable[[], HubProcess], function: FunctionServer
) -> None:
    one, two = hub_process(), hub_process()
    await asyncio.gather(one.ready(), two.ready())
    function.delays["busy"] = 0.2
    async with client(one) as api:
        await api.function("busy", function.url("busy"), maxConcurrency=3)
        await api.bind("to-busy", "busy")
        await asyncio.sleep(0.5)  # the other process picks the function up by NOTIFY
        for i in range(30):
            assert (await api.post_event(f"c{i}")).status == 202
    await function.wait_for(30, "busy", wait=30)
    assert function.max_in_flight == 3
    assert len({c.ce["id"] for c in function.calls_to("busy")}) == 30


async def test_roles_run_apart(
    settings_factory: Callable[..., HubProcess], function: FunctionServer
) -> None:
    api = settings_factory("api")
    dispatch = settings_factory("dispatch")
    await api.ready()
    await dispatch.ready()
    async with client(api) as hub:
        await hub.function("split", function.url("split"))
        await hub.bind("to-split", "split")
        await asyncio.sleep(0.5)
        assert (await hub.post_event("across")).status == 202
    [call] = await function.wait_for(1, "split")
    assert call.ce["id"] == "across"
