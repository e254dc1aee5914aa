"""AMQP decoding that hands every message over: what pamqp cannot read becomes a value that the
RabbitMQ connector rejects, instead of an error that closes the channel.

pamqp (aiormq's codec) raises while it decodes a message's content header when:

- a timestamp (the ``timestamp`` property, or a ``T`` value in the headers) lies past the year
  9999, a timestamp in microseconds say: ``datetime`` cannot hold it;
- a header name, or a short string property (``content-type``, ``message-id``...), is not UTF-8.

aiormq then closes the channel, RabbitMQ requeues the message and gives it to the next consumer,
which fails the same way: the queue is stuck behind that message for good. :func:`install`
replaces those three decoders, process-wide (the codec has no per-connection hook): an
unreadable timestamp becomes a :class:`BadTimestamp` (a ``datetime`` that keeps the number
received), text that is not UTF-8 keeps its bytes as surrogate escapes. The connector rejects
a message holding either (:func:`unreadable`), so it becomes a dead letter of the source and the
next message flows. Everything pamqp reads today it still reads the same way.

:class:`Delivery` is how the connector reads a message aiormq delivered.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from aiormq.abc import DeliveredMessage
from pamqp import decode

from connectors.common import is_utf8

_Decoder = Callable[[bytes], tuple[int, Any]]
_installed = False


class BadTimestamp(datetime):
    """An AMQP timestamp that no ``datetime`` can hold; ``raw`` is the number on the wire."""

    raw: int

    def __new__(cls, raw: int) -> BadTimestamp:
        moment = super().__new__(cls, 1, 1, 1, tzinfo=UTC)
        moment.raw = raw
        return moment


def install() -> None:
    """Use the lenient decoders from now on (idempotent; fails loudly if pamqp changed)."""
    global _installed
    if _installed:
        return
    originals = (decode.METHODS, decode.TABLE_MAPPING)
    if not all(isinstance(table, dict) for table in originals):
        raise RuntimeError("this pamqp has no decoder tables: AMQP input cannot be made safe")
    timestamp = _lenient_timestamp(decode.METHODS["timestamp"])
    short_str = _lenient_short_str(decode.METHODS["shortstr"])
    decode.METHODS.update(timestamp=timestamp, shortstr=short_str, table=field_table)
    decode.TABLE_MAPPING.update({b"T": timestamp, b"F": field_table})
    _installed = True


def unreadable(timestamp: datetime | None, headers: Mapping[str, Any]) -> str | None:
    """What of a message the lenient decoders could not read, as a rejection reason; else None."""
    if isinstance(timestamp, BadTimestamp):
        return (
            f"invalid-time: the timestamp property {timestamp.raw} is past the year 9999"
            " (as seconds, or milliseconds above 2^32)"
        )
    for name, value in headers.items():
        if not is_utf8(name):
            return f"invalid-header: the header name {name!r} is not UTF-8"
        if isinstance(value, BadTimestamp):
            return f"invalid-header: header {name}: timestamp {value.raw} is past the year 9999"
    return None


def _lenient_timestamp(original: _Decoder) -> _Decoder:
    def timestamp(value: bytes) -> tuple[int, datetime]:
        try:
            return original(value)
        except (ValueError, OverflowError, OSError):
            if len(value) < 8:
                raise  # truncated: a broken frame, not an odd value
            return 8, BadTimestamp(struct.unpack(">Q", value[:8])[0])

    return timestamp


def _lenient_short_str(original: _Decoder) -> _Decoder:
    def short_str(value: bytes) -> tuple[int, str]:
        try:
            return original(value)
        except UnicodeDecodeError:
            length = value[0]
            return length + 1, value[1 : length + 1].decode("utf-8", "surrogateescape")

    return short_str


def field_table(value: bytes) -> tuple[int, dict[str, Any]]:
    """pamqp's ``field_table``, but a name that is not UTF-8 keeps its bytes (surrogateescape)."""
    try:
        length = struct.unpack(">I", value[0:4])[0]
        offset = 4
        end = offset + length
        if end > len(value):
            raise ValueError("Field table length exceeds available data")
        table: dict[str, Any] = {}
        while offset < end:
            key_length = value[offset]
            offset += 1
            if offset + key_length > end:
                raise ValueError("Field table key length exceeds data")
            key = value[offset : offset + key_length].decode("utf-8", "surrogateescape")
            offset += key_length
            consumed, result = decode.embedded_value(value[offset:])
            offset += consumed
            table[key] = result
        return end, table
    except (struct.error, TypeError, IndexError) as err:
        raise ValueError("Could not unpack data") from err


class AMQPMessage(Protocol):
    """What the connector reads of a message: aio-pika's ``IncomingMessage`` has it, and so has
    the lighter :class:`Delivery` the connector consumes."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> Mapping[str, Any] | None: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def timestamp(self) -> datetime | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def type(self) -> str | None: ...
    @property
    def app_id(self) -> str | None: ...
    @property
    def exchange(self) -> str | None: ...
    @property
    def routing_key(self) -> str | None: ...


class Delivery:
    """A message as aiormq delivered it, read under ``IncomingMessage``'s names: building an
    ``IncomingMessage`` (and aio-pika's extra task per message) cost more than the conversion."""

    __slots__ = ("_properties", "body", "delivery_tag", "exchange", "routing_key")

    def __init__(self, message: DeliveredMessage) -> None:
        self.body: bytes = message.body
        self.delivery_tag: int = message.delivery_tag or 0
        self.exchange: str | None = message.exchange
        self.routing_key: str | None = message.routing_key
        self._properties = message.header.properties

    @property
    def headers(self) -> Mapping[str, Any] | None:
        return self._properties.headers

    @property
    def content_type(self) -> str | None:
        return self._properties.content_type

    @property
    def message_id(self) -> str | None:
        return self._properties.message_id

    @property
    def timestamp(self) -> datetime | None:
        return self._properties.timestamp

    @property
    def correlation_id(self) -> str | None:
        return self._properties.correlation_id

    @property
    def type(self) -> str | None:
        return self._properties.message_type

    @property
    def app_id(self) -> str | None:
        return self._properties.app_id
