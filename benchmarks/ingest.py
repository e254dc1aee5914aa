"""Connector benchmark: how fast each source connector moves messages into JetStream, against
the same client library consuming the same messages on its own, measured in one run.

Run by hand (needs NATS with JetStream, PostgreSQL, Redis and the brokers; Kafka is a ``tansu``
broker started here by ``tests/kafka_broker.py``, skipped with the reason when it cannot be)::

    python benchmarks/ingest.py [--messages N] [--only rabbitmq,mqtt,kafka] [--json PATH]

For each connector, N messages of ~10 bytes, each unique (the connectors' ids are digests of
the content when the transport has none, and JetStream would deduplicate identical ones):

raw       the connector's client library alone consumes them with acknowledgement, and does
          nothing else with them. RabbitMQ (aio-pika): prefetch 100 and manual acks, one
          ``basic.ack multiple`` every 50 messages (the connector acks each batch the same way).
          MQTT (gmqtt): QoS 1, MQTT 5, receive maximum 100, the PUBACK sent when the async
          handler returns (as the connector). Kafka (aiokafka): a consumer group member, auto
          commit off, polls of up to 500 records, a commit after each poll, one partition.
          Timed from connecting until the last message is acknowledged.
eventhub  ``python -m eventhub run --role api --role ingest`` in a child process, in a fresh
          namespace: no dispatcher, so the invocations stay in JetStream. A Function (never
          called), then the Source (``highWaterMark`` above N) and a Binding. Timed from the
          Source's creation until the stream holds N invocations for the function (polled
          every 10 ms with ``stream_info(subjects_filter=...)``).

RabbitMQ and Kafka messages are published before the timing starts, to a fresh queue or topic
for each measurement. MQTT messages cannot wait for a consumer: Mosquitto keeps at most
``max_queued_messages`` (1000 by default, not raised in /etc/mosquitto) per client beyond those
in flight, and drops the rest, for an offline session and a slow online one alike. So MQTT
messages are published live, by this process, while the consumer runs, never more than
``--mqtt-window`` (700) ahead of what the consumer has taken. What "taken" means here is what
the stream holds, as last polled (hence the 10 ms: polled every 50 ms, the stale count alone
held the hub at 13,000 msg/s, whatever it could do). A consumer that pipelines its
acknowledgements (the hub) acknowledges a few hundred messages after they are stored;
Mosquitto 2.0 counts every unacknowledged one against the limit (it was seen sending the hub's
persistent session more than the receive maximum), so a window of 900 (or the hub's 4 batches
in flight raised to 8) made it drop messages now and then and the run stall. The raw
MQTT consumer runs in a child process, like the hub, so that it does not share this process's
event loop with the publisher; and the hub's client id gets a persistent session subscribed to
the topic beforehand, so that publishing starts when the Source is created and its timing is
the same as for the other connectors. The publisher caps what can be measured: when the raw
MQTT rate comes close to the ``publisher alone`` rate printed before it, the raw rate is an
underestimate.

The Source and its Binding are created together in one transaction, as ``eventhub apply``
does (``ResourceStore.apply``), not by two PUTs: a Binding must name an existing Source, and a
Source created alone starts at once, so it would take messages before the Binding exists and
drop them as unrouted.

Also measured first: JetStream alone, N messages published with PubAck, 100 in flight, to a
stream configured like the hub's: a ceiling for the hub, which stores every message so.

Reading the results: absolute numbers on a shared, noisy machine mean little; the ratio
eventhub/raw, measured minutes apart on the same machine, is what to compare. ``start``: seconds
to the first message (connecting, a consumer group join, the hub's reload of its resources);
``steady``: the rate from then on. Everything created (queues, topics, MQTT sessions, JetStream
streams, the PostgreSQL schema, the Redis keys ``<namespace>:*``) is removed at the end and the
child processes are stopped, also on Ctrl-C or an error. ``--profile DIR`` attaches ``py-spy``
to each hub while it ingests and prints where its time went.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import json
import os
import shutil
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aio_pika
import gmqtt  # type: ignore[import-untyped]
import nats
from aiokafka import AIOKafkaConsumer
from gmqtt.mqtt.constants import MQTTv50  # type: ignore[import-untyped]
from gmqtt.storage import PersistentStorage  # type: ignore[import-untyped]
from nats.js.client import JetStreamContext

ROOT = Path(__file__).resolve().parent.parent
# The project first (the package ``connectors``, not this file; ``tests.kafka_broker``), then
# this folder (``pipeline``, whose helpers are reused).
sys.path[:0] = [str(ROOT)]

import pipeline  # noqa: E402

from eventhub import db  # noqa: E402
from eventhub.resources import parse_resource  # noqa: E402
from eventhub.store import ResourceStore  # noqa: E402

CONNECTORS = ("rabbitmq", "mqtt", "kafka")
SCRIPT = os.path.abspath(__file__)
POLL = 0.01  # how often the stream is looked at (the MQTT publisher's window moves with it)
STALL = 60.0  # give up after this long without progress
PREFETCH = 100  # RabbitMQSpec.prefetch's default, for both
AMQP_ACK_EVERY = PREFETCH // 2
MQTT_RECEIVE_MAXIMUM = 100  # as connectors.mqtt
MQTT_PUBLISH_IN_FLIGHT = 16  # Mosquitto grants a publisher 20 unacknowledged (receive maximum)
MQTT_REPORT_EVERY = 100  # the raw MQTT child prints its count this often
KAFKA_POLL_RECORDS = 500  # as connectors.kafka
JETSTREAM_IN_FLIGHT = 100  # the connectors deliver batches of up to 100 events


def payload(i: int) -> bytes:
    return b'{"n":%d}' % i


# ---------------------------------------------------------------------------------------------
# Progress and results


class Stalled(RuntimeError):
    pass


class Progress:
    """A count that grows towards ``target``, with when it started growing and when it got there."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.first: float | None = None  # when the count was first seen above 0
        self.first_count = 0
        self.end: float | None = None
        self.done = asyncio.Event()
        self._tick = asyncio.Event()

    def update(self, count: int) -> None:
        if count <= self.count:
            return
        now = time.monotonic()
        if self.first is None:
            self.first, self.first_count = now, count
        self.count = count
        if count >= self.target and self.end is None:
            self.end = now
            self.done.set()
        self._tick.set()
        self._tick = asyncio.Event()

    async def changed(self) -> None:
        await self._tick.wait()

    async def wait(self, stall: float = STALL) -> None:
        """Until done; raises :class:`Stalled` after ``stall`` seconds without a change."""
        while not self.done.is_set():
            try:
                async with asyncio.timeout(stall):
                    await self.changed()
            except TimeoutError:
                raise Stalled(
                    f"{self.count} of {self.target} after {stall:g} s without progress"
                ) from None

    def timing(self, start: float) -> Timing:
        assert self.first is not None and self.end is not None
        steady = None
        if self.end > self.first:
            steady = (self.target - self.first_count) / (self.end - self.first)
        return Timing(
            rate=self.target / (self.end - start), start_s=self.first - start, steady=steady
        )


@dataclass(frozen=True)
class Timing:
    rate: float  # messages/s, from the start to the last message
    start_s: float  # seconds until the first message
    steady: float | None  # messages/s after the first


@dataclass
class Result:
    connector: str
    messages: int
    raw: Timing | None = None
    eventhub: Timing | None = None
    skipped: str | None = None
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.raw is None or self.eventhub is None:
            return None
        return self.eventhub.rate / self.raw.rate

    @property
    def steady_ratio(self) -> float | None:
        raw, hub = self.raw, self.eventhub
        if raw is None or hub is None or raw.steady is None or hub.steady is None:
            return None
        return hub.steady / raw.steady


# ---------------------------------------------------------------------------------------------
# The connectors' brokers


class Bench(Protocol):
    """One connector's broker: the raw consumer, and what the hub's Source needs."""

    name: str

    async def start(self) -> None:
        """Raise :class:`Unavailable` (a reason to skip) or any error."""

    async def raw(self, n: int) -> Timing: ...

    async def prepare(self, n: int) -> dict[str, Any]:
        """Make the messages available to the hub's Source; returns the Source's spec."""
        ...

    async def feed(self, n: int, progress: Progress) -> None:
        """While the hub runs: publish what was not published beforehand."""

    async def close(self) -> None: ...


class Unavailable(RuntimeError):
    pass


class RabbitMQ:
    name = "rabbitmq"

    def __init__(self, args: argparse.Namespace, namespace: str) -> None:
        self.url = args.amqp_url
        self.queues = {k: f"{namespace}.{k}" for k in ("raw", "hub")}
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(self.url)

    async def _publish(self, queue: str, n: int) -> None:
        assert self._connection is not None
        async with self._connection.channel(publisher_confirms=True) as channel:
            await channel.declare_queue(queue, durable=True)
            todo = iter(range(n))

            async def worker() -> None:
                for i in todo:
                    message = aio_pika.Message(
                        payload(i),
                        content_type="application/json",
                        message_id=f"m-{i}",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    )
                    await channel.default_exchange.publish(message, routing_key=queue)

            await asyncio.gather(*(worker() for _ in range(64)))

    async def raw(self, n: int) -> Timing:
        await self._publish(self.queues["raw"], n)
        progress = Progress(n)
        start = time.monotonic()
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=PREFETCH)
            queue = await channel.declare_queue(self.queues["raw"], passive=True)
            async with queue.iterator(timeout=STALL) as messages:
                async for message in messages:
                    progress.update(progress.count + 1)
                    if progress.count % AMQP_ACK_EVERY == 0 or progress.done.is_set():
                        await message.ack(multiple=True)
                    if progress.done.is_set():
                        break
        return progress.timing(start)

    async def prepare(self, n: int) -> dict[str, Any]:
        await self._publish(self.queues["hub"], n)
        return {"type": "rabbitmq", "url": self.url, "queue": self.queues["hub"]}

    async def feed(self, n: int, progress: Progress) -> None:
        pass

    async def close(self) -> None:
        if self._connection is None:
            return
        with pipeline._warn("RabbitMQ queues"):
            async with self._connection.channel() as channel:
                for queue in self.queues.values():
                    await channel.queue_delete(queue)
        await self._connection.close()


class MQTT:
    name = "mqtt"

    def __init__(self, args: argparse.Namespace, namespace: str) -> None:
        self.host, self.port, self.window = args.mqtt_host, args.mqtt_port, args.mqtt_window
        self.topic = f"bench/{namespace}/mqtt"
        self.ids = {k: f"{namespace}-{k}" for k in ("raw", "hub", "pub")}
        self._consumer: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        async with self._publisher() as publish:
            rate = await self._publish_alone(publish)
        print(f"[mqtt] publisher alone, no subscriber: {rate:,.0f} msg/s")

    @contextlib.asynccontextmanager
    async def _publisher(self) -> AsyncIterator[Callable[[bytes], Awaitable[None]]]:
        client, window = await mqtt_publisher(self.ids["pub"], self.host, self.port)
        try:

            async def publish(data: bytes) -> None:
                await window.room()
                client.publish(self.topic, data, qos=1)

            yield publish
            async with asyncio.timeout(30):
                await window.wait_empty()
        finally:
            await client.disconnect()

    async def _publish_alone(self, publish: Callable[[bytes], Awaitable[None]]) -> float:
        n, start = 5000, time.monotonic()
        for i in range(n):
            await publish(payload(i))
        return n / (time.monotonic() - start)

    async def _publish_live(self, n: int, progress: Progress) -> None:
        """Publish n messages, never more than the window ahead of what was consumed."""
        async with self._publisher() as publish:
            for i in range(n):
                while i - progress.count >= self.window:
                    await progress.changed()
                await publish(payload(i))

    async def raw(self, n: int) -> Timing:
        argv = [sys.executable, SCRIPT, "--mqtt-consume", self.ids["raw"], self.topic, str(n)]
        argv += ["--mqtt-host", self.host, "--mqtt-port", str(self.port)]
        self._consumer = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, start_new_session=True
        )
        stdout = self._consumer.stdout
        assert stdout is not None
        try:
            async with asyncio.timeout(30):
                ready = await stdout.readline()
            if ready.strip() != b"ready":
                raise RuntimeError(f"the raw MQTT consumer did not start: {ready!r}")
            progress = Progress(n)

            async def read_counts() -> None:
                async for line in stdout:
                    progress.update(int(line))
                if not progress.done.is_set():
                    raise RuntimeError(f"the raw MQTT consumer exited after {progress.count}")

            start = time.monotonic()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(read_counts())
                tasks.create_task(self._publish_live(n, progress))
                await progress.wait()
            return progress.timing(start)
        finally:
            await self._stop_consumer()

    async def _stop_consumer(self) -> None:
        process, self._consumer = self._consumer, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            if process.returncode is None:
                process.terminate()
        try:
            async with asyncio.timeout(5):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()

    async def prepare(self, n: int) -> dict[str, Any]:
        """The hub's persistent session, subscribed: what is published from now on waits."""
        client = await mqtt_client(self.ids["hub"], self.host, self.port, clean=False)
        try:
            await mqtt_subscribe(client, self.topic)
        finally:
            await client.disconnect()
        return {
            "type": "mqtt",
            "host": self.host,
            "port": self.port,
            "topics": [self.topic],
            "clientId": self.ids["hub"],
        }

    async def feed(self, n: int, progress: Progress) -> None:
        await self._publish_live(n, progress)

    async def close(self) -> None:
        await self._stop_consumer()
        with pipeline._warn("MQTT sessions"):
            for client_id in self.ids.values():  # a clean start discards the session
                client = await mqtt_client(client_id, self.host, self.port, clean=True)
                await client.disconnect()


class Kafka:
    name = "kafka"

    def __init__(self, args: argparse.Namespace, namespace: str) -> None:
        self.namespace = namespace
        self.topics = {k: f"{namespace}-{k}" for k in ("raw", "hub")}
        self.broker: Any = None

    async def start(self) -> None:
        try:
            from tests.kafka_broker import BrokerUnavailable, TansuBroker
        except ImportError as exc:
            raise Unavailable(f"tests/kafka_broker.py cannot be imported: {exc}") from exc
        broker = TansuBroker()
        try:
            await asyncio.to_thread(broker.start)
        except (BrokerUnavailable, OSError) as exc:
            raise Unavailable(f"the tansu broker did not start: {exc}") from exc
        self.broker = broker
        print(f"[kafka] tansu broker at {broker.bootstrap}")

    async def _publish(self, topic: str, n: int) -> None:
        await self.broker.create_topic(topic)
        async with self.broker.producer() as producer:
            sent = [await producer.send(topic, payload(i)) for i in range(n)]
            await producer.flush()
        for future in sent:
            future.result()  # raises what the broker refused

    async def raw(self, n: int) -> Timing:
        await self._publish(self.topics["raw"], n)
        progress = Progress(n)
        start = time.monotonic()
        consumer = AIOKafkaConsumer(
            self.topics["raw"],
            bootstrap_servers=self.broker.bootstrap,
            group_id=f"{self.namespace}-raw",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=KAFKA_POLL_RECORDS,
        )
        await consumer.start()
        try:
            last = start
            while not progress.done.is_set():
                batches = await consumer.getmany(timeout_ms=500)
                if batches:
                    await consumer.commit()
                    progress.update(progress.count + sum(len(b) for b in batches.values()))
                    last = time.monotonic()
                elif time.monotonic() - last > STALL:
                    raise Stalled(f"{progress.count} of {n} after {STALL:g} s without progress")
        finally:
            await consumer.stop()
        return progress.timing(start)

    async def prepare(self, n: int) -> dict[str, Any]:
        await self._publish(self.topics["hub"], n)
        return {
            "type": "kafka",
            "bootstrapServers": [self.broker.bootstrap],
            "topics": [self.topics["hub"]],
            "initialOffset": "earliest",
        }

    async def feed(self, n: int, progress: Progress) -> None:
        pass

    async def close(self) -> None:
        if self.broker is not None:  # in-memory storage: the topics go with it
            await asyncio.to_thread(self.broker.stop)


BENCHES: dict[str, Callable[[argparse.Namespace, str], Bench]] = {
    "rabbitmq": RabbitMQ,
    "mqtt": MQTT,
    "kafka": Kafka,
}

# ---------------------------------------------------------------------------------------------
# MQTT clients (gmqtt is untyped)


async def mqtt_client(client_id: str, host: str, port: int, *, clean: bool, **kw: Any) -> Any:
    """An MQTT 5 client: ``clean`` discards any session of ``client_id`` and keeps none;
    otherwise the session is kept an hour, as the connector's default ``sessionExpiry``."""
    expiry = 0 if clean else 3600
    client = gmqtt.Client(
        client_id,
        clean_session=clean,
        session_expiry_interval=expiry,
        receive_maximum=MQTT_RECEIVE_MAXIMUM,
        **kw,
    )
    async with asyncio.timeout(15):
        await client.connect(host, port, keepalive=30, version=MQTTv50)
    return client


async def mqtt_subscribe(client: Any, topic: str) -> None:
    granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_subscribe(*_: Any) -> None:
        if not granted.done():
            granted.set_result(None)

    client.on_subscribe = on_subscribe
    client.subscribe(gmqtt.Subscription(topic, qos=1))
    async with asyncio.timeout(15):
        await granted


class _Window:
    """A publisher's unacknowledged QoS 1 messages (gmqtt's storage of them), bounded."""

    def __init__(self) -> None:
        self.freed = asyncio.Event()
        self.storage = _Storage(self.freed)

    async def room(self) -> None:
        while len(self.storage.get_all()) >= MQTT_PUBLISH_IN_FLIGHT:
            self.freed.clear()
            await self.freed.wait()

    async def wait_empty(self) -> None:
        await self.storage.wait_empty()


class _Storage(PersistentStorage):  # type: ignore[misc]
    """gmqtt's storage, telling when a PUBACK freed a place."""

    def __init__(self, freed: asyncio.Event) -> None:
        super().__init__()
        self._freed = freed

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        self._freed.set()


async def mqtt_publisher(client_id: str, host: str, port: int) -> tuple[Any, _Window]:
    window = _Window()
    client = await mqtt_client(client_id, host, port, clean=True, persistent_storage=window.storage)
    return client, window


async def mqtt_consume(args: argparse.Namespace) -> None:
    """The raw MQTT consumer (a child process): prints ``ready`` once subscribed, then its
    count every ``MQTT_REPORT_EVERY`` messages, and exits after the last."""
    client_id, topic, n = args.mqtt_consume[0], args.mqtt_consume[1], int(args.mqtt_consume[2])
    done = asyncio.Event()
    got = 0

    async def on_message(*_: Any) -> int:
        nonlocal got
        got += 1
        if got % MQTT_REPORT_EVERY == 0 or got >= n:
            print(got, flush=True)
            if got >= n:
                done.set()
        return 0  # PUBACK: success

    client = await mqtt_client(
        client_id, args.mqtt_host, args.mqtt_port, clean=True, optimistic_acknowledgement=False
    )
    client.on_message = on_message
    await mqtt_subscribe(client, topic)
    print("ready", flush=True)
    await done.wait()
    await asyncio.sleep(0.1)  # the last PUBACK leaves when the handler's task is done
    await client.disconnect()


# ---------------------------------------------------------------------------------------------
# The hub


@dataclass
class Hub:
    run: pipeline.Run
    connector: str

    @property
    def names(self) -> dict[str, str]:
        return {k: f"{k}-{self.connector}" for k in ("fn", "src", "bind")}

    async def measure(self, bench: Bench, n: int) -> Timing:
        spec = await bench.prepare(n) | {"highWaterMark": 2 * n}
        child, base = await self._start()
        args, names = self.run.args, self.names
        await pipeline.declare(base, self.run.token, "functions", names["fn"], {"url": NEVER})
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(child.stop)
            nc = await nats.connect(args.nats_url, name="bench-connectors")
            stack.push_async_callback(nc.close)
            pool = await db.connect(args.database_url, self.run.namespace, max_size=1)
            stack.push_async_callback(pool.close)
            store = ResourceStore(pool, self.run.namespace)
            # The next hub must not start these again (the namespace is shared).
            stack.push_async_callback(store.apply, [], apply_set="bench", prune=True)
            profile = self.run.profiler(child)
            if profile is not None:
                profile.start()
                stack.callback(profile.stop)
            progress = Progress(n)
            start = time.monotonic()
            await store.apply(self._resources(spec), apply_set="bench")
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(watch_stream(nc.jetstream(), self.run.namespace, names, progress))
                tasks.create_task(bench.feed(n, progress))
                await progress.wait()
            return progress.timing(start)
        raise AssertionError("unreachable")

    async def _start(self) -> tuple[pipeline.Child, str]:
        port = pipeline.free_port()
        env = pipeline.hub_env(self.run, port)
        argv = [sys.executable, "-m", "eventhub", "run", "--role", "api", "--role", "ingest"]
        child = self.run.child(f"hub-{self.connector}", argv, env)
        base = f"http://127.0.0.1:{port}"
        await child.ready(f"{base}/readyz")
        return child, base

    def _resources(self, spec: dict[str, Any]) -> list[Any]:
        names = self.names
        docs = [
            ("Source", names["src"], spec),
            ("Binding", names["bind"], {"source": names["src"], "function": names["fn"]}),
        ]
        return [
            parse_resource(
                {"apiVersion": "eventhub/v1", "kind": kind, "metadata": {"name": name}, "spec": s}
            )
            for kind, name, s in docs
        ]


NEVER = "http://127.0.0.1:9/never-called"


async def watch_stream(
    js: JetStreamContext, namespace: str, names: dict[str, str], progress: Progress
) -> None:
    stream, subject = f"{namespace.upper()}_INVOCATIONS", f"{namespace}.invoke.{names['fn']}"
    while not progress.done.is_set():
        info = await js.stream_info(stream, subjects_filter=subject)
        progress.update((info.state.subjects or {}).get(subject, 0))
        if not progress.done.is_set():
            await asyncio.sleep(POLL)


# ---------------------------------------------------------------------------------------------
# The run


def unavailable_connector(name: str) -> str | None:
    """Why the hub could not run this connector here, or None."""
    try:
        importlib.import_module(f"connectors.{name}")
    except Exception as exc:
        return f"connectors/{name}.py cannot be imported: {exc!r}"
    return None


async def one(run: pipeline.Run, name: str) -> Result:
    n = run.args.messages
    result = Result(name, n)
    result.skipped = unavailable_connector(name)
    if result.skipped:
        return result
    bench = BENCHES[name](run.args, run.namespace)
    try:
        await bench.start()
        print(f"[{name}] raw: {n} messages")
        result.raw = await bench.raw(n)
        print(f"[{name}] eventhub: {n} messages")
        result.eventhub = await Hub(run, name).measure(bench, n)
    except Unavailable as exc:
        result.skipped = str(exc)
    except Exception as exc:
        result.error = describe(exc)
        traceback.print_exc()
    finally:
        await bench.close()
    return result


def describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


async def jetstream_alone(args: argparse.Namespace, namespace: str, n: int) -> float:
    """What the hub's publishing costs at least: n messages published with PubAck, 100 in
    flight (a connector's batch), to a stream configured like the hub's."""
    nc = await nats.connect(args.nats_url, name="bench-connectors")
    try:
        js = nc.jetstream(timeout=10.0)
        stream, subject = pipeline.raw_stream(namespace)
        await js.add_stream(pipeline.work_queue(stream, subject))
        publish = pipeline.publish_n(js, subject, n, JETSTREAM_IN_FLIGHT)
        row = await pipeline.timed("jetstream publish", n, publish)
        await js.delete_stream(stream)
    finally:
        await nc.close()
    assert row.rate is not None
    return row.rate


async def benchmark(args: argparse.Namespace) -> tuple[list[Result], float]:
    pipeline.cancel_on_signals()
    run = pipeline.Run(args, f"bench{uuid.uuid4().hex[:10]}", uuid.uuid4().hex, NEVER)
    print(f"namespace {run.namespace}, {args.messages} messages per measurement")
    try:
        jetstream = await jetstream_alone(args, run.namespace, args.messages)
        print(f"[jetstream] publish alone: {jetstream:,.0f} msg/s")
        return [await one(run, name) for name in args.only], jetstream
    finally:
        await pipeline.clean_up(run)


# ---------------------------------------------------------------------------------------------
# Report

HEAD = (
    "connector",
    "messages",
    "raw msg/s",
    "eventhub msg/s",
    "ratio",
    "raw start s",
    "hub start s",
    "raw steady",
    "hub steady",
    "steady ratio",
)


def cells(r: Result) -> list[str]:
    def of(timing: Timing | None, name: str, digits: int = 0) -> str:
        return pipeline.fmt(None if timing is None else getattr(timing, name), digits)

    return [
        r.connector,
        str(r.messages),
        of(r.raw, "rate"),
        of(r.eventhub, "rate"),
        pipeline.fmt(r.ratio, 3),
        of(r.raw, "start_s", 2),
        of(r.eventhub, "start_s", 2),
        of(r.raw, "steady"),
        of(r.eventhub, "steady"),
        pipeline.fmt(r.steady_ratio, 3),
    ]


def report(args: argparse.Namespace, results: list[Result], jetstream: float) -> None:
    lines = [list(HEAD), *(cells(r) for r in results)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEAD))]
    print()
    for line in lines:
        _, *rest = (c.rjust(w) for c, w in zip(line, widths, strict=True))
        print("  ".join([line[0].ljust(widths[0]), *rest]))
    for r in results:
        if r.skipped:
            print(f"{r.connector}: skipped, {r.skipped}")
        elif r.error:
            print(f"{r.connector}: failed, {r.error}")
    alone = f"PubAck, {JETSTREAM_IN_FLIGHT} in flight"
    print(f"\njetstream publish alone ({alone}): {jetstream:,.0f} msg/s, the hub's ceiling")
    for r in results:
        share = ceiling_share(r, jetstream)
        if share is not None:
            print(f"  {r.connector}: eventhub steady / ceiling = {share:.3f}")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\n(msg/s: from connecting (raw) / from the Source's creation (eventhub) to the last"
        f"\n message; start: seconds to the first; steady: msg/s after it. The machine is shared"
        f"\n and noisy ({os.cpu_count()} CPUs, load {load}): compare the ratios, not the rates.)"
    )
    if args.profile:
        for path in sorted(Path(args.profile).glob("*.collapsed")):
            pipeline.summarize_profile(path)
    if args.json:
        doc = {
            "settings": {"messages": args.messages, "mqttWindow": args.mqtt_window}
            | {"cpus": os.cpu_count(), "load": os.getloadavg()},
            "jetstreamPublishAlone": jetstream,
            "results": [
                dataclasses.asdict(r)
                | {
                    "ratio": r.ratio,
                    "steadyRatio": r.steady_ratio,
                    "steadyOfCeiling": ceiling_share(r, jetstream),
                }
                for r in results
            ],
        }
        Path(args.json).write_text(json.dumps(doc, indent=2), encoding="utf-8")
        print(f"\nresults written to {args.json}")


def ceiling_share(r: Result, jetstream: float) -> float | None:
    """The hub's steady rate as a share of JetStream's publish rate: the measure for Kafka,
    whose raw consumer reads whole batches at once and has no comparable rate."""
    if r.eventhub is None or r.eventhub.steady is None or not jetstream:
        return None
    return r.eventhub.steady / jetstream


def connector_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONNECTORS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose among {','.join(CONNECTORS)}")
    return names


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--messages", type=int, default=20_000, help="messages per measurement")
    p.add_argument("--only", type=connector_list, default=list(CONNECTORS), help="e.g. mqtt,kafka")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--profile", help="py-spy each hub while it ingests; collapsed stacks go here")
    p.add_argument(
        "--mqtt-window",
        type=int,
        default=700,
        help="MQTT messages published ahead of the consumer at most: keep it well below"
        " Mosquitto's max_queued_messages (1000 by default) or messages are dropped",
    )
    p.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    p.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    p.add_argument("--mqtt-host", default="127.0.0.1")
    p.add_argument("--mqtt-port", type=int, default=1883)
    p.add_argument("--mqtt-consume", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.profile and shutil.which("py-spy") is None:
        p.error("--profile needs py-spy on PATH (pip install py-spy)")
    return args


def main() -> None:
    args = parse_args()
    try:
        if args.mqtt_consume:
            asyncio.run(mqtt_consume(args))
            return
        results, jetstream = asyncio.run(benchmark(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    report(args, results, jetstream)


if __name__ == "__main__":
    main()
