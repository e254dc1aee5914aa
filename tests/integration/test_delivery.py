"""End to end through the real PostgreSQL, JetStream and Redis: events in, functions called."""

from __future__ import annotations

import asyncio

from tests.support import FunctionServer, RunningHub


async def test_fan_out_n_to_m(hub: RunningHub, function: FunctionServer) -> None:
    await hub.function("a", function.url("a"))
    await hub.function("b", function.url("b"))
    await hub.bind("all-to-a", "a")
    await hub.bind("orders-to-b", "b", filter=[{"prefix": {"type": "com.example.order."}}])
    await hub.bind(
        "orders-to-a-too", "a", filter=[{"exact": {"type": "com.example.order.created"}}]
    )
    await hub.wait_routed("b")

    response = await hub.post_event("e1", type_="com.example.order.created")
    assert response.status == 202
    response = await hub.post_event("e2", type_="com.example.other")
    assert response.status == 202

    # e1 -> a twice (two bindings) and b; e2 -> a once
    await function.wait_for(3, "a")
    await function.wait_for(1, "b")
    await asyncio.sleep(0.5)  # and nothing more arrives
    ids_a = sorted(c.ce["id"] for c in function.calls_to("a"))
    assert ids_a == ["e1", "e1", "e2"]
    assert [c.ce["id"] for c in function.calls_to("b")] == ["e1"]
    call = function.calls_to("b")[0]
    assert call.ce["type"] == "com.example.order.created"
    assert call.headers["content-type"] == "application/json"
    assert call.body == b'{"n": "e1"}'
    assert call.headers["eventhub-attempt"] == "1"
    assert call.headers["traceparent"].startswith("00-")


async def test_unrouted_events_are_counted(hub: RunningHub, function: FunctionServer) -> None:
    await hub.function("picky-router", function.url("x"))
    await hub.bind("only-a", "picky-router", filter=[{"exact": {"type": "a"}}])
    assert (await hub.post_event("u1", type_="b")).status == 202
    async with hub.http.get(f"{hub.base_url}/metrics") as response:
        text = await response.text()
    assert 'eventhub_events_unrouted_total{source="api"} 1.0' in text


async def test_redelivered_event_is_invoked_once(hub: RunningHub, function: FunctionServer) -> None:
    await hub.function("once", function.url("once"))
    await hub.bind("to-once", "once")
    await hub.wait_routed("once")
    for _ in range(3):  # the producer retries: same source and id
        assert (await hub.post_event("same-id")).status == 202
    await function.wait_for(1, "once")
    await asyncio.sleep(1.0)
    assert len(function.calls_to("once")) == 1


async def test_retry_then_success(hub: RunningHub, function: FunctionServer) -> None:
    function.respond("flaky", 503, 500)
    retry = {"maxAttempts": 5, "initialDelay": "100ms", "maxDelay": "200ms", "jitter": 0}
    await hub.function("flaky", function.url("flaky"), retry=retry)
    await hub.bind("to-flaky", "flaky")
    await hub.wait_routed("flaky")
    async with hub.http.post(
        f"{hub.base_url}/v1/functions/flaky/invocations", data=b"x", headers=hub.auth()
    ) as response:
        assert response.status == 202
        inv_id = (await response.json())["id"]
    calls = await function.wait_for(3, "flaky")
    assert [c.headers["eventhub-attempt"] for c in calls] == ["1", "2", "3"]
    # Backed off through JetStream: the retry is due 100 ms (jitter 0) after the first call's
    # answer came back, in whole milliseconds; load can only make the gap longer.
    assert calls[1].at - calls[0].at >= 0.09
    doc = await hub.wait_status(inv_id, "succeeded")
    assert doc["attempts"] == 3
    assert [a["status"] for a in doc["history"]] == [503, 500, 200]
    assert await hub.dead_letters(function="flaky") == []


async def test_non_retryable_goes_straight_to_dead_letter_with_history(
    hub: RunningHub, function: FunctionServer
) -> None:
    function.respond("picky", 400)
    await hub.function("picky", function.url("picky"), retry={"maxAttempts": 5})
    await hub.bind("to-picky", "picky")
    await hub.wait_routed("picky")
    assert (await hub.post_event("bad-one", subject="s/1")).status == 202
    [letter] = await hub.wait_dead_letters(1, function="picky")
    assert len(function.calls_to("picky")) == 1
    assert letter["reason"] == "non-retryable"
    assert letter["errorCode"] == "http-400"
    assert letter["binding"] == "to-picky"
    assert letter["event"]["id"] == "bad-one"
    assert letter["event"]["subject"] == "s/1"
    assert letter["event"]["data"] == {"n": "bad-one"}
    [attempt] = letter["attempts"]
    assert attempt["status"] == 400
    assert attempt["response"] == "status 400"
    assert attempt["latencyMs"] >= 0
    async with hub.http.get(
        f"{hub.base_url}/v1/dead-letters/{letter['id']}", headers=hub.auth()
    ) as response:
        assert response.status == 200
        assert (await response.json())["id"] == letter["id"]


async def test_exhausted_retries_reach_the_dead_letter_function(
    hub: RunningHub, function: FunctionServer
) -> None:
    function.respond("doomed", 500, 500)
    await hub.function("dlf", function.url("dlf"))
    await hub.function(
        "doomed",
        function.url("doomed"),
        retry={"maxAttempts": 2, "initialDelay": "50ms", "jitter": 0},
        deadLetter={"function": "dlf"},
    )
    await hub.bind("to-doomed", "doomed")
    await hub.wait_routed("doomed")
    assert (await hub.post_event("doomed-1")).status == 202
    [call] = await function.wait_for(1, "dlf")
    assert call.ce["id"] == "doomed-1"  # the original event, unchanged
    assert call.ce["source"] == "/test"
    assert call.body == b'{"n": "doomed-1"}'
    assert call.ce["eventhuberrorcode"] == "http-500"
    assert call.ce["eventhuberrordest"] == function.url("doomed")
    assert call.ce["eventhubattempts"] == "2"
    assert call.ce["eventhubreason"] == "attempts-exhausted"
    [letter] = await hub.dead_letters(function="doomed")
    assert call.ce["eventhubdeadletter"] == letter["id"]
    assert [a["status"] for a in letter["attempts"]] == [500, 500]
    deadline = asyncio.get_running_loop().time() + 10
    while letter["deadLetterFunction"]["status"] != "delivered":
        assert asyncio.get_running_loop().time() < deadline, letter
        await asyncio.sleep(0.1)
        [letter] = await hub.dead_letters(function="doomed")
    assert letter["deadLetterFunction"]["name"] == "dlf"


async def test_timeouts_are_retried_and_max_event_age_ends_in_a_dead_letter(
    hub: RunningHub, function: FunctionServer
) -> None:
    function.delays["sluggish"] = 1.0
    await hub.function(
        "sluggish",
        function.url("sluggish"),
        timeout="200ms",
        maxEventAge="1500ms",
        retry={"maxAttempts": 10, "initialDelay": "300ms", "multiplier": 1, "jitter": 0},
    )
    await hub.bind("to-sluggish", "sluggish")
    assert (await hub.post_event("late")).status == 202
    [letter] = await hub.wait_dead_letters(1, function="sluggish")
    assert letter["reason"] == "event-expired"
    assert letter["errorCode"] == "timeout"
    assert all(a["error"] == "timeout" for a in letter["attempts"])
    assert 2 <= len(letter["attempts"]) < 10  # retried, then stopped by age, not by attempts


async def test_long_function_keeps_its_message_with_in_progress(
    hub: RunningHub, function: FunctionServer
) -> None:
    ack_wait = hub.hub.settings.ack_wait  # type: ignore[union-attr]
    function.delays["long"] = ack_wait * 1.6
    await hub.function("long", function.url("long"), timeout=f"{ack_wait * 4}s")
    await hub.bind("to-long", "long")
    assert (await hub.post_event("marathon")).status == 202
    await function.wait_for(1, "long")
    await asyncio.sleep(ack_wait * 2)
    assert len(function.calls_to("long")) == 1  # not redelivered while it ran


async def test_metrics_count_events_outcomes_and_dead_letters(
    hub: RunningHub, function: FunctionServer
) -> None:
    function.respond("m", 200, 404)
    await hub.function("m", function.url("m"))
    await hub.bind("to-m", "m")
    await hub.post_event("m1")
    await function.wait_for(1, "m")
    await hub.post_event("m2")
    await hub.wait_dead_letters(1, function="m")
    await asyncio.sleep(0.2)
    async with hub.http.get(f"{hub.base_url}/metrics") as response:
        text = await response.text()
    assert 'eventhub_events_in_total{source="api"} 2.0' in text
    for outcome in ("succeeded", "dead_lettered"):
        labels = f'function="m",outcome="{outcome}",version="latest"'
        assert f"eventhub_invocations_total{{{labels}}} 1.0" in text
    assert 'eventhub_dead_letters_total{function="m",reason="non-retryable"} 1.0' in text
    assert 'eventhub_invocation_duration_seconds_count{function="m",version="latest"} 2.0' in text
    assert 'eventhub_events_unrouted_total{source="api"}' not in text


async def test_trace_context_reaches_the_function(
    hub: RunningHub, function: FunctionServer
) -> None:
    await hub.function("traced", function.url("traced"))
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with hub.http.post(
        f"{hub.base_url}/v1/functions/traced/invocations",
        headers={**hub.auth(), "traceparent": parent, "tracestate": "vendor=x"},
    ) as response:
        assert response.status == 202
    [call] = await function.wait_for(1, "traced")
    assert call.headers["traceparent"] == parent
    assert call.headers["tracestate"] == "vendor=x"
