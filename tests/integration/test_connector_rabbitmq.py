"""The RabbitMQ source against a real broker: the CloudEvents AMQP binding (wrapped, binary and
structured messages), dead letters, backpressure, kill -9 before enqueue, two hubs on one queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.exceptions import ChannelClosed, ChannelInvalidStateError
from pamqp.commands import Basic

from tests.support import FunctionServer, HubProcess, RunningHub, client

pytestmark = pytest.mark.needs("rabbitmq")

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
async def amqp() -> AsyncIterator[Broker]:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=0.5):
            pass
    except OSError:
        if os.environ.get("EVENTHUB_REQUIRE_SERVICES") == "1":
            pytest.fail("RabbitMQ is unreachable on 127.0.0.1:5672")
        pytest.skip("RabbitMQ is unreachable on 127.0.0.1:5672")
    connection = await aio_pika.connect(RABBIT_URL)
    broker = Broker(connection, await connection.channel())
    try:
        yield broker
    finally:
        await broker.cleanup()
        await connection.close()


class Broker:
    """A publishing client with unique queue/exchange names, deleted after the test."""

    def __init__(self, connection: AbstractConnection, channel: AbstractChannel) -> None:
        self.connection = connection
        self.channel = channel
        self.queues: list[str] = []
        self.exchanges: list[str] = []

    def names(self) -> tuple[str, str]:
        suffix = uuid.uuid4().hex[:10]
        self.queues.append(f"eh-test-q-{suffix}")
        self.exchanges.append(f"eh-test-x-{suffix}")
        return self.queues[-1], self.exchanges[-1]

    async def publish(self, exchange: str, routing_key: str, body: bytes, **props: Any) -> None:
        target = await self.channel.get_exchange(exchange) if exchange else None
        message = aio_pika.Message(body, **props)
        if target is None:
            await self.channel.default_exchange.publish(message, routing_key=routing_key)
        else:
            await target.publish(message, routing_key=routing_key)

    async def counts(self, queue: str) -> tuple[int, int]:
        """(ready messages, consumers) of ``queue``."""
        declared = await (await self.channel.get_underlay_channel()).queue_declare(
            queue, passive=True
        )
        return int(declared.message_count or 0), int(declared.consumer_count or 0)

    async def wait_counts(
        self, queue: str, *, ready: int | None = None, consumers: int, wait: float = 15.0
    ) -> None:
        deadline = time.monotonic() + wait
        got: tuple[int, int] = (-1, -1)
        while time.monotonic() < deadline:
            with contextlib.suppress(ChannelClosed, ChannelInvalidStateError):
                got = await self.counts(queue)
                if got[1] == consumers and (ready is None or got[0] == ready):
                    return
            if self.channel.is_closed:  # a passive declare of a missing queue closes it
                self.channel = await self.connection.channel()
            await asyncio.sleep(0.1)
        raise AssertionError(f"{queue}: wanted ready={ready} consumers={consumers}, got {got}")

    async def cleanup(self) -> None:
        channel = await self.connection.channel()
        for queue in self.queues:
            await channel.queue_delete(queue)
        for exchange in self.exchanges:
            await channel.exchange_delete(exchange)


def ce(call: Any) -> dict[str, str]:
    """The call's CloudEvent attributes, percent-decoded (HTTP binary mode encodes them)."""
    return {k: unquote(v) for k, v in call.ce.items()}


def source_spec(queue: str, **extra: Any) -> dict[str, Any]:
    return {"type": "rabbitmq", "url": RABBIT_URL, "queue": queue} | extra


async def metric(base_url: str, series: str) -> float | None:
    """The value of one Prometheus series, e.g. ``eventhub_source_throttled{source="s"}``."""
    async with aiohttp.ClientSession() as http, http.get(f"{base_url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def throttled(source: str) -> str:
    return f'eventhub_source_throttled{{source="{source}"}}'


async def wait_metric(base_url: str, series: str, value: float, wait: float = 10.0) -> None:
    deadline = time.monotonic() + wait
    while (got := await metric(base_url, series)) != value:
        assert time.monotonic() < deadline, f"{series} is {got}, not {value}"
        await asyncio.sleep(0.05)


async def test_wrapped_binary_and_structured_messages_reach_the_function(
    amqp: Broker, hub: RunningHub, function: FunctionServer
) -> None:
    queue, exchange = amqp.names()
    declare = {"exchange": exchange, "routingKeys": ["orders.#"], "durable": False}
    await hub.function("fn", function.url("fn"))
    await hub.put("sources", "orders", source_spec(queue, declare=declare))
    await hub.bind("orders-to-fn", "fn", source="orders")
    await amqp.wait_counts(queue, consumers=1)  # the connector declared, bound and consumes
    stamp = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    await amqp.publish(
        exchange,
        "orders.created",
        b'{"n": 1}',
        content_type="application/json",
        message_id="m-1",
        timestamp=stamp,
        correlation_id="c-1",
        app_id="shop",
        headers={"tenant": "acme", "x-trace": "skipped", "Upper": "skipped", "count": 3},
    )
    await amqp.publish(exchange, "orders.hashed", b"plain text", content_type="text/plain")
    await amqp.publish(
        exchange,
        "orders.binary",
        b'{"n": 3}',
        content_type="application/json",
        headers={
            "cloudEvents_specversion": "1.0",
            "cloudEvents_id": "bin-1",
            "cloudEvents_source": "/shop",
            "cloudEvents_type": "com.example.order.paid",
            "cloudEvents:subject": "order-3",
            "cloudEvents_time": int(stamp.timestamp() * 1000),  # AMQP binding: milliseconds
            "cloudEvents_tenant": "acme",
        },
    )
    structured = {
        "specversion": "1.0",
        "id": "st-1",
        "source": "/shop",
        "type": "com.example.order.shipped",
        "datacontenttype": "application/json",
        "data": {"n": 4},
    }
    await amqp.publish(
        exchange,
        "orders.structured",
        json.dumps(structured).encode(),
        content_type="application/cloudevents+json",
    )
    calls = {ce(c).get("subject", ce(c)["id"]): c for c in await function.wait_for(4, "fn")}
    wrapped, hashed = calls["orders.created"], calls["orders.hashed"]
    binary, shipped = calls["order-3"], calls["st-1"]
    assert ce(wrapped) == {
        "specversion": "1.0",
        "id": "m-1",
        "source": f"amqp://%2F/{queue}",
        "type": "eventhub.rabbitmq.message",
        "subject": "orders.created",
        "time": "2024-05-01T12:00:00Z",
        "exchange": exchange,
        "routingkey": "orders.created",
        "correlationid": "c-1",
        "appid": "shop",
        "tenant": "acme",
        "count": "3",
    }
    assert wrapped.headers["content-type"] == "application/json"
    assert wrapped.body == b'{"n": 1}'
    assert len(ce(hashed)["id"]) == 32  # no message-id: a digest of the message
    assert ce(hashed)["subject"] == "orders.hashed"
    assert hashed.body == b"plain text"
    assert ce(binary) == {
        "specversion": "1.0",
        "id": "bin-1",
        "source": "/shop",
        "type": "com.example.order.paid",
        "subject": "order-3",
        "time": "2024-05-01T12:00:00Z",
        "tenant": "acme",
    }
    assert binary.body == b'{"n": 3}'
    assert ce(shipped)["id"] == "st-1"
    assert ce(shipped)["type"] == "com.example.order.shipped"
    assert json.loads(shipped.body) == {"n": 4}


async def test_malformed_messages_become_dead_letters_and_the_next_flows(
    amqp: Broker, hub: RunningHub, function: FunctionServer
) -> None:
    queue, _ = amqp.names()
    await amqp.channel.declare_queue(queue)  # an existing queue: the source only consumes it
    await hub.function("fn", function.url("fn"))
    await hub.put("sources", "inbox", source_spec(queue, maxMessageSize="1KiB"))
    await hub.bind("inbox-to-fn", "fn", source="inbox")
    await amqp.wait_counts(queue, consumers=1)
    await amqp.publish(
        "", queue, b"{not json", content_type="application/cloudevents+json", message_id="bad-1"
    )
    await amqp.publish(
        "", queue, b"x", headers={"cloudEvents_specversion": "1.0", "cloudEvents_type": "t"}
    )
    await amqp.publish("", queue, b"\xff\xfe", content_type="text/plain; charset=utf-8")
    await amqp.publish("", queue, b"x" * 2048)
    await amqp.publish("", queue, b'{"ok": true}', message_id="good-1")
    [call] = await function.wait_for(1, "fn")
    assert ce(call)["id"] == "good-1"
    letters = await hub.wait_dead_letters(4, source="inbox")
    codes = sorted(d["errorCode"] for d in letters)
    assert codes == ["bad-charset", "invalid-cloudevent", "invalid-cloudevent", "too-large"]
    by_id = {d["event"]["id"]: d for d in letters}
    assert by_id["bad-1"]["event"]["routingkey"] == queue  # transport metadata is kept
    await amqp.wait_counts(queue, ready=0, consumers=1)  # all acked, nothing requeued
    await asyncio.sleep(0.5)
    assert len(function.calls_to("fn")) == 1


class RawProperties(Basic.Properties):  # type: ignore[misc]
    """Properties as any AMQP client may write them: a timestamp as any 64-bit number, headers
    as a field table written byte by byte (aio-pika itself refuses to send these)."""

    def encode_property(self, name: str, value: Any) -> bytes:
        if name == "timestamp" and isinstance(value, int):
            return struct.pack(">Q", value)
        if name == "headers" and isinstance(value, bytes):
            return struct.pack(">I", len(value)) + value
        return super().encode_property(name, value)  # type: ignore[no-any-return]


def field(name: bytes, kind: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + kind + value


async def test_what_the_amqp_codec_cannot_read_becomes_a_dead_letter_and_the_next_flows(
    amqp: Broker, hub: RunningHub, function: FunctionServer
) -> None:
    queue, _ = amqp.names()
    await amqp.channel.declare_queue(queue)
    await hub.function("fn", function.url("fn"))
    await hub.put("sources", "odd", source_spec(queue))
    await hub.bind("odd-to-fn", "fn", source="odd")
    await amqp.wait_counts(queue, consumers=1)
    raw = await amqp.channel.get_underlay_channel()
    odd = {
        "micros": RawProperties(timestamp=1_714_564_800_000_000),  # microseconds
        "header-time": RawProperties(headers=field(b"at", b"T", struct.pack(">Q", 2**63))),
        "header-name": RawProperties(headers=field(b"\xff\xfe", b"t", b"\x01")),
        "decimal": RawProperties(headers=field(b"price", b"D", b"\x02" + struct.pack(">i", 1))),
    }
    for message_id, properties in odd.items():
        properties.message_id = message_id
        await raw.basic_publish(b"{}", routing_key=queue, properties=properties)
    await amqp.publish("", queue, b'{"ok": true}', message_id="good-1")
    calls = {ce(c)["id"]: ce(c) for c in await function.wait_for(2, "fn")}
    assert set(calls) == {"decimal", "good-1"}  # an odd type of header is no error
    assert calls["decimal"]["price"] == "0.01"
    letters = await hub.wait_dead_letters(3, source="odd")
    codes = {d["event"]["id"]: d["errorCode"] for d in letters}
    assert codes == {
        "micros": "invalid-time",
        "header-time": "invalid-header",
        "header-name": "invalid-header",
    }
    await amqp.wait_counts(queue, ready=0, consumers=1)  # all acked: nothing comes back
    assert len(function.calls_to("fn")) == 2


async def test_a_burst_above_the_high_water_mark_pauses_and_resumes_without_loss(
    amqp: Broker, hub: RunningHub, function: FunctionServer
) -> None:
    queue, _ = amqp.names()
    await amqp.channel.declare_queue(queue)
    function.delays["fn"] = 1.0
    await hub.function("fn", function.url("fn"), maxConcurrency=1)
    # heartbeat=1: a pause much longer than the heartbeat timeout must not drop the connection
    spec = source_spec(queue, highWaterMark=5, prefetch=5, url=f"{RABBIT_URL}?heartbeat=1")
    await hub.put("sources", "burst", spec)
    await hub.bind("burst-to-fn", "fn", source="burst")
    await amqp.wait_counts(queue, consumers=1)
    for i in range(10):  # the slow function falls behind the high-water mark ...
        await amqp.publish("", queue, f'{{"i": {i}}}'.encode(), message_id=f"b{i}")
    await wait_metric(hub.base_url, throttled("burst"), 1.0)
    for i in range(10, 110):  # ... so the source pauses: the burst waits in RabbitMQ
        await amqp.publish("", queue, f'{{"i": {i}}}'.encode(), message_id=f"b{i}")
    await asyncio.sleep(3.0)
    ready, _ = await amqp.counts(queue)
    assert ready >= 100 - 5, ready  # at most a prefetch of it is held by the connector
    errors = 'eventhub_source_errors_total{kind="connection",source="burst"}'
    assert not await metric(hub.base_url, errors)  # heartbeats flowed while it was paused
    function.delays["fn"] = 0.0  # the function catches up: the source resumes
    calls = await function.wait_for(110, "fn", wait=30)
    assert sorted(ce(c)["id"] for c in calls) == sorted(f"b{i}" for i in range(110))
    await wait_metric(hub.base_url, throttled("burst"), 0.0)
    await amqp.wait_counts(queue, ready=0, consumers=1)
    assert len(function.calls_to("fn")) == 110  # nothing lost, nothing twice


@pytest.mark.slow
async def test_kill_between_receipt_and_enqueue_then_restart_delivers(
    amqp: Broker, hub_process: Callable[[], HubProcess], function: FunctionServer
) -> None:
    queue, _ = amqp.names()
    await amqp.channel.declare_queue(queue)
    first = hub_process()
    await first.ready()
    function.delays["slow"] = 4.0
    async with client(first) as api:
        await api.function("slow", function.url("slow"), timeout="10s", maxConcurrency=1)
        await api.put("sources", "held", source_spec(queue, highWaterMark=1, prefetch=1))
        await api.bind("held-to-slow", "slow", source="held")
    await amqp.wait_counts(queue, consumers=1, wait=20)
    await amqp.publish("", queue, b"{}", message_id="k0")
    await function.wait_for(1, "slow")  # k0 is in flight: the function is at the high-water mark
    await wait_metric(first.base_url, throttled("held"), 1.0)
    for i in (1, 2, 3):
        await amqp.publish("", queue, b"{}", message_id=f"k{i}")
    # prefetch 1: the connector holds k1 in deliver (received, unacked, not enqueued) ...
    await amqp.wait_counts(queue, ready=2, consumers=1)
    assert len(function.calls_to("slow")) == 1
    first.kill()  # ... and dies with it
    function.delays["slow"] = 0.05
    second = hub_process()
    await second.ready()
    await function.wait_for(5, "slow", wait=30)  # k0 again (after ack_wait), k1..k3 once
    await amqp.wait_counts(queue, ready=0, consumers=1)
    await asyncio.sleep(0.5)
    ids = [ce(c)["id"] for c in function.calls_to("slow")]
    assert sorted(ids) == ["k0", "k0", "k1", "k2", "k3"], ids


@pytest.mark.slow
async def test_two_hub_processes_share_a_queue_without_duplicate_invocations(
    amqp: Broker, hub_process: Callable[[], HubProcess], function: FunctionServer
) -> None:
    queue, _ = amqp.names()
    await amqp.channel.declare_queue(queue)
    one, two = hub_process(), hub_process()
    await asyncio.gather(one.ready(), two.ready())
    function.delays["fn"] = 0.01
    async with client(one) as api:
        await api.function("fn", function.url("fn"), maxConcurrency=20)
        await api.put("sources", "shared", source_spec(queue, prefetch=5))
        await api.bind("shared-to-fn", "fn", source="shared")
    await amqp.wait_counts(queue, consumers=2, wait=20)  # both processes consume the queue
    for i in range(200):
        await amqp.publish("", queue, f'{{"i": {i}}}'.encode(), message_id=f"s{i}")
    await function.wait_for(200, "fn", wait=30)
    await asyncio.sleep(1.0)
    ids = sorted(ce(c)["id"] for c in function.calls_to("fn"))
    assert ids == sorted(f"s{i}" for i in range(200))  # each exactly once
    series = 'eventhub_source_events_total{source="shared"}'
    taken = [await metric(p.base_url, series) for p in (one, two)]
    assert all(n and n > 0 for n in taken), taken  # both took a share
    assert sum(n or 0 for n in taken) == 200


async def test_minio_notifications_over_amqp_with_format_s3(
    hub: RunningHub, function: FunctionServer
) -> None:
    """MinIO can publish its notifications to AMQP: format s3 makes one event per record."""
    import pathlib

    queue = f"s3-{uuid.uuid4().hex[:8]}"
    body = (pathlib.Path(__file__).parents[1] / "data/minio/two-records.json").read_bytes()
    connection = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/")
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, durable=True)  # waits for the source
        await channel.default_exchange.publish(
            aio_pika.Message(body, content_type="application/json"), routing_key=queue
        )
        await hub.function("thumbs", function.url("thumbs"))
        spec = {
            "type": "rabbitmq",
            "url": "amqp://guest:guest@127.0.0.1:5672/",
            "queue": queue,
            "format": "s3",
        }
        await hub.put("sources", "minio-amqp", spec)
        await hub.bind("s3-to-thumbs", "thumbs", source="minio-amqp")
        calls = await function.wait_for(2, "thumbs")
        assert sorted(c.ce["subject"] for c in calls) == ["images/cat.jpg", "images/dog.png"]
        assert {c.ce["type"] for c in calls} == {"io.minio.s3.ObjectCreated.Put"}
        assert {c.ce["source"] for c in calls} == {"s3://uploads"}
        await declared.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()


# The in-order acknowledgement every connector relies on (``SourceContext.deliveries``), with
# the broker out of the picture: deliveries finish in any order, acks leave in start order.


def _context(ordered: bool = False) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(name="contract", ordered=ordered)


def _deliveries(ctx: Any, window: int) -> Any:
    from eventhub.sources import SourceContext

    return SourceContext.deliveries(ctx, window)


async def test_deliveries_are_acked_in_start_order_whatever_order_they_finish() -> None:
    gates = [asyncio.Event() for _ in range(4)]
    acked: list[int] = []

    async def work(i: int) -> None:
        await gates[i].wait()

    def ack(i: int) -> Callable[[], None]:
        return lambda: acked.append(i)

    async with _deliveries(_context(), 4) as deliveries:
        for i in range(4):
            await deliveries.start(work(i), ack(i))
        gates[3].set()
        gates[2].set()
        await asyncio.sleep(0.05)
        assert acked == []  # 2 and 3 are in JetStream, but 0 is not: nothing acknowledged
        gates[0].set()
        await asyncio.sleep(0.05)
        assert acked == [0]
        gates[1].set()
    assert acked == [0, 1, 2, 3]  # leaving the block waits for what is in flight


async def test_a_failed_delivery_stops_every_later_ack_and_is_raised_as_itself() -> None:
    acked: list[int] = []
    later_done = asyncio.Event()

    async def ok() -> None:
        pass

    async def fail() -> None:
        await asyncio.sleep(0.05)
        raise ConnectionError("JetStream is gone")

    async def later() -> None:
        later_done.set()

    def ack(i: int) -> Callable[[], None]:
        return lambda: acked.append(i)

    with pytest.raises(ConnectionError, match="JetStream is gone"):
        async with _deliveries(_context(), 8) as deliveries:
            await deliveries.start(ok(), ack(0))
            await deliveries.start(fail(), ack(1))
            await deliveries.start(later(), ack(2))
            await asyncio.sleep(5)  # cancelled by the failure
    assert later_done.is_set()
    assert acked == [0]  # 2 was delivered, but an earlier one was not: never acknowledged


async def test_deliveries_in_flight_are_bounded_and_ordered_sources_go_one_lane_at_a_time() -> None:
    for ordered, lanes, most in ((False, "ab", 3), (True, "aa", 1), (True, "ab", 2)):
        running, peak = 0, 0

        async def work() -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.02)
            running -= 1

        def ack() -> None:
            pass

        async with _deliveries(_context(ordered), 3) as deliveries:
            for i in range(12):
                await deliveries.start(work(), ack, lane=lanes[i % 2])
        assert peak == most, (ordered, lanes, peak)


async def test_torn_down_deliveries_ack_nothing_after_the_first_unfinished_one() -> None:
    """The connection drops while 0 is in flight and 1 is done: 1 must not be acknowledged (an
    AMQP ``multiple`` ack would cover 0 too); a connector's own cancel only skips its work."""
    acked: list[int] = []
    gate = asyncio.Event()

    async def slow() -> None:
        await gate.wait()

    async def done() -> None:
        pass

    with pytest.raises(ConnectionError):
        async with _deliveries(_context(), 8) as deliveries:
            await deliveries.start(slow(), lambda: acked.append(0))
            await deliveries.start(done(), lambda: acked.append(1))
            await asyncio.sleep(0.05)
            raise ConnectionError("the AMQP channel closed")
    assert acked == []
    async with _deliveries(_context(), 8) as deliveries:
        skipped = await deliveries.start(slow(), lambda: acked.append(2))
        await deliveries.start(done(), lambda: acked.append(3))
        deliveries.cancel(skipped)  # e.g. a revoked Kafka partition
    assert acked == [3]
