"""MQTT source: subscribes with a persistent session and acknowledges after the PubAck.

=========  ================================================================================
ack        PUBACK (QoS 1) / PUBREC (QoS 2), sent only after ``ctx.deliver`` returned for the
           message and every message received before it (or ``ctx.reject`` stored a bad one),
           so in the order the messages arrived, as MQTT wants. Up to 4 batches are delivered
           at once; the acknowledgements of a batch leave in one write. gmqtt runs with
           ``optimistic_acknowledgement`` off and its QoS 1/2 handlers replaced: it sends
           none of its own.
nack       none in MQTT. A message not acknowledged stays in flight in the session; once the
           broker's window (``receive_maximum`` 100 for MQTT 5, ``max_inflight_messages`` for
           3.1.1) is full it sends no more, which is how a throttled source stops taking.
reject     ``ctx.reject`` (a dead letter of the source), then ack.
redeliver  on the next connection of the same client id (clean start off, session kept
           ``sessionExpiry`` for MQTT 5, until the broker drops it for 3.1.1): unacknowledged
           messages again (DUP), then those queued while no hub was connected. A broken
           connection is never resumed by gmqtt itself: ``run`` raises and the supervisor
           opens a new session, so no acknowledgement of an old connection reaches a new one.
=========  ================================================================================

Client id (the session: its stability is what makes offline messages arrive): ``clientId`` or
``eventhub-<source>``. With ``sharedGroup`` each process needs its own session and must get the
same one back after a restart, because the broker (Mosquitto 2) keeps round-robining messages to
the session of a stopped member and keeps that member's in-flight messages for it: the id is then
``<that>-<hostname>-<slot>``, the slot being the lowest number whose lock file (``flock``, freed
by the kernel when the process dies, even on kill -9) this process holds on this host. A member
that never comes back (fewer processes, a new hostname) strands its share until its session
expires.

Limits of the transport: the broker queues at most ``max_queued_messages`` per session (Mosquitto:
1000) while the hub is down or throttled and drops the rest; QoS 0 messages (published at QoS 0)
have no acknowledgement and no flow control, so they are at most once and wait in memory while
the source is throttled. The filters each session holds are kept in the source's state, so a
filter removed from ``topics`` is unsubscribed and one already held is not subscribed again.

Events (``format: auto``): MQTT 5 user properties with ``specversion`` are the binary mode
(attributes as user properties without a prefix, ``datacontenttype`` from Content Type); Content
Type ``application/cloudevents+json`` is the structured mode; with no Content Type (MQTT 3.1.1,
whose binding knows only the structured mode) a payload that is a JSON object with a top-level
``specversion`` is taken as structured. Anything else is wrapped: ``id`` = hash of the topic,
payload and the MQTT 5 properties a redelivery keeps (MQTT has no message id: identical messages
within the JetStream duplicate window are invoked once), ``source`` =
``mqtt[s]://<host>[:<port>]/<topic>``, ``type`` = ``eventType`` or ``eventhub.mqtt.message``,
``subject`` = topic, ``datacontenttype`` = Content Type, extensions ``topic``, ``qos``,
``retain`` and the user properties whose names are valid extension names.

A message that cannot become an event (a bad or unknown charset in its Content Type, an invalid
binary or structured CloudEvent, any error of the conversion: :func:`publish_events`) becomes a
dead letter of the source and is acknowledged like the others.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import functools
import itertools
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import gmqtt  # type: ignore[import-untyped]
import orjson
import structlog
from gmqtt.mqtt.constants import MQTTCommands, MQTTv50, MQTTv311  # type: ignore[import-untyped]
from gmqtt.mqtt.handler import MQTTConnectError  # type: ignore[import-untyped]
from gmqtt.mqtt.package import CommandWithMidPacket  # type: ignore[import-untyped]

from connectors.common import (
    Message,
    Rejected,
    content_hash,
    convert,
    ssl_context,
    to_events,
    utf8,
)
from eventhub.events import STRUCTURED, Event
from eventhub.resources import Resource
from eventhub.sources import SourceContext
from eventhub.sourcespecs import MQTTSpec

log = structlog.get_logger(__name__)

DEFAULT_TYPE = "eventhub.mqtt.message"
_RECEIVE_MAXIMUM = 100  # MQTT 5: messages the broker may have in flight to us unacknowledged
_BATCH = 100
_WINDOW = 4  # batches in delivery at once (the receive maximum bounds their messages)
_KEEPALIVE = 30
_CONNECT_TIMEOUT = 15.0
_CLOSE_TIMEOUT = 5.0
_SESSION_TAKEN_OVER = 0x8E
_KEPT_SESSIONS = 64  # client ids whose subscriptions the source's state remembers
_ATTRIBUTE = re.compile(r"^[a-z0-9]+$")  # a valid CloudEvents attribute name
_CONTEXT = frozenset(
    {"specversion", "id", "source", "type", "subject", "time", "datacontenttype", "dataschema"}
)
_SPECVERSION = re.compile(rb'"specversion"\s*:')


def connector(resource: Resource) -> MQTTConnector:
    return MQTTConnector(resource.name, resource.model)


class MQTTConnector:
    def __init__(self, name: str, spec: MQTTSpec) -> None:
        self._name = name
        self._spec = spec

    async def run(self, ctx: SourceContext) -> None:
        with client_id(self._name, self._spec) as cid:
            await _Session(ctx, self._spec, cid).run()


@contextlib.contextmanager
def client_id(name: str, spec: MQTTSpec) -> Iterator[str]:
    """The session's client id, held (with ``sharedGroup``, its slot locked) while in use."""
    base = spec.client_id or f"eventhub-{name}"
    if spec.shared_group is None:
        yield base
        return
    host = socket.gethostname()
    key = content_hash(spec.host, str(spec.port), base, host)[:16]
    for slot in itertools.count():
        path = os.path.join(tempfile.gettempdir(), f"eventhub-mqtt-{key}-{slot}.lock")
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield f"{base}-{host}-{slot}"
        finally:
            os.close(fd)  # releases the lock
        return


class _Client(gmqtt.Client):  # type: ignore[misc]
    """gmqtt's client, minus its own reconnecting and its own QoS 1/2 acknowledgements.

    gmqtt runs an async ``on_message`` in a task per message and acknowledges when it returns;
    here a received QoS 1/2 message goes to ``received`` (plain call, no task), and
    :meth:`acknowledge` sends the acknowledgements of a batch at once, in order."""

    acks_open = True
    received: Any = None  # (topic, payload, qos, properties, mid) -> None, set by the session

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        handler = self._package_handler
        for qos in (1, 2):
            name = f"_handle_qos_{qos}_publish_packet"
            if not callable(getattr(handler, name, None)):
                raise RuntimeError(f"this gmqtt has no {name}: the connector cannot ack")
            setattr(handler, name, functools.partial(self._publish_received, qos))

    def _publish_received(
        self, qos: int, mid: int, packet: bytes, topic: str | bytes, properties: Any
    ) -> None:
        self.received(topic, packet, qos, properties, mid)

    async def reconnect(self, delay: bool = False) -> None:
        """Never: the connector fails instead and the supervisor starts a new session."""

    def acknowledge(self, received: list[_Received]) -> None:
        """PUBACK / PUBREC each QoS 1/2 message of ``received``, in order, in one write."""
        if not self.acks_open:
            return
        protocol = getattr(self._connection, "_protocol", None)
        if protocol is None:
            return  # never connected, or gone: the broker redelivers
        packets = [
            CommandWithMidPacket.build_package(
                MQTTCommands.PUBACK if item.qos == 1 else MQTTCommands.PUBREC,
                item.mid,
                False,
                proto_ver=protocol.proto_ver,
            )
            for item in received
            if item.mid is not None
        ]
        if packets:
            protocol.write_data(b"".join(packets))

    def _send_command_with_mid(self, cmd: int, mid: int, dup: bool, reason_code: int = 0) -> None:
        # Closed once the session ends: a message that was not delivered is not acknowledged.
        if self.acks_open:
            super()._send_command_with_mid(cmd, mid, dup, reason_code=reason_code)


@dataclass(eq=False, slots=True)
class _Received:
    topic: str
    payload: bytes
    qos: int
    properties: dict[str, Any]
    mid: int | None  # None for QoS 0: nothing to acknowledge


class _Session:
    """One connection: gmqtt hands each message to ``_received``, which queues it; ``_consume``
    (one task, in arrival order) starts the delivery of each batch, and the batches are
    acknowledged in arrival order once delivered."""

    def __init__(self, ctx: SourceContext, spec: MQTTSpec, cid: str) -> None:
        self._ctx = ctx
        self._spec = spec
        self._cid = cid
        self._v5 = spec.version == "5"
        self._arrived: collections.deque[_Received] = collections.deque()  # bounded by the window
        self._nonempty = asyncio.Event()
        self._lost = asyncio.Event()
        self._lost_reason = "the connection to the MQTT broker was lost"
        self._session_present = False
        self._suback: asyncio.Future[tuple[int, ...]] | None = None
        properties = {"receive_maximum": _RECEIVE_MAXIMUM}
        if self._v5:
            properties["session_expiry_interval"] = min(int(spec.session_expiry), 0xFFFFFFFF)
        client = _Client(cid, clean_session=False, optimistic_acknowledgement=False, **properties)
        client.on_message = self._on_message
        client.received = self._received
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        self._client = client

    async def run(self) -> None:
        consume = asyncio.create_task(self._consume(), name=f"mqtt:{self._ctx.name}")
        lost = asyncio.create_task(self._lost.wait())
        try:
            await self._open()
            await asyncio.wait({consume, lost}, return_when=asyncio.FIRST_COMPLETED)
            if consume.done():
                consume.result()
            raise ConnectionError(self._lost_reason)
        finally:
            consume.cancel()
            lost.cancel()
            await asyncio.gather(consume, lost, return_exceptions=True)
            await self._close()

    async def _open(self) -> None:
        spec, client = self._spec, self._client
        if spec.username is not None:
            password = spec.password.get_secret_value() if spec.password else None
            client.set_auth_credentials(spec.username, password)
        tls = await asyncio.to_thread(ssl_context, spec.tls) if spec.tls else False
        where = f"MQTT broker {spec.host}:{spec.port}"
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                await client.connect(
                    spec.host,
                    spec.port,
                    ssl=tls,
                    keepalive=_KEEPALIVE,
                    version=MQTTv50 if self._v5 else MQTTv311,
                )
        except MQTTConnectError as exc:
            raise ConnectionError(f"the {where} refused the connection: {exc}") from exc
        except TimeoutError:
            raise ConnectionError(f"no answer (CONNACK) from the {where}") from None
        log.info(
            "mqtt_connected",
            source=self._ctx.name,
            client_id=self._cid,
            session_present=self._session_present,
        )
        await self._subscribe()

    async def _subscribe(self) -> None:
        """Subscribe what the session lacks; drop what the spec no longer lists."""
        spec, client = self._spec, self._client
        wanted = {_filter(spec, topic): int(spec.qos) for topic in spec.topics}
        state = await self._ctx.load_state() or {}
        had: dict[str, int] = state.get("sessions", {}).get(self._cid, {})
        if not self._session_present:
            had = {}
        stale = [f.encode() for f in had if f not in wanted]
        if stale:
            client.unsubscribe(stale)
        missing = [f for f, qos in wanted.items() if had.get(f) != qos]
        if missing:
            retain_handling = 1 if self._v5 else 0  # MQTT 5: retained ones only when new
            subscriptions = [
                gmqtt.Subscription(f, qos=spec.qos, retain_handling_options=retain_handling)
                for f in missing
            ]
            self._suback = asyncio.get_running_loop().create_future()
            client.subscribe(subscriptions)
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                granted = await self._suback
            pairs = zip(missing, granted, strict=False)
            refused = [f"{f} ({code:#x})" for f, code in pairs if code >= 0x80]
            if refused:
                raise ConnectionError(f"the broker refused to subscribe {', '.join(refused)}")
            if any(code < spec.qos for code in granted):
                log.warning("mqtt_qos_downgraded", source=self._ctx.name, granted=granted)
        if stale or missing:
            await self._remember(wanted)

    async def _remember(self, wanted: dict[str, int]) -> None:
        state = await self._ctx.load_state() or {}
        sessions = dict(state.get("sessions", {}))
        sessions.pop(self._cid, None)
        sessions[self._cid] = wanted
        kept = dict(list(sessions.items())[-_KEPT_SESSIONS:])
        await self._ctx.save_state({**state, "sessions": kept})

    async def _close(self) -> None:
        self._client.acks_open = False
        try:
            if not self._lost.is_set():
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await self._client.disconnect()
        except (OSError, TimeoutError) as exc:
            log.info("mqtt_close_failed", source=self._ctx.name, error=str(exc))

    async def _consume(self) -> None:
        batch_size = min(_BATCH, self._spec.high_water_mark)
        async with self._ctx.deliveries(_WINDOW) as deliveries:
            while True:
                await self._nonempty.wait()
                arrived = self._arrived
                batch = [arrived.popleft() for _ in range(min(batch_size, len(arrived)))]
                if not arrived:
                    self._nonempty.clear()
                await deliveries.start(self._deliver(batch), functools.partial(self._ack, batch))

    def _ack(self, batch: list[_Received]) -> None:
        self._client.acknowledge(batch)

    async def _deliver(self, batch: list[_Received]) -> None:
        events: list[Event] = []
        for item in batch:
            try:
                events.extend(
                    publish_events(self._spec, item.topic, item.payload, item.qos, item.properties)
                )
            except Rejected as exc:
                await self._reject(item, exc.reason)
        if events:
            await self._ctx.deliver(events)

    async def _reject(self, item: _Received, reason: str) -> None:
        spec = self._spec
        try:
            message = to_message(spec, item.topic, item.payload, item.qos, item.properties)
            message_id, metadata = message.id, dict(message.extensions)
        except Exception:  # what failed the conversion: keep the message with less context
            message_id, metadata = content_hash(item.topic, item.payload), {"topic": item.topic}
        metadata = {k: utf8(v) for k, v in metadata.items()}
        await self._ctx.reject(utf8(message_id), reason, item.payload, metadata)

    def _received(
        self, topic: str | bytes, payload: bytes, qos: int, properties: Any, mid: int | None
    ) -> None:
        if isinstance(topic, bytes):  # gmqtt passes a topic that is not UTF-8 undecoded
            topic = topic.decode("utf-8", "replace")
        self._arrived.append(_Received(topic, payload, qos, properties, mid))
        self._nonempty.set()

    def _on_message(
        self, client: Any, topic: str | bytes, payload: bytes, qos: int, props: Any
    ) -> int:
        """QoS 0 only (gmqtt calls it for those): nothing to acknowledge."""
        self._received(topic, payload, qos, props, None)
        return 0

    def _on_connect(self, client: Any, flags: int, rc: int, properties: Any) -> None:
        self._session_present = bool(flags)

    def _on_disconnect(self, client: Any, packet: Any, exc: Any = None) -> None:
        if self._lost.is_set():
            return
        if isinstance(packet, bytes | bytearray) and packet:
            reason = packet[0]
            self._lost_reason = f"the MQTT broker disconnected (reason {reason:#x})"
            if reason == _SESSION_TAKEN_OVER:
                self._lost_reason = (
                    f"another client connected with client id {self._cid}: give each hub "
                    "process its own (set sharedGroup to share the source between processes)"
                )
        self._lost.set()
        if self._suback is not None and not self._suback.done():
            self._suback.set_exception(ConnectionError(self._lost_reason))

    def _on_subscribe(self, client: Any, mid: int, granted: Any, properties: Any) -> None:
        if self._suback is not None and not self._suback.done():
            self._suback.set_result(tuple(int(code) for code in granted))


def _filter(spec: MQTTSpec, topic: str) -> str:
    return f"$share/{spec.shared_group}/{topic}" if spec.shared_group else topic


def publish_events(
    spec: MQTTSpec, topic: str, payload: bytes, qos: int, properties: dict[str, Any]
) -> list[Event]:
    """The events of one PUBLISH; raises :class:`Rejected` for one that cannot become any."""
    return convert(
        lambda: to_events(to_message(spec, topic, payload, qos, properties), spec, DEFAULT_TYPE)
    )


def to_message(
    spec: MQTTSpec, topic: str, payload: bytes, qos: int, properties: dict[str, Any]
) -> Message:
    """What was received, described for :func:`connectors.common.to_events`."""
    content_type = _first(properties, "content_type")
    user = [(str(k), str(v)) for k, v in properties.get("user_property") or []]
    attributes: dict[str, str] = {}
    for name, value in user:
        if _ATTRIBUTE.match(name):
            attributes.setdefault(name, value)
    binary = "specversion" in attributes
    if content_type is None and not binary and spec.format == "auto" and _structured(payload):
        content_type = STRUCTURED  # MQTT 3.1.1's binding: the JSON event format is implied
    retain = bool(properties.get("retain"))
    extensions = {k: v for k, v in attributes.items() if k not in _CONTEXT}
    extensions.update(topic=topic, qos=str(qos), retain="true" if retain else "false")
    return Message(
        payload=payload,
        id=_message_id(topic, payload, properties, user),
        source=_source(spec, topic),
        content_type=content_type,
        ce_attributes=attributes if binary else None,
        subject=topic,
        extensions=extensions,
        attribute_prefix="user property ",
    )


def _message_id(
    topic: str, payload: bytes, properties: dict[str, Any], user: list[tuple[str, str]]
) -> str:
    """What a redelivery keeps: not DUP, retain or message expiry, which the broker changes."""
    parts: list[bytes | str] = [topic, payload]
    for name in ("content_type", "correlation_data", "response_topic", "payload_format_id"):
        value = _first(properties, name)
        parts.append(b"" if value is None else value if isinstance(value, bytes) else str(value))
    for name, value in user:
        parts += [name, value]
    return content_hash(*parts)


def _source(spec: MQTTSpec, topic: str) -> str:
    scheme, default_port = ("mqtts", 8883) if spec.tls else ("mqtt", 1883)
    port = "" if spec.port == default_port else f":{spec.port}"
    return f"{scheme}://{spec.host}{port}/{_quoted(topic)}"


@functools.lru_cache(maxsize=1024)
def _quoted(topic: str) -> str:
    """The topic percent-encoded for a URL (a source has few topics, each quoted once)."""
    return quote(topic, safe="/")


def _structured(payload: bytes) -> bool:
    """A JSON object with a top-level ``specversion``; cheap checks first, most payloads stop."""
    if payload.lstrip()[:1] != b"{" or _SPECVERSION.search(payload) is None:
        return False
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False  # not recognisably a CloudEvent: wrapped
    return isinstance(doc, dict) and "specversion" in doc


def _first(properties: dict[str, Any], name: str) -> Any:
    values = properties.get(name)
    return values[0] if values else None
