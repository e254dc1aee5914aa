"""RabbitMQ source: consume one queue (AMQP 0-9-1: aio-pika connects, aiormq consumes), manual acks.

=============  ====================================================================================
Outcome        What the connector does on the AMQP channel
=============  ====================================================================================
ack            ``basic.ack`` (``multiple`` up to the last message of a batch) only after
               ``ctx.deliver`` returned for that batch and every earlier one, i.e. once every
               invocation of every message up to that delivery tag is durably in JetStream.
               Up to 3 batches are delivered at once (their PubAcks in flight together); the
               acks leave in delivery-tag order.
nack           Never sent one by one: a failure (``deliver`` raises, the connection or channel
               drops, the broker cancels the consumer, the hub stops) leaves the run, which closes
               the connection; RabbitMQ requeues every unacknowledged message and redelivers it
               (``redelivered`` flag set), to this or another consumer of the queue.
reject         A message that cannot become an event goes to ``ctx.reject`` (a durable dead letter
               of the source), then it is acked with its batch: it never comes back.
throttled      ``deliver`` waits while ``ctx.room`` is clear; the channel's ``prefetch`` bounds what
               the broker sends meanwhile. aiormq answers heartbeats on its own reader task, so the
               connection stays up. RabbitMQ's ``consumer_timeout`` (30 min by default) closes a
               channel whose deliveries stay unacked longer: the run then restarts and the messages
               are redelivered, deduplicated by their deterministic ids.
=============  ====================================================================================

A redelivered message keeps its event id (the AMQP ``message-id``, else a digest of the message's
stable content), so JetStream deduplicates the invocations of a message acked too late.
Several hub processes may consume the same queue: RabbitMQ gives each message to one consumer.

CloudEvents AMQP binding, for ``format: auto`` (the rules are in :mod:`connectors.common`):

- binary mode: application properties (headers) ``cloudEvents:<attr>`` or ``cloudEvents_<attr>``
  with a ``specversion``; ``datacontenttype`` is the ``content-type`` property; ``time`` may be
  a string, an AMQP timestamp or an integer of milliseconds since the epoch.
- structured mode: ``content-type: application/cloudevents+json``.
- anything else is wrapped: see :meth:`RabbitMQConnector.message` for the attributes.

A message that cannot become an event is rejected (:meth:`RabbitMQConnector.events`): besides
the common reasons (bad charset, invalid CloudEvent, too large), a ``timestamp`` property or a
``T`` header value past the year 9999 (a timestamp in microseconds), a header name or a short
string property that is not UTF-8 (read leniently: :mod:`connectors.amqpwire`; pamqp alone
would close the channel on them, and RabbitMQ would hand the same message out again forever),
a ``cloudEvents_time`` number out of range, or any error of the conversion.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import quote, unquote

import aio_pika
import aiormq.abc
import orjson
import structlog
from aio_pika.abc import AbstractChannel, AbstractQueue
from aiormq.exceptions import AMQPError, ChannelInvalidStateError
from yarl import URL

from connectors import amqpwire
from connectors.common import (
    Message,
    Rejected,
    content_hash,
    convert,
    ssl_context,
    to_events,
    utf8,
)
from eventhub.events import Event, canonical
from eventhub.ports import Connector
from eventhub.resources import Resource
from eventhub.sources import SourceContext, raise_first
from eventhub.sourcespecs import RabbitMQSpec

log = structlog.get_logger(__name__)

DEFAULT_TYPE = "eventhub.rabbitmq.message"
_CE_PREFIXES = ("cloudEvents:", "cloudEvents_")
_BATCH = 100  # messages per ctx.deliver, at most (and at most what the broker has sent)
_GATHER_ROUNDS = 4
_WINDOW = 3  # batches in delivery at once (the channel's prefetch bounds their messages)
_LAG_EVERY = 5.0
_CONNECT_TIMEOUT = 10.0
# Context attribute names a header must not shadow when it becomes an extension.
_RESERVED = frozenset(
    {"specversion", "id", "source", "type", "subject", "time", "datacontenttype", "dataschema"}
)
_Item = amqpwire.Delivery | BaseException
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class RabbitMQConnector:
    def __init__(self, name: str, spec: RabbitMQSpec) -> None:
        self.name = name
        self.spec = spec
        url = URL(spec.url.get_secret_value())
        if spec.tls is not None and url.scheme == "amqp":
            url = url.with_scheme("amqps")  # tls settings mean TLS, whatever the URL said
        self._url = url
        vhost = unquote(url.raw_path[1:]) or "/"
        self.event_source = f"amqp://{quote(vhost, safe='')}/{quote(spec.queue, safe='')}"

    async def run(self, ctx: SourceContext) -> None:
        amqpwire.install()  # before anything is decoded: an odd value must not close the channel
        connection = await aio_pika.connect(
            self._url,
            ssl_context=ssl_context(self.spec.tls) if self.spec.tls else None,
            timeout=_CONNECT_TIMEOUT,
            client_properties={"connection_name": f"eventhub source {self.name}"},
        )
        # Leaving this block closes the connection: RabbitMQ requeues whatever is unacked.
        async with connection:
            channel = await connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=self.spec.prefetch)
            queue = await self._queue(channel)
            inbox: asyncio.Queue[_Item] = asyncio.Queue(maxsize=self.spec.prefetch + 2)
            underlay = await channel.get_underlay_channel()
            await self._subscribe(channel, underlay, queue.name, inbox)
            log.info("rabbitmq_consuming", source=self.name, queue=queue.name)
            lag = asyncio.create_task(self._track_lag(ctx, underlay), name=f"lag:{self.name}")
            try:
                await self._consume(ctx, underlay, inbox)
            finally:
                lag.cancel()
                await asyncio.wait([lag])

    async def _queue(self, channel: AbstractChannel) -> AbstractQueue:
        """The queue to consume: declared and bound with ``declare``, else it must exist."""
        declare = self.spec.declare
        if declare is None:
            return await channel.declare_queue(self.spec.queue, passive=True)
        exchange = await channel.declare_exchange(
            declare.exchange, declare.exchange_type, durable=declare.durable
        )
        queue = await channel.declare_queue(self.spec.queue, durable=declare.durable)
        for key in declare.routing_keys:
            await queue.bind(exchange, routing_key=key)
        return queue

    async def _subscribe(
        self,
        channel: AbstractChannel,
        underlay: aiormq.abc.AbstractChannel,
        queue: str,
        inbox: asyncio.Queue[_Item],
    ) -> None:
        """Messages arrive in ``inbox`` in delivery order, followed by an exception if the
        channel closes or the broker cancels the consumer (the queue was deleted). They are
        consumed on aiormq's channel directly: aiormq runs the callback in a task per message,
        in delivery order, and the callback's first step queues it.

        ``inbox`` never fills: the broker sends at most ``prefetch`` unacked messages, and the
        two spare places are for the stop signals."""

        def closed(_sender: object, exc: BaseException | None = None) -> None:
            inbox.put_nowait(ConnectionError(f"the AMQP channel closed: {exc}"))

        def cancelled(_frame: object) -> None:
            inbox.put_nowait(ConnectionError(f"the broker cancelled the consumer of {queue}"))

        async def received(message: aiormq.abc.DeliveredMessage) -> None:
            inbox.put_nowait(amqpwire.Delivery(message))

        channel.close_callbacks.add(closed)
        underlay.on_consumer_cancel_callbacks.add(cancelled)
        await underlay.basic_consume(queue, received, no_ack=False)

    async def _consume(
        self,
        ctx: SourceContext,
        channel: aiormq.abc.AbstractChannel,
        inbox: asyncio.Queue[_Item],
    ) -> None:
        """Batches are delivered concurrently (up to ``_WINDOW``) and acked in delivery order:
        a batch's ``multiple`` ack covers its own messages and every earlier delivery tag, all
        of which belong to batches already acked or to this one."""
        acks = _Acks(channel)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(acks.send(), name=f"amqp-acks:{self.name}")
                async with ctx.deliveries(_WINDOW) as deliveries:
                    while True:
                        batch = await _next_batch(inbox)
                        ack = functools.partial(acks.ack, batch[-1].delivery_tag)
                        await deliveries.start(self._deliver(ctx, batch), ack)
        except ExceptionGroup as group:  # one failure is the story: the supervisor reports it
            raise_first(group)

    async def _deliver(self, ctx: SourceContext, batch: list[amqpwire.Delivery]) -> None:
        events: list[Event] = []
        for message in batch:
            try:
                events.extend(self.events(message))
            except Rejected as exc:  # stored now, acked with its batch
                await self._reject(ctx, message, exc.reason)
        if events:
            await ctx.deliver(events)

    def events(self, message: amqpwire.AMQPMessage) -> list[Event]:
        """The events of one message; raises :class:`Rejected` for one that cannot become any."""
        return convert(lambda: to_events(self.message(message), self.spec, DEFAULT_TYPE))

    async def _reject(self, ctx: SourceContext, message: amqpwire.AMQPMessage, reason: str) -> None:
        """Its dead letter, with what of its metadata can be stored whatever the message held."""
        try:
            metadata = {k: utf8(v) for k, v in self._extensions(message).items()}
        except Exception:  # the metadata is a courtesy: the message itself is what is kept
            metadata = {}
        await ctx.reject(utf8(self._id(message)), reason, message.body, metadata)

    def message(self, message: amqpwire.AMQPMessage) -> Message:
        """A wrapped message becomes an event with:

        - ``id``: the AMQP ``message-id``; without one, a digest of exchange, routing key,
          ``timestamp``, ``correlation-id``, ``type``, ``app-id``, the headers not starting with
          ``x-`` and the body (the same on a redelivery, so deduplicated; two identical messages
          without ``message-id`` and ``timestamp`` are deduplicated too: set either);
        - ``source``: ``amqp://<vhost>/<queue>``, both percent-encoded (``amqp://%2F/orders``);
        - ``type``: the source's ``eventType``, else ``eventhub.rabbitmq.message``;
        - ``subject``: the routing key; ``time``: the ``timestamp`` property;
          ``datacontenttype``: the ``content-type`` property;
        - extensions ``exchange``, ``routingkey``, ``correlationid`` and ``appid`` (each when not
          empty), and each header whose name is a valid extension name (lowercase letters and
          digits, not a context attribute) and whose value is a string, number, boolean or
          timestamp, in canonical string form.
        """
        unreadable = amqpwire.unreadable(message.timestamp, message.headers or {})
        if unreadable is not None:
            raise Rejected(unreadable)
        return Message(
            payload=message.body,
            id=self._id(message),
            source=self.event_source,
            content_type=message.content_type,
            ce_attributes=_ce_attributes(message.headers or {}),
            subject=message.routing_key or None,
            time=canonical(message.timestamp) if message.timestamp else None,
            extensions=self._extensions(message),
            attribute_prefix="cloudEvents:",
        )

    @staticmethod
    def _extensions(message: amqpwire.AMQPMessage) -> dict[str, str]:
        headers: Mapping[str, Any] = message.headers or {}
        extensions = {
            k: text
            for k, v in headers.items()
            if _extension_name(k) and (text := _text(v)) is not None
        }
        for name, value in (
            ("exchange", message.exchange),
            ("routingkey", message.routing_key),
            ("correlationid", message.correlation_id),
            ("appid", message.app_id),
        ):
            if value:
                extensions[name] = value
        return extensions

    @staticmethod
    def _id(message: amqpwire.AMQPMessage) -> str:
        if message.message_id:
            return message.message_id
        # x- headers are the broker's (x-death, x-delivery-count): they change on redelivery.
        headers: Mapping[str, Any] = message.headers or {}
        stable = {k: v for k, v in headers.items() if not k.startswith("x-")}
        return content_hash(
            message.exchange or "",
            message.routing_key or "",
            canonical(message.timestamp) if message.timestamp else "",
            message.correlation_id or "",
            message.type or "",
            message.app_id or "",
            _digestible(stable),
            message.body,
        )

    async def _track_lag(self, ctx: SourceContext, channel: aiormq.abc.AbstractChannel) -> None:
        """The queue's ready messages, every few seconds, until the channel goes."""
        while True:
            try:
                declared = await channel.queue_declare(self.spec.queue, passive=True)
            except (AMQPError, ChannelInvalidStateError):
                return  # the consume loop sees the channel close and raises
            if declared.message_count is not None:
                ctx.set_lag(declared.message_count)
            await asyncio.sleep(_LAG_EVERY)


class _Acks:
    """The delivery tag of the last message of the latest batch delivered (with every earlier
    one): one task sends its ``basic.ack multiple``, so acks that pile up while one is written
    leave as one."""

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self._channel = channel
        self._last: int | None = None
        self._ready = asyncio.Event()

    def ack(self, delivery_tag: int) -> None:
        self._last = delivery_tag
        self._ready.set()

    async def send(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            delivery_tag, self._last = self._last, None
            if delivery_tag is not None:
                await self._channel.basic_ack(delivery_tag, multiple=True)


async def _next_batch(inbox: asyncio.Queue[_Item]) -> list[amqpwire.Delivery]:
    """Wait for one message, then take what has already arrived, up to ``_BATCH``.

    aiormq hands each message over in a task of its own, so the messages of one socket read
    arrive over the next few loop iterations: waiting for a couple of them makes batches (and
    NATS writes) larger for the cost of microseconds."""
    batch: list[amqpwire.Delivery] = []
    item = await inbox.get()
    for _ in range(_GATHER_ROUNDS):
        if inbox.qsize() + 1 >= _BATCH:
            break
        await asyncio.sleep(0)
    while True:
        if isinstance(item, BaseException):
            # The channel is gone: its unacked messages (this batch too) are requeued.
            raise item
        batch.append(item)
        if len(batch) >= _BATCH or inbox.empty():
            return batch
        item = inbox.get_nowait()


def _ce_attributes(headers: Mapping[str, Any]) -> dict[str, str] | None:
    """Binary-mode attributes (prefix removed), when the headers carry a ``specversion``."""
    if not any(f"{p}specversion" in headers for p in _CE_PREFIXES):
        return None
    attributes: dict[str, str] = {}
    for key, value in headers.items():
        prefix = next((p for p in _CE_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            continue
        name = key[len(prefix) :]
        if name == "time" and isinstance(value, int) and not isinstance(value, bool):
            value = _millis(key, value)  # AMQP binding: milliseconds
        text = _text(value)
        if text is None:
            raise Rejected(f"invalid-cloudevent: header {key} is not a string, number or time")
        attributes.setdefault(name, text)
    return attributes


def _millis(header: str, value: int) -> datetime:
    try:
        return _EPOCH + timedelta(milliseconds=value)
    except OverflowError:  # past the year 9999 or before 1
        raise Rejected(
            f"invalid-cloudevent: header {header}: {value} is out of range as milliseconds"
            " since the epoch"
        ) from None


def _digestible(headers: Mapping[str, Any]) -> bytes:
    """The headers as bytes for the message's digest: the same for the same headers, whatever
    their values (nested deeper than JSON allows, integers past 64 bits, names not UTF-8)."""
    try:
        return orjson.dumps(headers, default=str, option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONEncodeError, TypeError):
        items = sorted(headers.items(), key=lambda item: item[0])
        return repr(items).encode("utf-8", "surrogatepass")


def _text(value: object) -> str | None:
    """A header value in canonical string form; None for tables, arrays and void."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, amqpwire.BadTimestamp):
        return None
    if isinstance(value, str | bool | int | float | Decimal | datetime):
        return canonical(value)
    return None


def _extension_name(name: str) -> bool:
    return name.isascii() and name.isalnum() and name.islower() and name not in _RESERVED


def connector(resource: Resource) -> Connector:
    spec = resource.model
    if not isinstance(spec, RabbitMQSpec):
        raise TypeError(f"source {resource.name} is not of type rabbitmq")
    return RabbitMQConnector(resource.name, spec)
