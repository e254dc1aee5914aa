"""The MQTT source against the real Mosquitto (127.0.0.1:1883): CloudEvents binding, the
persistent session (messages published while no hub runs, kill -9 before the PUBACK), dead
letters, backpressure and a shared subscription split between two hub processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import unquote

import aiohttp
import gmqtt
import pytest
from gmqtt.mqtt.constants import MQTTv50, MQTTv311
from gmqtt.storage import PersistentStorage

from eventhub.settings import Settings
from tests.conftest import TOKEN
from tests.support import Call, FunctionServer, HubProcess, RunningHub, start_hub

BROKER = ("127.0.0.1", 1883)
Forget = Callable[[str], None]


pytestmark = pytest.mark.needs("mqtt")


def _version(version: str) -> int:
    return MQTTv311 if version == "3.1.1" else MQTTv50


class Publisher:
    """QoS 1 in order, at most 10 unacknowledged (Mosquitto's window is 20), and leaving only
    once every PUBACK arrived: a client that closes earlier gets its unread PUBLISHes dropped."""

    def __init__(self, client: gmqtt.Client, storage: PersistentStorage, qos: int) -> None:
        self._client = client
        self._storage = storage
        self._qos = qos

    async def send(self, topic: str, payload: str | bytes, **properties: object) -> None:
        if len(self._storage.get_all()) >= 10:
            await self._storage.wait_empty()
        self._client.publish(topic, payload, qos=self._qos, **properties)

    async def drain(self) -> None:
        await asyncio.wait_for(self._storage.wait_empty(), 10)


@contextlib.asynccontextmanager
async def publisher(version: str = "5", qos: int = 1) -> AsyncIterator[Publisher]:
    storage = PersistentStorage()
    client = gmqtt.Client(f"test-pub-{uuid.uuid4().hex[:12]}", persistent_storage=storage)
    await client.connect(*BROKER, version=_version(version))
    try:
        pub = Publisher(client, storage, qos)
        yield pub
        await pub.drain()
    finally:
        await client.disconnect()


async def publish_all(topic: str, payloads: list[str], qos: int = 1) -> None:
    async with publisher(qos=qos) as pub:
        for payload in payloads:
            await pub.send(topic, payload)


async def probe(topic: str, function: FunctionServer) -> None:
    """Publish until one arrives: the connector's subscription to ``topic`` is in place."""
    async with publisher() as pub:
        for i in range(100):
            await pub.send(topic, f"probe {uuid.uuid4().hex} {i}")
            with contextlib.suppress(AssertionError):
                await function.wait_for(1, "fn", wait=0.2)
                if any(ce(c).get("subject") == topic for c in function.calls):
                    return
    raise AssertionError(f"nothing published to {topic} arrived")


async def prime(client_id: str, *filters: str) -> None:
    """Create the session the connector will use, so nothing published from now on is missed
    whatever the moment the connector subscribes."""
    subscribed = asyncio.Event()
    client = gmqtt.Client(client_id, clean_session=False, session_expiry_interval=600)
    client.on_subscribe = lambda *args: subscribed.set()
    await client.connect(*BROKER)
    client.subscribe([gmqtt.Subscription(f, qos=1) for f in filters])
    await asyncio.wait_for(subscribed.wait(), 5)
    await client.disconnect()


@pytest.fixture
async def forget() -> AsyncIterator[Forget]:
    """Ends the named sessions after the test (request it first: it must outlive the hubs)."""
    client_ids: list[str] = []
    yield client_ids.append
    for client_id in client_ids:
        client = gmqtt.Client(client_id, clean_session=True)
        await client.connect(*BROKER)
        await client.disconnect()


def names() -> tuple[str, str]:
    token = uuid.uuid4().hex[:10]
    return f"mq{token}", f"eventhub-test/{token}"


async def until(check: Callable[[], bool | Awaitable[bool]], wait: float = 20.0) -> None:
    deadline = time.monotonic() + wait
    while True:
        result = check()
        if result if isinstance(result, bool) else await result:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


def ce(call: Call) -> dict[str, str]:
    """The call's attributes, percent-decoded (the HTTP binding encodes the header values)."""
    return {k: unquote(v) for k, v in call.ce.items()}


async def wait_bound(hub: RunningHub, source: str) -> None:
    assert hub.hub is not None
    routes = hub.hub.router

    async def bound() -> bool:
        return bool(routes.routes.bindings_of(source))

    await until(bound, 5)


async def metric(base_url: str, name: str, source: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{base_url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(f'{name}{{source="{source}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@contextlib.asynccontextmanager
async def api_of(process: HubProcess) -> AsyncIterator[RunningHub]:
    async with aiohttp.ClientSession() as http:
        yield RunningHub(None, process.base_url, process.token, http)


async def test_wrapped_and_passthrough_messages_reach_the_function(
    forget: Forget, hub: RunningHub, function: FunctionServer
) -> None:
    source, prefix = names()
    forget(f"eventhub-{source}")
    await prime(f"eventhub-{source}", f"{prefix}/#")
    await hub.function("fn", function.url("fn"))
    await hub.put("sources", source, {"type": "mqtt", "topics": [f"{prefix}/#"]})
    await hub.bind(f"{source}-b", "fn", source=source)
    await wait_bound(hub, source)
    structured = {
        "specversion": "1.0",
        "id": "s-1",
        "source": "/thermo",
        "type": "com.example.structured",
        "datacontenttype": "application/json",
        "data": {"c": 20},
    }
    async with publisher() as pub:
        await pub.send(
            f"{prefix}/room 1", b'{"c": 21.5}', content_type="application/json",
            user_property=[("site", "lab"), ("Not-An-Extension", "x")],
        )  # fmt: skip
        await pub.send(
            f"{prefix}/binary", b'{"c": 22}', content_type="application/json",
            user_property=[("specversion", "1.0"), ("id", "b-1"), ("source", "/thermo"),
                           ("type", "com.example.binary"), ("room", "2")],
        )  # fmt: skip
        await pub.send(
            f"{prefix}/structured", json.dumps(structured),
            content_type="application/cloudevents+json",
        )  # fmt: skip
    async with publisher("3.1.1") as pub:  # no content type: the JSON event format is implied
        await pub.send(f"{prefix}/v311", json.dumps({**structured, "id": "s-311"}))
        await pub.send(f"{prefix}/v311", b'{"c": 23, "meta": {"specversion": "not top-level"}}')

    calls = await function.wait_for(5, "fn")
    by_key = {ce(c).get("subject", ce(c)["id"]): c for c in calls}
    wrapped = by_key[f"{prefix}/room 1"]
    attributes = ce(wrapped)
    assert attributes["type"] == "eventhub.mqtt.message"
    assert attributes["source"] == f"mqtt://127.0.0.1/{prefix}/room%201"
    assert attributes["topic"] == f"{prefix}/room 1"
    assert (attributes["qos"], attributes["retain"], attributes["site"]) == ("1", "false", "lab")
    assert not any(name.startswith("not") for name in attributes)
    assert len(attributes["id"]) == 32
    assert wrapped.headers["content-type"] == "application/json"
    assert json.loads(wrapped.body) == {"c": 21.5}

    binary = ce(by_key["b-1"])  # passed through unchanged: no topic extension added
    assert (binary["type"], binary["source"], binary["room"]) == (
        "com.example.binary",
        "/thermo",
        "2",
    )
    assert "topic" not in binary
    assert json.loads(by_key["b-1"].body) == {"c": 22}

    for event_id in ("s-1", "s-311"):
        assert ce(by_key[event_id])["type"] == "com.example.structured"
        assert json.loads(by_key[event_id].body) == {"c": 20}

    plain = by_key[f"{prefix}/v311"]  # JSON, but no top-level specversion: wrapped
    assert ce(plain)["type"] == "eventhub.mqtt.message"
    assert json.loads(plain.body)["c"] == 23


@pytest.mark.parametrize(("version", "qos"), [("5", 1), ("3.1.1", 2)])
async def test_messages_published_while_the_hub_is_down_arrive_after_restart(
    forget: Forget, settings: Settings, function: FunctionServer, version: str, qos: int
) -> None:
    source, prefix = names()
    forget(f"eventhub-{source}")
    spec = {"type": "mqtt", "topics": [f"{prefix}/#"], "version": version, "qos": qos}
    async with start_hub(settings, TOKEN) as hub:
        await hub.function("fn", function.url("fn"))
        await hub.put("sources", source, spec)
        await hub.bind(f"{source}-b", "fn", source=source)
        await wait_bound(hub, source)
        await probe(f"{prefix}/before", function)  # the connector's own session is in place
    # No hub now: the broker keeps what is published for the session.
    await publish_all(f"{prefix}/offline", [f"offline {i}" for i in range(5)], qos=qos)
    async with start_hub(settings, TOKEN):
        await until(lambda: len([c for c in function.calls if b"offline" in c.body]) >= 5)
        await asyncio.sleep(0.3)
    offline = [c for c in function.calls if b"offline" in c.body]
    assert sorted(c.body for c in offline) == [f"offline {i}".encode() for i in range(5)]
    assert {ce(c)["qos"] for c in offline} == {str(qos)}


async def test_malformed_messages_become_dead_letters_and_the_next_flows(
    forget: Forget, hub: RunningHub, function: FunctionServer
) -> None:
    source, prefix = names()
    forget(f"eventhub-{source}")
    await prime(f"eventhub-{source}", f"{prefix}/#")
    await hub.function("fn", function.url("fn"))
    spec = {"type": "mqtt", "topics": [f"{prefix}/#"], "maxMessageSize": 1024}
    await hub.put("sources", source, spec)
    await hub.bind(f"{source}-b", "fn", source=source)
    await wait_bound(hub, source)
    async with publisher() as pub:
        await pub.send(
            f"{prefix}/bad", b'{"specversion": "1.0", "id": ',
            content_type="application/cloudevents+json",
        )  # fmt: skip
        await pub.send(
            f"{prefix}/bad", b"{}",
            user_property=[("specversion", "1.0"), ("id", "no-type"), ("source", "/s")],
        )  # fmt: skip
        await pub.send(f"{prefix}/big", b"x" * 2000)
        await pub.send(f"{prefix}/good", b"fine")
    [call] = await function.wait_for(1, "fn")
    assert call.body == b"fine"
    letters = await hub.wait_dead_letters(3, source=source)
    assert sorted(d["errorCode"] for d in letters) == [
        "invalid-cloudevent",
        "invalid-cloudevent",
        "too-large",
    ]
    assert {d["event"]["topic"] for d in letters} == {f"{prefix}/bad", f"{prefix}/big"}
    assert all(d["function"] is None and d["source"] == source for d in letters)
    await asyncio.sleep(0.5)
    assert len(function.calls) == 1


async def test_an_exotic_charset_becomes_a_dead_letter_and_the_next_flows(
    forget: Forget, hub: RunningHub, function: FunctionServer
) -> None:
    source, prefix = names()
    forget(f"eventhub-{source}")
    await prime(f"eventhub-{source}", f"{prefix}/#")
    await hub.function("fn", function.url("fn"))
    await hub.put("sources", source, {"type": "mqtt", "topics": [f"{prefix}/#"]})
    await hub.bind(f"{source}-b", "fn", source=source)
    await wait_bound(hub, source)
    async with publisher() as pub:
        # Codecs that fail with errors other than a UnicodeDecodeError
        await pub.send(f"{prefix}/idna", b"xn--a", content_type="text/plain; charset=idna")
        await pub.send(f"{prefix}/puny", b"a..b", content_type="text/plain; charset=punycode")
        await pub.send(f"{prefix}/x", b"hi", content_type="text/plain; charset=x-klingon")
        await pub.send(f"{prefix}/good", b"fine", content_type="text/plain; charset=utf-8")
    [call] = await function.wait_for(1, "fn")
    assert call.body == b"fine"
    letters = await hub.wait_dead_letters(3, source=source)
    assert [d["errorCode"] for d in letters] == ["bad-charset"] * 3
    topics = {d["event"]["topic"] for d in letters}
    assert topics == {f"{prefix}/idna", f"{prefix}/puny", f"{prefix}/x"}
    await asyncio.sleep(0.5)
    assert len(function.calls) == 1


async def test_burst_above_high_water_mark_pauses_and_resumes_losing_nothing(
    forget: Forget, hub: RunningHub, function: FunctionServer
) -> None:
    source, prefix = names()
    forget(f"eventhub-{source}")
    await prime(f"eventhub-{source}", f"{prefix}/#")
    function.delays["fn"] = 0.1
    await hub.function("fn", function.url("fn"), maxConcurrency=2)
    spec = {"type": "mqtt", "topics": [f"{prefix}/#"], "highWaterMark": 5}
    await hub.put("sources", source, spec)
    await hub.bind(f"{source}-b", "fn", source=source)
    await wait_bound(hub, source)
    await publish_all(f"{prefix}/burst", [f"m{i}" for i in range(40)])
    throttled = False
    deadline = time.monotonic() + 30
    while len(function.calls) < 40:
        assert time.monotonic() < deadline, f"only {len(function.calls)} of 40 arrived"
        throttled = throttled or await metric(hub.base_url, "eventhub_source_throttled", source)
        await asyncio.sleep(0.1)
    assert throttled

    async def resumed() -> bool:
        return await metric(hub.base_url, "eventhub_source_throttled", source) == 0

    await until(resumed, 5)
    await asyncio.sleep(0.5)
    assert sorted(c.body for c in function.calls) == sorted(f"m{i}".encode() for i in range(40))


@pytest.mark.slow
async def test_kill_9_between_receipt_and_enqueue_redelivers_after_restart(
    forget: Forget, hub_process: Callable[[], HubProcess], function: FunctionServer
) -> None:
    source, prefix = names()
    forget(f"eventhub-{source}")
    await prime(f"eventhub-{source}", f"{prefix}/#")
    first = hub_process()
    await first.ready()
    async with api_of(first) as api:
        await api.function("slow", function.url("slow"), timeout="10s")
        spec = {"type": "mqtt", "topics": [f"{prefix}/#"], "highWaterMark": 1}
        await api.put("sources", source, spec)
        await api.bind(f"{source}-b", "slow", source=source)
    await asyncio.sleep(0.5)  # the binding reaches the process's router by NOTIFY
    function.delays["slow"] = 3.0
    await publish_all(f"{prefix}/t", ["m0"])
    await function.wait_for(1, "slow")  # m0 is in flight: the function is at the mark ...

    async def throttled() -> bool:
        return await metric(first.base_url, "eventhub_source_throttled", source) == 1

    await until(throttled, 5)
    # ... so the connector holds these in deliver, unacknowledged
    await publish_all(f"{prefix}/t", ["m1", "m2", "m3"])
    await asyncio.sleep(0.5)
    first.kill()
    function.delays["slow"] = 0
    second = hub_process()
    await second.ready()

    async def all_arrived() -> bool:
        return {c.body for c in function.calls} >= {b"m0", b"m1", b"m2", b"m3"}

    await until(all_arrived, 30)


@pytest.mark.slow
async def test_two_processes_split_a_shared_subscription_without_duplicates(
    forget: Forget, hub_process: Callable[[], HubProcess], function: FunctionServer
) -> None:
    source, prefix = names()
    host = socket.gethostname()
    members = [f"eventhub-{source}-{host}-{slot}" for slot in (0, 1)]
    for client_id in members:
        forget(client_id)
        await prime(client_id, f"$share/g/{prefix}/#")
    one, two = hub_process(), hub_process()
    await asyncio.gather(one.ready(), two.ready())
    async with api_of(one) as api:
        await api.function("fn", function.url("fn"))
        spec = {"type": "mqtt", "topics": [f"{prefix}/#"], "sharedGroup": "g"}
        await api.put("sources", source, spec)
        await api.bind(f"{source}-b", "fn", source=source)
    await asyncio.sleep(0.5)
    await publish_all(f"{prefix}/t", [f"a{i}" for i in range(20)])
    await function.wait_for(20, "fn")
    for process in (one, two):  # each process took its share
        assert await metric(process.base_url, "eventhub_source_events_total", source) > 0

    two.kill()  # its session keeps its share of what follows, for the next process in slot 1
    await publish_all(f"{prefix}/t", [f"b{i}" for i in range(10)])
    three = hub_process()
    await three.ready()
    await function.wait_for(30, "fn")
    await asyncio.sleep(1.0)
    bodies = sorted(c.body for c in function.calls)
    expected = sorted([f"a{i}".encode() for i in range(20)] + [f"b{i}".encode() for i in range(10)])
    assert bodies == expected  # every message, each invoked once


async def test_a_filter_removed_from_topics_is_unsubscribed_from_the_session(
    forget: Forget, hub: RunningHub, function: FunctionServer
) -> None:
    source, prefix = names()
    forget(f"eventhub-{source}")
    await hub.function("fn", function.url("fn"))
    await hub.put("sources", source, {"type": "mqtt", "topics": [f"{prefix}/a/#"]})
    await hub.bind(f"{source}-b", "fn", source=source)
    await wait_bound(hub, source)
    await probe(f"{prefix}/a/x", function)
    await hub.put("sources", source, {"type": "mqtt", "topics": [f"{prefix}/b/#"]})
    await probe(f"{prefix}/b/x", function)  # the restarted connector, same session
    await publish_all(f"{prefix}/a/x", ["removed"])
    await publish_all(f"{prefix}/b/x", ["kept"])
    await until(lambda: any(c.body == b"kept" for c in function.calls), 5)
    await asyncio.sleep(0.3)
    assert [c.body for c in function.calls if not c.body.startswith(b"probe")] == [b"kept"]


async def test_more_messages_than_the_receive_window_flow_and_are_acked_in_order(
    forget: Forget, hub: RunningHub, function: FunctionServer
) -> None:
    """Deliveries are pipelined, and the broker sends no more than 100 unacknowledged messages:
    350 can only all arrive if the PUBACKs leave; and a new session gets none of them again."""
    source, prefix = names()
    forget(f"eventhub-{source}")
    await prime(f"eventhub-{source}", f"{prefix}/#")
    await hub.function("fn", function.url("fn"), maxConcurrency=50)
    await hub.put("sources", source, {"type": "mqtt", "topics": [f"{prefix}/#"]})
    await hub.bind(f"{source}-b", "fn", source=source)
    await wait_bound(hub, source)
    payloads = [f'{{"i": {i}}}' for i in range(350)]
    await publish_all(f"{prefix}/many", payloads)
    calls = await function.wait_for(350, "fn", wait=30)
    assert sorted(c.body for c in calls) == sorted(p.encode() for p in payloads)
    # Restart the source: had a PUBACK not left, the session would redeliver that message.
    await hub.put("sources", source, {"type": "mqtt", "topics": [f"{prefix}/#"], "eventType": "x"})
    await probe(f"{prefix}/probe", function)
    await asyncio.sleep(0.5)
    assert len([c for c in function.calls_to("fn") if ce(c)["subject"] == f"{prefix}/many"]) == 350
