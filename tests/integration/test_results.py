"""A function's result becomes an event: onSuccess and onFailure destinations, end to end."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from eventhub.settings import Settings
from tests.conftest import TOKEN
from tests.support import FunctionServer, RunningHub, start_hub


@pytest.fixture
async def short_chains(settings: Settings) -> AsyncIterator[RunningHub]:
    async with start_hub(settings.model_copy(update={"max_hops": 3}), TOKEN) as hub:
        yield hub


async def test_a_result_goes_to_the_next_function_wrapped_with_its_causation(
    hub: RunningHub, function: FunctionServer
) -> None:
    await hub.function("next", function.url("next"))
    await hub.function("first", function.url("first"), onSuccess={"function": "next"})
    await hub.bind("to-first", "first")
    function.headers["first"] = {"Content-Type": "application/json"}
    assert (await hub.post_event("order-1", traceparent="x")).status == 202
    [call] = await function.wait_for(1, "next")
    [first] = function.calls_to("first")
    ce = call.ce
    assert ce["type"] == "eventhub.function.result"
    assert ce["source"] == "/eventhub/functions/first"
    assert ce["subject"] == "latest"
    assert ce["eventhubcauseid"] == "order-1" and ce["eventhubcausesource"] == "/test"
    assert ce["eventhubinvocation"] == first.headers["eventhub-invocation-id"]
    assert ce["eventhubhops"] == "1"
    assert call.body == b"status 200"  # the response body, byte for byte
    assert call.headers["content-type"].startswith("application/json")
    # The trace goes on: the same trace id.
    assert call.headers["traceparent"].split("-")[1] == first.headers["traceparent"].split("-")[1]


async def test_a_cloudevent_response_passes_through_to_bindings_of_the_function(
    hub: RunningHub, function: FunctionServer
) -> None:
    await hub.function("emitter", function.url("emitter"), onSuccess={"events": True})
    await hub.function("audit", function.url("audit"))
    await hub.function("other", function.url("other"))
    await hub.bind("to-emitter", "emitter")
    await hub.put(
        "bindings",
        "emitted",
        {
            "source": "function:emitter",
            "function": "audit",
            "filter": [{"exact": {"type": "com.example.done"}}],
        },
    )
    function.headers["emitter"] = {
        "ce-specversion": "1.0",
        "ce-id": "done-1",
        "ce-source": "/emitter",
        "ce-type": "com.example.done",
    }
    assert (await hub.post_event("job-1")).status == 202
    [call] = await function.wait_for(1, "audit")
    assert call.ce["id"] == "done-1" and call.ce["type"] == "com.example.done"
    assert call.ce["eventhubcauseid"] == "job-1"
    assert function.calls_to("other") == []


async def test_a_final_failure_sends_the_invocation_record(
    hub: RunningHub, function: FunctionServer
) -> None:
    await hub.function("record", function.url("record"))
    await hub.function(
        "broken",
        function.url("broken"),
        retry={"maxAttempts": 2, "initialDelay": "50ms"},
        onFailure={"function": "record"},
    )
    await hub.bind("to-broken", "broken")
    function.rules["broken"] = lambda call: 503
    assert (await hub.post_event("doomed")).status == 202
    [call] = await function.wait_for(1, "record", wait=30)
    assert call.ce["type"] == "eventhub.function.failure"
    record = json.loads(call.body)
    assert record["function"] == "broken" and record["version"] == "latest"
    assert record["reason"] == "attempts-exhausted" and record["errorCode"] == "http-503"
    assert record["attempts"] == 2
    assert record["event"]["id"] == "doomed"
    [dead] = await hub.wait_dead_letters(1, function="broken")
    assert record["deadLetterId"] == dead["id"]


async def test_a_loop_of_results_stops_at_the_hop_limit_in_a_dead_letter(
    short_chains: RunningHub, function: FunctionServer
) -> None:
    hub = short_chains
    await hub.function("echo", function.url("echo"), onSuccess={"events": True})
    await hub.bind("to-echo", "echo")
    await hub.put("bindings", "loop", {"source": "function:echo", "function": "echo"})
    assert (await hub.post_event("ping")).status == 202
    [dead] = await hub.wait_dead_letters(1, function="echo", reason="hop-limit")
    assert dead["event"]["eventhubhops"] == "4"
    await asyncio.sleep(1.0)
    hops = [c.ce.get("eventhubhops", "0") for c in function.calls_to("echo")]
    assert hops == ["0", "1", "2", "3"]  # max_hops 3: the fourth result goes nowhere


async def test_destinations_are_checked_when_declared(
    hub: RunningHub, function: FunctionServer
) -> None:
    for spec, field in (
        ({"onSuccess": {"function": "missing"}}, "spec.onSuccess.function"),
        ({"onSuccess": {}}, "spec.onSuccess"),
        ({"onFailure": {"function": "a", "events": True}}, "spec.onFailure"),
    ):
        async with hub.http.put(
            f"{hub.base_url}/v1/functions/bad",
            json={"spec": {"url": function.url("bad"), **spec}},
            headers=hub.auth(),
        ) as r:
            problem = await r.json()
            assert r.status == 400, problem
            assert problem["errors"][0]["field"] == field
    await hub.function("real", function.url("real"))
    async with hub.http.put(
        f"{hub.base_url}/v1/bindings/bad",
        json={"spec": {"source": "function:missing", "function": "real"}},
        headers=hub.auth(),
    ) as r:
        assert r.status == 400
        assert (await r.json())["errors"][0]["field"] == "spec.source"
