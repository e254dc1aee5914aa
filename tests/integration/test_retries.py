"""The retry schedule: an invocation waiting for its next attempt holds none of its function's
concurrency, keeps its attempt count and age, and survives a hub killed with -9."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

from tests.support import Call, FunctionServer, HubProcess, RunningHub, client


def _poison(call: Call) -> int | None:
    return 503 if call.ce["id"].startswith("poison") else None


async def _function_status(hub: RunningHub, name: str) -> dict[str, int]:
    async with hub.http.get(
        f"{hub.base_url}/v1/functions/{name}/status", headers=hub.auth()
    ) as response:
        assert response.status == 200, await response.text()
        return await response.json()  # type: ignore[no-any-return]


async def test_healthy_invocations_overtake_waiting_retries(
    hub: RunningHub, function: FunctionServer
) -> None:
    function.rules["busy"] = _poison
    retry = {"maxAttempts": 3, "initialDelay": "60s", "jitter": 0}
    await hub.function("busy", function.url("busy"), maxConcurrency=2, retry=retry)
    await hub.bind("to-busy", "busy")
    await hub.wait_routed("busy")
    for i in range(2):  # as many poison events as the function has slots
        assert (await hub.post_event(f"poison-{i}")).status == 202
    await function.wait_for(2, "busy")
    for i in range(20):
        assert (await hub.post_event(f"healthy-{i}")).status == 202

    # With the poison events holding both slots for their 60 s backoff, none of these calls
    # could happen before the poison's second attempts; they all do.
    calls = await function.wait_for(22, "busy")
    ids = [c.ce["id"] for c in calls]
    assert sorted(ids[:2]) == ["poison-0", "poison-1"]
    assert sorted(ids[2:]) == sorted(f"healthy-{i}" for i in range(20))
    assert all(c.headers["eventhub-attempt"] == "1" for c in calls)

    # The waiting retries are a visible backlog: in the status API and in /metrics.
    status = await _function_status(hub, "busy")
    assert status == {
        "name": "busy",
        "paused": False,
        "maxConcurrency": 2,
        "queued": 0,
        "inFlight": 0,
        "retrying": 2,
    }
    deadline = time.monotonic() + 10
    while True:
        async with hub.http.get(f"{hub.base_url}/metrics") as response:
            text = await response.text()
        if 'eventhub_retries_waiting{function="busy"} 2.0' in text:
            break
        assert time.monotonic() < deadline, re.findall(r"eventhub_retries_waiting.*", text)
        await asyncio.sleep(0.2)


async def test_a_retry_keeps_its_attempt_count_and_its_history(
    hub: RunningHub, function: FunctionServer
) -> None:
    function.respond("twice", 503, 429, 500)
    retry = {"maxAttempts": 3, "initialDelay": "50ms", "jitter": 0}
    await hub.function("twice", function.url("twice"), retry=retry, maxConcurrency=1)
    await hub.bind("to-twice", "twice")
    await hub.wait_routed("twice")
    assert (await hub.post_event("thrice-failed")).status == 202
    [letter] = await hub.wait_dead_letters(1, function="twice")
    calls = function.calls_to("twice")
    assert [c.headers["eventhub-attempt"] for c in calls] == ["1", "2", "3"]
    assert len({c.headers["eventhub-invocation-id"] for c in calls}) == 1
    assert letter["reason"] == "attempts-exhausted"
    assert [a["status"] for a in letter["attempts"]] == [503, 429, 500]
    assert (await _function_status(hub, "twice"))["retrying"] == 0


async def test_unknown_function_status_is_404(hub: RunningHub) -> None:
    async with hub.http.get(
        f"{hub.base_url}/v1/functions/nope/status", headers=hub.auth()
    ) as response:
        assert response.status == 404
        assert response.content_type == "application/problem+json"


async def test_a_waiting_retry_survives_a_hub_killed_with_sigkill(
    hub_process: Callable[[], HubProcess], function: FunctionServer
) -> None:
    first = hub_process()
    await first.ready()
    function.respond("later", 503)
    async with client(first) as api:
        retry = {"maxAttempts": 3, "initialDelay": "2s", "jitter": 0}
        await api.function("later", function.url("later"), retry=retry)
        await api.bind("to-later", "later")
        await asyncio.sleep(0.3)
        assert (await api.post_event("patient")).status == 202
        await function.wait_for(1, "later")
        deadline = time.monotonic() + 10
        while (await _function_status(api, "later"))["retrying"] != 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    first.kill()  # the retry waits in JetStream, not in the process
    second = hub_process()
    await second.ready()
    calls = await function.wait_for(2, "later", wait=30)
    assert [c.ce["id"] for c in calls] == ["patient", "patient"]
    assert calls[1].headers["eventhub-attempt"] == "2"
    await asyncio.sleep(1.0)
    assert len(function.calls_to("later")) == 2
