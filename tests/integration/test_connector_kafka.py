"""Kafka source against a real Kafka-compatible broker (tansu, started for this module) and a
real hub: CloudEvents binding, redelivery after kill -9, dead letters, backpressure, and two hub
processes in one consumer group."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.producer import message_accumulator
from aiokafka.producer import producer as producer_module
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

from connectors.kafka import KafkaConnector
from eventhub.sources import SourceContext
from tests.kafka_broker import BrokerUnavailable, TansuBroker, ce_headers
from tests.kafka_records import RawName
from tests.support import FunctionServer, HubProcess, RunningHub, client

pytestmark = pytest.mark.slow  # starts a broker and hub processes


@pytest.fixture(scope="module")
def kafka() -> Iterator[TansuBroker]:
    broker = TansuBroker()
    try:
        broker.start()
    except BrokerUnavailable as exc:
        message = f"the tansu Kafka broker could not be started: {exc}"
        if os.environ.get("EVENTHUB_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    yield broker
    broker.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def kafka_source(
    api: RunningHub, kafka: TansuBroker, topic: str, function: str, **spec: Any
) -> str:
    name = unique("kafka")
    await api.put(
        "sources",
        name,
        {
            "type": "kafka",
            "bootstrapServers": [kafka.bootstrap],
            "topics": [topic],
            "initialOffset": "earliest",
            **spec,
        },
    )
    await api.bind(unique("b"), function, source=name)
    return name


async def wait_until(check: Callable[[], bool], what: str, wait: float = 20.0) -> None:
    deadline = time.monotonic() + wait
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def wait_ids(function: FunctionServer, path: str, ids: set[str], wait: float) -> Counter[str]:
    def seen() -> Counter[str]:
        return Counter(c.ce["id"] for c in function.calls_to(path))

    await wait_until(lambda: ids <= set(seen()), f"{len(ids)} ids at {path}", wait)
    return seen()


def log_events(process: HubProcess, event: str) -> list[dict[str, Any]]:
    with open(process.log.name, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if f'"{event}"' in line]
    return [json.loads(line) for line in lines]


def runner_of(hub: RunningHub, source: str) -> tuple[SourceContext, KafkaConnector]:
    assert hub.hub is not None
    runner = hub.hub.supervisor.runner(source)
    assert runner is not None
    connector = runner._connector
    assert isinstance(connector, KafkaConnector)
    return runner.ctx, connector


async def test_wrapped_and_passthrough_messages_reach_the_function(
    kafka: TansuBroker, hub: RunningHub, function: FunctionServer
) -> None:
    topic = unique("orders")
    await kafka.create_topic(topic)
    await hub.function("fn", function.url("fn"))
    await kafka_source(hub, kafka, topic, "fn")
    structured = {
        "specversion": "1.0",
        "id": "s-1",
        "source": "/shop",
        "type": "com.example.structured",
        "datacontenttype": "application/json",
        "data": {"n": 3},
    }
    async with kafka.producer() as producer:
        plain = await producer.send_and_wait(
            topic, b'{"n": 1}', key=b"order-1", headers=[("content-type", b"application/json")]
        )
        binary = ce_headers(
            {
                "specversion": "1.0",
                "id": "b-1",
                "source": "/shop",
                "type": "com.example.binary",
                "time": "2024-05-01T10:00:00Z",
            },
            "application/json",
        )
        await producer.send_and_wait(topic, b'{"n": 2}', key=b"order-2", headers=binary)
        await producer.send_and_wait(
            topic,
            json.dumps(structured).encode(),
            headers=[("content-type", b"application/cloudevents+json")],
        )
    calls = {c.ce["id"]: c for c in await function.wait_for(3, "fn")}

    wrapped = calls[f"{topic}/0/0"]
    assert wrapped.body == b'{"n": 1}'
    assert wrapped.headers["content-type"] == "application/json"
    assert wrapped.ce["source"] == f"kafka://{topic}"
    assert wrapped.ce["type"] == "eventhub.kafka.message"
    assert wrapped.ce["subject"] == "order-1"
    assert wrapped.ce["partitionkey"] == "order-1"
    assert (wrapped.ce["topic"], wrapped.ce["partition"], wrapped.ce["offset"]) == (topic, "0", "0")
    sent_at = wrapped.ce["time"]
    assert sent_at.endswith("Z") and sent_at.startswith(time.strftime("%Y", time.gmtime()))
    assert plain.timestamp > 0

    passed = calls["b-1"]
    assert passed.body == b'{"n": 2}'
    assert passed.ce["source"] == "/shop"
    assert passed.ce["type"] == "com.example.binary"
    assert passed.ce["time"] == "2024-05-01T10:00:00Z"
    assert passed.ce["partitionkey"] == "order-2"  # the key, per the Kafka binding
    assert "topic" not in passed.ce  # passed through: no wrapping extensions

    struct = calls["s-1"]
    assert json.loads(struct.body) == {"n": 3}
    assert struct.ce["type"] == "com.example.structured"
    assert "partitionkey" not in struct.ce  # no key


async def test_malformed_message_becomes_a_dead_letter_and_the_next_flows(
    kafka: TansuBroker, hub: RunningHub, function: FunctionServer
) -> None:
    topic = unique("bad")
    await kafka.create_topic(topic)
    await hub.function("fn", function.url("fn"))
    source = await kafka_source(hub, kafka, topic, "fn")
    async with kafka.producer() as producer:
        await producer.send_and_wait(
            topic, b"{not json", headers=[("content-type", b"application/cloudevents+json")]
        )
        missing_id = ce_headers({"specversion": "1.0", "source": "/x", "type": "t"})
        await producer.send_and_wait(topic, b"{}", headers=missing_id)
        await producer.send_and_wait(topic, b"fine", key=b"k")
    calls = await function.wait_for(1, "fn")
    assert calls[0].ce["id"] == f"{topic}/0/2"
    assert calls[0].body == b"fine"
    letters = await hub.wait_dead_letters(2, source=source)
    by_id = {d["event"]["id"]: d for d in letters}
    assert set(by_id) == {f"{topic}/0/0", f"{topic}/0/1"}
    assert {d["errorCode"] for d in letters} == {"invalid-cloudevent"}
    assert by_id[f"{topic}/0/1"]["event"]["offset"] == "1"
    assert "ce_id" in by_id[f"{topic}/0/1"]["errorMessage"]
    assert by_id[f"{topic}/0/0"]["event"]["data_base64"]  # the payload, byte for byte
    # Rejected messages count as done: the group's offset moves past all three.
    group = f"eventhub-{source}"
    await wait_until_committed(kafka, group, topic, [3])


async def test_a_timestamp_in_microseconds_becomes_a_dead_letter_and_the_next_flows(
    kafka: TansuBroker, hub: RunningHub, function: FunctionServer
) -> None:
    topic = unique("micros")
    await kafka.create_topic(topic)
    await hub.function("fn", function.url("fn"))
    source = await kafka_source(hub, kafka, topic, "fn")
    micros = 1_714_564_800_000_000  # 2024-05-01 in microseconds: past the year 9999 as ms
    async with kafka.producer() as producer:
        await producer.send_and_wait(topic, b'{"n": 1}', timestamp_ms=micros)
        await producer.send_and_wait(topic, b'{"n": 2}', timestamp_ms=1_714_564_800_000)
    [call] = await function.wait_for(1, "fn")
    assert call.ce["id"] == f"{topic}/0/1"
    assert call.ce["time"] == "2024-05-01T12:00:00.000Z"
    [letter] = await hub.wait_dead_letters(1, source=source)
    assert letter["event"]["id"] == f"{topic}/0/0"
    assert letter["errorCode"] == "invalid-time"
    assert str(micros) in letter["errorMessage"]
    await wait_until_committed(kafka, group=f"eventhub-{source}", topic=topic, offsets=[2])
    assert len(function.calls_to("fn")) == 1


@pytest.fixture
def raw_header_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Producers of this test build records in Python, so that a :class:`RawName` is written
    as its bytes (the C builder refuses a name that is not UTF-8). Consumers are untouched."""
    monkeypatch.setattr(
        message_accumulator, "DefaultRecordBatchBuilder", _DefaultRecordBatchBuilderPy
    )
    monkeypatch.setattr(producer_module, "DefaultRecordBatchBuilder", _DefaultRecordBatchBuilderPy)


@pytest.mark.usefixtures("raw_header_names")
async def test_a_header_name_that_is_not_utf8_becomes_a_dead_letter_and_the_next_flows(
    kafka: TansuBroker, hub: RunningHub, function: FunctionServer
) -> None:
    topic = unique("rawname")
    await kafka.create_topic(topic)
    await hub.function("fn", function.url("fn"))
    source = await kafka_source(hub, kafka, topic, "fn")
    bad = [(RawName(b"\xff\xfeid"), b"v")]
    good = [("content-type", b"text/plain")]
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, compression_type="gzip")
    await producer.start()
    try:
        # Batches of one record: the bad one alone fails its batch.
        for i, headers in enumerate([good, bad, good]):
            await producer.send_and_wait(topic, f"m{i}".encode(), headers=headers)
        # One batch, compressed: good records before and after the bad one in the same batch.
        batch = producer.create_batch()
        for i, headers in enumerate([good, bad, good], start=3):
            batch.append(key=None, value=f"m{i}".encode(), timestamp=None, headers=headers)
        await (await producer.send_batch(batch, topic, partition=0))
    finally:
        await producer.stop()
    ids = {f"{topic}/0/{i}" for i in (0, 2, 3, 5)}
    seen = await wait_ids(function, "fn", ids, wait=30)
    letters = await hub.wait_dead_letters(2, source=source)
    assert {d["event"]["id"] for d in letters} == {f"{topic}/0/1", f"{topic}/0/4"}
    assert {d["errorCode"] for d in letters} == {"invalid-header"}
    assert all("\\udcff\\udcfeid" in d["errorMessage"] for d in letters), letters
    await wait_until_committed(kafka, group=f"eventhub-{source}", topic=topic, offsets=[6])
    calls = function.calls_to("fn")
    assert seen == Counter(dict.fromkeys(ids, 1)), "each good record exactly once"
    assert sorted(c.body for c in calls) == [b"m0", b"m2", b"m3", b"m5"]


async def wait_until_committed(
    kafka: TansuBroker, group: str, topic: str, offsets: list[int], wait: float = 10.0
) -> None:
    deadline = time.monotonic() + wait
    while (got := await kafka.committed(group, topic, len(offsets))) != offsets:
        assert time.monotonic() < deadline, f"committed {got}, expected {offsets}"
        await asyncio.sleep(0.2)


async def test_burst_above_high_water_mark_pauses_and_resumes_losing_nothing(
    kafka: TansuBroker, hub: RunningHub, function: FunctionServer
) -> None:
    topic = unique("burst")
    await kafka.create_topic(topic, partitions=2)
    function.delays["slow"] = 0.5
    await hub.function("slow", function.url("slow"), maxConcurrency=1)
    source = await kafka_source(hub, kafka, topic, "slow", highWaterMark=5)
    await wait_until(lambda: hub.hub.supervisor.runner(source) is not None, "the source runner")  # type: ignore[union-attr]
    ctx, connector = runner_of(hub, source)
    async with kafka.producer() as producer:
        for i in range(20):
            await producer.send_and_wait(topic, b"first", partition=i % 2)
        await wait_until(lambda: not ctx.room.is_set(), "the source to be throttled")
        for i in range(40):
            await producer.send_and_wait(topic, b"second", partition=i % 2)
    # Each partition took one batch, which waits for room: both are paused, the rest stays in
    # Kafka, and the member keeps its partitions meanwhile.
    await wait_until(lambda: len(connector.paused()) == 2, "both partitions paused")
    await wait_until(lambda: (ctx.lag or 0) > 0, "a lag report")
    assert not ctx.room.is_set()
    assert len(function.calls_to("slow")) < 20
    function.delays["slow"] = 0.01
    ids = {f"{topic}/{p}/{o}" for p in (0, 1) for o in range(30)}
    seen = await wait_ids(function, "slow", ids, wait=30)
    assert seen == Counter(dict.fromkeys(ids, 1)), "each message exactly once"
    await wait_until(lambda: ctx.room.is_set() and not connector.paused(), "resumed")
    await wait_until(lambda: ctx.lag == 0, "lag back to 0", wait=5)


async def test_sigkill_between_receipt_and_enqueue_redelivers_after_restart(
    kafka: TansuBroker, hub_process: Callable[[], HubProcess], function: FunctionServer
) -> None:
    topic = unique("kill")
    await kafka.create_topic(topic)
    first = hub_process()
    await first.ready()
    function.delays["slow"] = 5.0
    async with client(first) as api:
        await api.function("slow", function.url("slow"), maxConcurrency=1, timeout="30s")
        source = await kafka_source(api, kafka, topic, "slow", highWaterMark=1)
    async with kafka.producer() as producer:
        await producer.send_and_wait(topic, b"m0")
        await function.wait_for(1, "slow")  # m0 is in flight: the function is at the mark
        await wait_until(lambda: bool(log_events(first, "source_throttled")), "throttled")
        for i in (1, 2, 3):
            await producer.send_and_wait(topic, f"m{i}".encode())
    # The connector received m1 (and maybe more) and holds it in deliver: not in JetStream.
    await wait_until(lambda: bool(log_events(first, "kafka_waiting_for_room")), "a held batch")
    assert log_events(first, "kafka_waiting_for_room")[0]["offset"] == 1  # m1 onwards
    committed = await kafka.committed(f"eventhub-{source}", topic)
    assert committed[0] is None or committed[0] <= 1, committed  # nothing held is committed
    first.kill()
    function.delays["slow"] = 0
    second = hub_process()
    await second.ready()
    # The group notices the dead member after its session timeout (10 s), then the new one
    # fetches from the committed offset.
    ids = {f"{topic}/0/{i}" for i in range(4)}
    await wait_ids(function, "slow", ids, wait=45)
    await wait_until_committed(kafka, f"eventhub-{source}", topic, [4])


async def test_two_hub_processes_share_the_group_without_duplicate_invocations(
    kafka: TansuBroker, hub_process: Callable[[], HubProcess], function: FunctionServer
) -> None:
    topic = unique("shared")
    await kafka.create_topic(topic, partitions=4)
    one = hub_process()
    await one.ready()
    async with client(one) as api:
        await api.function("fn", function.url("fn"))
        await kafka_source(api, kafka, topic, "fn")

    def assigned(process: HubProcess) -> set[str]:
        events = log_events(process, "kafka_partitions_assigned")
        return set(events[-1]["partitions"]) if events else set()

    async def produce(count: int) -> None:
        async with kafka.producer() as producer:
            for i in range(count):
                await producer.send_and_wait(topic, b"x", key=f"key-{i}".encode())
                await asyncio.sleep(0.04)

    # Messages flow while the second process joins: the group rebalances mid-stream, and what
    # the first had taken but not committed is fetched again by the new owner.
    producing = asyncio.create_task(produce(200))
    await wait_until(lambda: len(assigned(one)) == 4, "the first process owning every partition")
    two = hub_process()
    await two.ready()
    await wait_until(lambda: bool(assigned(two)), "the second process joining", wait=20)
    await producing
    mine, theirs = assigned(one), assigned(two)
    assert not mine & theirs and len(mine | theirs) == 4, (mine, theirs)
    revoked = [e["partitions"] for e in log_events(one, "kafka_partitions_revoked")]
    assert any(len(p) == 4 for p in revoked), revoked  # it did give partitions up
    calls = await function.wait_for(200, "fn", wait=30)
    assert len({c.ce["id"] for c in calls}) == 200
    await asyncio.sleep(1.0)  # a duplicate would be invoked right after the original
    counts = Counter(c.ce["id"] for c in function.calls_to("fn"))
    assert not {i: n for i, n in counts.items() if n > 1}, "an invocation was duplicated"
    assert {c.ce["partition"] for c in calls} == {"0", "1", "2", "3"}
