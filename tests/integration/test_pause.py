"""Pausing and resuming bindings and sources loses nothing; source status is visible."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pytest

from tests.support import FunctionServer, RunningHub

AMQP = "amqp://guest:guest@127.0.0.1:5672/"


async def test_a_paused_binding_holds_its_invocations_until_resumed(
    hub: RunningHub, function: FunctionServer
) -> None:
    await hub.function("held", function.url("held"))
    await hub.function("free", function.url("free"))
    await hub.bind("to-held", "held")
    await hub.bind("to-free", "free")
    async with hub.http.post(f"{hub.base_url}/v1/bindings/to-held/pause", headers=hub.auth()) as r:
        assert r.status == 200
        assert (await r.json())["status"] == {"paused": True}
    for i in range(5):
        assert (await hub.post_event(f"p{i}")).status == 202
    await function.wait_for(5, "free")  # the other binding is not affected
    await asyncio.sleep(1.0)
    assert function.calls_to("held") == []
    async with hub.http.post(f"{hub.base_url}/v1/bindings/to-held/resume", headers=hub.auth()) as r:
        assert r.status == 200
    calls = await function.wait_for(5, "held", wait=20)
    await asyncio.sleep(1.0)
    assert sorted(c.ce["id"] for c in function.calls_to("held")) == [f"p{i}" for i in range(5)]
    assert len(calls) == 5


@pytest.mark.needs("rabbitmq")
async def test_a_paused_source_keeps_messages_in_its_transport(
    hub: RunningHub, function: FunctionServer
) -> None:
    queue = f"pause-{uuid.uuid4().hex[:8]}"
    await hub.function("amqp-fn", function.url("amqp-fn"))
    await hub.put(
        "sources",
        "amqp-src",
        {
            "type": "rabbitmq",
            "url": AMQP,
            "queue": queue,
            "declare": {"exchange": queue, "routingKeys": ["#"]},
        },
    )
    await hub.bind("amqp-to-fn", "amqp-fn", source="amqp-src")
    status = await _wait_state(hub, "amqp-src", "running")
    assert status["type"] == "rabbitmq" and status["processes"][0]["state"] == "running"

    connection = await aio_pika.connect(AMQP)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(queue)
        await exchange.publish(aio_pika.Message(b"before", message_id="m0"), routing_key="k")
        await function.wait_for(1, "amqp-fn")
        async with hub.http.post(
            f"{hub.base_url}/v1/sources/amqp-src/pause", headers=hub.auth()
        ) as r:
            assert r.status == 200
        await _wait_state(hub, "amqp-src", "paused")
        for i in range(1, 4):
            await exchange.publish(aio_pika.Message(b"while", message_id=f"m{i}"), routing_key="k")
        await asyncio.sleep(1.0)
        assert len(function.calls_to("amqp-fn")) == 1  # nothing taken while paused
        async with hub.http.post(
            f"{hub.base_url}/v1/sources/amqp-src/resume", headers=hub.auth()
        ) as r:
            assert r.status == 200
        calls = await function.wait_for(4, "amqp-fn")
        assert sorted(c.ce["id"] for c in calls) == ["m0", "m1", "m2", "m3"]
        await channel.queue_delete(queue)
        await channel.exchange_delete(queue)
    finally:
        await connection.close()


async def _wait_state(hub: RunningHub, source: str, state: str) -> dict[str, object]:
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        async with hub.http.get(
            f"{hub.base_url}/v1/sources/{source}/status", headers=hub.auth()
        ) as r:
            body: dict[str, object] = await r.json()
        if body["state"] == state:
            return body
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.2)
