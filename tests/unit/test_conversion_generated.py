"""Generated transport messages: every connector's conversion yields valid events or raises
:class:`Rejected` with a precise reason, never another error (which would make the connector
fetch the same message again, forever) and never the catch-all ``conversion-failed`` (which would
mean a case no rule names). AMQP messages go through the wire codec, as the broker sends them."""

from __future__ import annotations

import asyncio
import json
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from aio_pika.message import IncomingMessage
from aiokafka.structs import ConsumerRecord
from aiormq.abc import DeliveredMessage
from hypothesis import HealthCheck, given, settings
from hypothesis import event as note_event
from hypothesis import strategies as st
from pamqp import frame
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from connectors import amqpwire
from connectors.common import Rejected
from connectors.kafka import record_events
from connectors.minio import listen_events, listen_payload, notification_events
from connectors.mqtt import publish_events
from connectors.rabbitmq import RabbitMQConnector
from eventhub.events import Event
from eventhub.sourcespecs import KafkaSpec, MQTTSpec, RabbitMQSpec

BOUNDED = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same examples on every run: a CI run never fails by chance
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SAMPLES = [Path(__file__).parents[1] / "data" / "minio" / n for n in ("put.json", "delete.json")]
FORMATS = st.sampled_from(["auto", "raw", "s3"])
CODECS = [
    "utf-8", "UTF-8", "latin-1", "ascii", "utf-16", "utf-32", "utf-7", "utf-8-sig", "cp037",
    "idna", "punycode", "unicode_escape", "raw_unicode_escape", "base64", "hex", "rot13",
    "zlib", "uu", "mbcs", "oem", "x-user-defined", "utf\x00", "utf-8\udcff", "",
]  # fmt: skip
CHARSETS = st.one_of(st.sampled_from(CODECS), st.text(max_size=12))
MEDIA = st.one_of(
    st.sampled_from(["text/plain", "application/json", "application/cloudevents+json"]),
    st.text(max_size=20),
)
CONTENT_TYPE_TEXTS = st.one_of(
    MEDIA,
    st.builds(lambda m, c: f"{m}; charset={c}", MEDIA, CHARSETS),
    st.builds(lambda m, c: f'{m};charset="{c}"; q=1', MEDIA, CHARSETS),
)
CONTENT_TYPES = st.none() | CONTENT_TYPE_TEXTS
TEXTS = st.one_of(
    st.text(max_size=16),
    st.sampled_from(["1.0", "0.3", "", "2024-05-01T12:00:00Z", "not a time", "a\x00b", "\ud800"]),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXTS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXTS, inner, max_size=3),
    max_leaves=8,
)
CE_ATTRIBUTES = ["specversion", "id", "source", "type", "time", "subject", "dataschema", "x"]


def structured() -> st.SearchStrategy[bytes]:
    """Structured CloudEvents, often valid, sometimes with odd attribute values."""
    doc = st.fixed_dictionaries(
        {"specversion": st.sampled_from(["1.0", "0.3"]), "id": TEXTS, "source": TEXTS},
        optional={
            "type": TEXTS,
            "time": TEXTS,
            "data": JSON,
            "data_base64": TEXTS,
            "datacontenttype": TEXTS,
            "extension1": JSON,
        },
    )
    return doc.map(lambda d: json.dumps(d).encode("utf-8", "surrogatepass"))


PAYLOADS = st.one_of(
    st.binary(max_size=64), structured(), JSON.map(lambda v: json.dumps(v).encode())
)


def checked(convert: Callable[[], list[Event]]) -> list[Event] | Rejected:
    """Events that can be sent, or a rejection with a precise reason; anything else fails."""
    try:
        events = convert()
    except Rejected as exc:
        code = exc.reason.split(":", 1)[0]
        assert code != "conversion-failed", exc.reason
        assert exc.reason.isprintable()
        note_event(f"rejected: {code}")  # --hypothesis-show-statistics shows what was covered
        return exc
    note_event(f"{len(events)} event(s)")
    for event in events:
        assert {"specversion", "id", "source", "type"} <= set(event.attributes)
        for name, value in event.attributes.items():
            assert isinstance(value, str)
            name.encode("utf-8")
            value.encode("utf-8")  # a surrogate here would fail every later step
        event.binary_headers()
    return events


# Kafka ---------------------------------------------------------------------------------------

KAFKA_HEADER_NAMES = st.one_of(
    st.sampled_from([f"ce_{a}" for a in CE_ATTRIBUTES] + ["content-type", "Content-Type"]),
    st.text(max_size=10),
    # as connectors.kafkawire hands over a name that is not UTF-8: its bytes as surrogate escapes
    st.binary(max_size=6).map(lambda b: b.decode("utf-8", "surrogateescape")),
)
KAFKA_HEADER_VALUES = st.one_of(
    st.none(),
    st.binary(max_size=16),
    TEXTS.map(lambda t: t.encode("utf-8", "surrogatepass")),
    CONTENT_TYPES.map(lambda t: (t or "").encode("utf-8", "surrogatepass")),
)


@st.composite
def kafka_records(draw: st.DrawFn) -> ConsumerRecord[bytes, bytes]:
    headers = draw(st.lists(st.tuples(KAFKA_HEADER_NAMES, KAFKA_HEADER_VALUES), max_size=6))
    if draw(st.booleans()):  # a binary-mode event, often complete
        headers += [("ce_specversion", b"1.0"), ("ce_id", b"1"), ("ce_source", b"/s")]
        headers += [("ce_type", b"t")] if draw(st.booleans()) else []
    return ConsumerRecord(
        topic=draw(st.sampled_from(["orders", "a.b-c_d"])),
        partition=draw(st.integers(0, 2**31 - 1)),
        offset=draw(st.integers(0, 2**63 - 1)),
        timestamp=draw(
            st.one_of(
                st.none(),
                st.integers(-(2**63), 2**63 - 1),
                st.sampled_from([1_714_564_800_000, 1_714_564_800_000_000, 253_402_300_800_000]),
            )
        ),
        timestamp_type=0,
        key=draw(st.one_of(st.none(), st.binary(max_size=8), st.just(b"\xff\xfe"))),
        value=draw(st.one_of(st.none(), PAYLOADS)),
        checksum=None,
        serialized_key_size=-1,
        serialized_value_size=-1,
        headers=headers,
    )


@BOUNDED
@given(record=kafka_records(), fmt=FORMATS, size=st.sampled_from([16, 1024 * 1024]))
def test_a_kafka_record_becomes_events_or_a_rejection(
    record: ConsumerRecord[bytes, bytes], fmt: str, size: int
) -> None:
    spec = KafkaSpec(
        type="kafka", bootstrap_servers=["k:9092"], topics=["t"], format=fmt, max_message_size=size
    )  # type: ignore[arg-type]
    checked(lambda: record_events(record, spec))


def test_a_kafka_timestamp_in_microseconds_is_rejected_naming_it() -> None:
    record = ConsumerRecord("t", 0, 7, 1_714_564_800_000_000, 0, None, b"{}", None, -1, -1, [])  # type: ignore[arg-type]
    spec = KafkaSpec(type="kafka", bootstrap_servers=["k:9092"], topics=["t"])  # type: ignore[arg-type]
    with pytest.raises(Rejected, match=r"^invalid-time: timestamp 1714564800000000 "):
        record_events(record, spec)


def test_a_kafka_header_name_that_is_not_utf8_is_rejected_naming_it() -> None:
    headers = [("ce_specversion", b"1.0"), ("ce_\udcff", b"x")]
    record = ConsumerRecord("t", 0, 7, None, 0, None, b"{}", None, -1, -1, headers)  # type: ignore[arg-type]
    spec = KafkaSpec(type="kafka", bootstrap_servers=["k:9092"], topics=["t"])  # type: ignore[arg-type]
    expected = r"^invalid-header: the header name 'ce_\\udcff' is not UTF-8$"
    with pytest.raises(Rejected, match=expected):
        record_events(record, spec)


# AMQP ----------------------------------------------------------------------------------------


class RawProperties(Basic.Properties):  # type: ignore[misc]
    """Properties written as given: a timestamp as any 64-bit number, headers as a raw field
    table, short strings as raw bytes, as any client (or a broken one) may send them."""

    def encode_property(self, name: str, value: Any) -> bytes:
        if name == "timestamp" and isinstance(value, int):
            return struct.pack(">Q", value)
        if name == "headers" and isinstance(value, bytes):
            return struct.pack(">I", len(value)) + value
        if isinstance(value, bytes) and self.amqp_type(name) == "shortstr":
            return bytes([len(value)]) + value
        return super().encode_property(name, value)  # type: ignore[no-any-return]


def fixed(kind: bytes, size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=size, max_size=size).map(lambda b: kind + b)


def long_bytes(kind: bytes) -> st.SearchStrategy[bytes]:
    values = st.one_of(
        st.binary(max_size=12), TEXTS.map(lambda t: t.encode("utf-8", "surrogatepass"))
    )
    return values.map(lambda b: kind + struct.pack(">I", len(b)) + b)


AMQP_SCALARS = st.one_of(
    *(fixed(k, n) for k, n in [(b"t", 1), (b"b", 1), (b"B", 1), (b"s", 2), (b"u", 2)]),
    *(fixed(k, n) for k, n in [(b"I", 4), (b"i", 4), (b"l", 8), (b"L", 8), (b"f", 4)]),
    *(fixed(k, n) for k, n in [(b"d", 8), (b"D", 5), (b"T", 8)]),
    st.integers(0, 2**64 - 1).map(lambda n: b"T" + struct.pack(">Q", n)),
    long_bytes(b"S"),
    long_bytes(b"x"),
    st.just(b"V"),
)
AMQP_NAMES = st.one_of(
    st.sampled_from([f"cloudEvents_{a}" for a in CE_ATTRIBUTES] + ["cloudEvents:id", "x-death"]),
    st.text(max_size=8).map(lambda t: t.encode()[:255]),
    st.binary(max_size=8),
)


def table(entries: Sequence[tuple[str | bytes, bytes]]) -> bytes:
    out = b""
    for name, value in entries:
        raw = name.encode() if isinstance(name, str) else name
        out += bytes([len(raw)]) + raw + value
    return out


AMQP_VALUES = st.recursive(
    AMQP_SCALARS,
    lambda inner: st.one_of(
        st.lists(st.tuples(AMQP_NAMES, inner), max_size=3).map(
            lambda e: b"F" + struct.pack(">I", len(t := table(e))) + t
        ),
        st.lists(inner, max_size=3).map(
            lambda v: b"A" + struct.pack(">I", len(b"".join(v))) + b"".join(v)
        ),
    ),
    max_leaves=6,
)
SHORT_STRINGS = st.one_of(
    st.none(),
    TEXTS.filter(lambda t: len(t.encode("utf-8", "surrogatepass")) < 256).map(
        lambda t: t.encode("utf-8", "surrogatepass")
    ),
    st.binary(max_size=16),
)


@st.composite
def amqp_messages(draw: st.DrawFn) -> IncomingMessage:
    entries = draw(st.lists(st.tuples(AMQP_NAMES, AMQP_VALUES), max_size=5))
    if draw(st.booleans()):
        entries += [
            ("cloudEvents_specversion", b"S" + struct.pack(">I", 3) + b"1.0"),
            ("cloudEvents_id", b"S\x00\x00\x00\x011"),
            ("cloudEvents_source", b"S\x00\x00\x00\x02/s"),
            ("cloudEvents_type", b"S\x00\x00\x00\x01t"),
        ]
    body = draw(PAYLOADS)
    content_type = draw(
        st.one_of(
            CONTENT_TYPES.map(lambda t: None if t is None else t.encode("utf-8", "surrogatepass")),
            st.binary(max_size=12),
        ).filter(lambda b: b is None or len(b) < 256)
    )
    properties = RawProperties(  # type: ignore[arg-type]  # raw values, on purpose
        content_type=content_type or None,
        headers=table(entries) or None,
        message_id=draw(SHORT_STRINGS) or None,
        correlation_id=draw(SHORT_STRINGS) or None,
        app_id=draw(SHORT_STRINGS) or None,
        timestamp=draw(
            st.one_of(
                st.none(),
                st.integers(0, 2**64 - 1),
                st.sampled_from([1_714_564_800, 1_714_564_800_000, 1_714_564_800_000_000]),
            )
        ),
    )
    wire = frame.marshal(ContentHeader(0, len(body), properties), 1)
    _, _, header = frame.unmarshal(wire)  # as aiormq reads it
    routing_key = draw(st.sampled_from(["orders.created", "", "q"]))
    delivery = Basic.Deliver("ctag", 1, False, draw(st.sampled_from(["", "x"])), routing_key)
    return IncomingMessage(DeliveredMessage(delivery, header, body, None))  # type: ignore[arg-type]


class RecordingContext:
    def __init__(self) -> None:
        self.rejected: list[tuple[str, str, bytes, Mapping[str, str]]] = []

    async def reject(
        self, message_id: str, reason: str, payload: bytes, metadata: Mapping[str, str]
    ) -> None:
        self.rejected.append((message_id, reason, payload, metadata))


@pytest.fixture(scope="module")
def rabbitmq() -> RabbitMQConnector:
    amqpwire.install()
    return RabbitMQConnector("s", RabbitMQSpec(type="rabbitmq", queue="q"))  # type: ignore[arg-type]


@BOUNDED
@given(data=st.data(), fmt=FORMATS)
def test_an_amqp_message_becomes_events_or_a_rejection_that_can_be_stored(
    rabbitmq: RabbitMQConnector, data: st.DataObject, fmt: str
) -> None:
    amqpwire.install()
    message = data.draw(amqp_messages())
    connector = RabbitMQConnector("s", RabbitMQSpec(type="rabbitmq", queue="q", format=fmt))  # type: ignore[arg-type]
    outcome = checked(lambda: connector.events(message))
    if isinstance(outcome, Rejected):
        ctx = RecordingContext()
        asyncio.run(connector._reject(ctx, message, outcome.reason))  # type: ignore[arg-type]
        [(message_id, _, _, metadata)] = ctx.rejected
        orjson.dumps({"id": message_id, **metadata})  # what the dead-letter store writes


@pytest.mark.parametrize(
    ("properties", "reason"),
    [
        ({"timestamp": 1_714_564_800_000_000}, "invalid-time: the timestamp property"),
        ({"headers": table([("when", b"T" + struct.pack(">Q", 2**63))])}, "invalid-header"),
        ({"headers": table([(b"\xff\xfe", b"t\x01")])}, "invalid-header: the header name"),
        ({"message_id": b"\xff"}, "invalid-attribute: id is not UTF-8"),
        ({"headers": table([("cloudEvents_time", b"l" + struct.pack(">q", 2**62))])}, "invalid"),
    ],
)
def test_what_pamqp_alone_cannot_read_is_rejected_naming_it(
    rabbitmq: RabbitMQConnector, properties: dict[str, Any], reason: str
) -> None:
    if "cloudEvents_time" in str(properties):
        extra = [("cloudEvents_specversion", b"S\x00\x00\x00\x031.0")]
        properties = {"headers": properties["headers"] + table(extra)}
    wire = frame.marshal(ContentHeader(0, 2, RawProperties(**properties)), 1)
    _, _, header = frame.unmarshal(wire)
    delivery = Basic.Deliver("ctag", 1, False, "", "q")
    message = IncomingMessage(DeliveredMessage(delivery, header, b"{}", None))  # type: ignore[arg-type]
    with pytest.raises(Rejected) as caught:
        rabbitmq.events(message)
    assert caught.value.reason.startswith(reason), caught.value.reason


# MQTT ----------------------------------------------------------------------------------------

USER_PROPERTIES = st.lists(
    st.tuples(
        st.one_of(
            st.sampled_from([*CE_ATTRIBUTES, "datacontenttype", "Tenant"]), st.text(max_size=6)
        ),
        TEXTS,
    ),
    max_size=6,
)


@st.composite
def mqtt_properties(draw: st.DrawFn) -> dict[str, Any]:
    properties: dict[str, Any] = {"dup": draw(st.booleans()), "retain": draw(st.booleans())}
    optional: dict[str, st.SearchStrategy[Any]] = {
        "content_type": CONTENT_TYPE_TEXTS,
        "user_property": USER_PROPERTIES,
        "payload_format_id": st.integers(0, 255),
        "correlation_data": st.binary(max_size=8),
        "response_topic": st.text(max_size=8),
        "message_expiry_interval": st.integers(0, 2**32 - 1),
        "subscription_identifier": st.integers(1, 2**28),
    }
    for name, values in optional.items():
        if draw(st.booleans()):
            value = draw(values)
            properties[name] = value if name == "user_property" else [value]
    if draw(st.booleans()):
        properties.setdefault("user_property", [])
        properties["user_property"] += [("specversion", "1.0"), ("id", "1"), ("source", "/s")]
        properties["user_property"] += [("type", "t")] if draw(st.booleans()) else []
    return properties


@BOUNDED
@given(
    topic=st.one_of(st.text(min_size=1, max_size=12), st.just("a/\ufffd/\x00")),
    payload=PAYLOADS,
    qos=st.sampled_from([0, 1, 2]),
    properties=mqtt_properties(),
    fmt=FORMATS,
    version=st.sampled_from(["5", "3.1.1"]),
)
def test_an_mqtt_publish_becomes_events_or_a_rejection(
    topic: str, payload: bytes, qos: int, properties: dict[str, Any], fmt: str, version: str
) -> None:
    spec = MQTTSpec(type="mqtt", topics=["#"], format=fmt, version=version)  # type: ignore[arg-type]
    checked(lambda: publish_events(spec, topic, payload, qos, properties))


def test_an_mqtt_publish_with_an_exotic_charset_is_rejected_naming_it() -> None:
    spec = MQTTSpec(type="mqtt", topics=["#"])  # type: ignore[arg-type]
    for charset in ("idna", "x-klingon", "base64"):
        properties = {"content_type": [f"text/plain; charset={charset}"]}
        with pytest.raises(Rejected, match=r"^bad-charset: "):
            publish_events(spec, "t", b"\xff\x00\xfe", 1, properties)


# MinIO ---------------------------------------------------------------------------------------


def replace_at(doc: Any, path: list[int], value: Any) -> Any:
    """``doc`` with the node that ``path`` picks (by index among children) set to ``value``."""
    if not path or not isinstance(doc, dict | list) or not doc:
        return value
    keys = list(doc) if isinstance(doc, dict) else list(range(len(doc)))
    key = keys[path[0] % len(keys)]
    copy: Any = dict(doc) if isinstance(doc, dict) else list(doc)
    copy[key] = replace_at(doc[key], path[1:], value)
    return copy


@st.composite
def notifications(draw: st.DrawFn) -> Any:
    base = orjson.loads(draw(st.sampled_from(SAMPLES)).read_bytes())
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.lists(st.integers(0, 40), min_size=1, max_size=6))
        extra = st.sampled_from([2**70, math.nan, "\ud800", "a%ZZ%00", -1])
        base = replace_at(base, path, draw(st.one_of(JSON, extra)))
    return base


@BOUNDED
@given(body=st.one_of(notifications().map(lambda d: json.dumps(d).encode()), PAYLOADS))
def test_a_webhook_body_becomes_events_or_a_rejection(body: bytes) -> None:
    checked(lambda: notification_events(body))


@BOUNDED
@given(doc=st.one_of(notifications(), JSON), size=st.sampled_from([64, 1024 * 1024]))
def test_a_listen_notification_becomes_events_or_a_rejection(doc: Any, size: int) -> None:
    payload = listen_payload(doc)  # never fails: a notification is always kept
    checked(lambda: listen_events(payload, size))
