"""How every connector turns a transport message into CloudEvents (the README's table).

A connector describes what it received as a :class:`Message`; :func:`to_events` applies the
source's ``format``:

- ``auto``: a message that already is a CloudEvent passes through unchanged: binary mode (the
  attributes the transport's protocol binding carries: Kafka ``ce_`` headers, AMQP
  ``cloudEvents:`` / ``cloudEvents_`` application properties, MQTT 5 user properties) or
  structured mode (``application/cloudevents+json`` content type). Anything else is wrapped.
- ``raw``: always wrapped.
- ``s3``: the payload is an S3 / MinIO bucket notification; one event per record
  (:func:`s3_events`).

A wrapped message becomes an event with the connector's deterministic ``id``, its ``source``,
``type`` = the source's ``eventType`` or the connector's default, the transport's ``subject`` and
``time`` when it has them, ``datacontenttype`` = the message's content type, the payload as data
byte for byte, and transport metadata as extensions. A message that cannot become an event raises
:class:`Rejected` with a reason; the connector hands it to ``ctx.reject`` and moves on.

Each connector converts one message through :func:`convert`, the one place where any other error
of a conversion (a value no rule foresaw) also becomes :class:`Rejected` (code
``conversion-failed``, naming the error), so that no message can stop the ones behind it. Only the
conversion is covered: a failure to enqueue or to store the dead letter still fails the connector,
which restarts and gets the message again.
"""

from __future__ import annotations

import functools
import hashlib
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

import orjson

from eventhub.errors import InvalidInput
from eventhub.events import STRUCTURED, Event, from_attributes, parse_structured
from eventhub.sourcespecs import TLS

_MAX_REASON = 500  # characters of a rejection reason kept (it is stored with the dead letter)
# A value that ``Event.binary_headers`` sends as it is: printable ASCII but space, '"' and '%'.
_AS_IS = re.compile(r"[!#$&-~]*")


class Rejected(Exception):
    """A message that cannot become an event; ``reason`` starts with a short code.

    The reason quotes what was received, so it is made printable (control characters and bytes
    that were not UTF-8 escaped) and cut to ``_MAX_REASON`` characters: storing it never fails."""

    def __init__(self, reason: str) -> None:
        reason = printable(reason)
        if len(reason) > _MAX_REASON:
            reason = reason[: _MAX_REASON - 3] + "..."
        super().__init__(reason)
        self.reason = reason


def convert(make: Callable[[], list[Event]]) -> list[Event]:
    """The events of one message (``make`` converts it), or :class:`Rejected`: any other error
    of the conversion becomes a rejection (``conversion-failed: <error>``) instead of failing
    the connector, which would get the same message again, forever. ``CancelledError`` (not an
    ``Exception``) passes."""
    try:
        return make()
    except Rejected:
        raise
    except Exception as exc:  # a conversion bug must not stop the transport: reject and go on
        raise Rejected(f"conversion-failed: {type(exc).__name__}: {exc}") from exc


def printable(text: str) -> str:
    """``text`` with control characters, other unprintable ones and surrogate escapes (bytes
    that were not UTF-8) written as Python escapes."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def is_utf8(text: str) -> bool:
    """Whether ``text`` is UTF-8 as received: no surrogate escapes of undecodable bytes."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def utf8(text: str) -> str:
    """``text`` as it can be stored and sent: undecodable bytes (surrogate escapes) as U+FFFD."""
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


@dataclass(frozen=True)
class Message:
    payload: bytes
    id: str  # deterministic from the transport's identity (topic/partition/offset, ...)
    source: str  # the CloudEvents source of wrapped events, e.g. kafka://orders
    content_type: str | None = None
    ce_attributes: Mapping[str, str] | None = None  # binary-mode attributes, prefix removed
    subject: str | None = None
    time: str | None = None
    extensions: Mapping[str, str] = field(default_factory=dict)
    attribute_prefix: str = "ce_"  # how the transport names attributes, for error messages


def to_events(message: Message, spec: Any, default_type: str) -> list[Event]:
    if len(message.payload) > spec.max_message_size:
        raise Rejected(
            f"too-large: {len(message.payload)} bytes, above maxMessageSize {spec.max_message_size}"
        )
    _check_charset(message)
    if spec.format == "s3":
        return [sendable(e.attributes, e.data) for e in s3_events(message.payload)]
    if spec.format == "auto":
        passed = _passthrough(message)
        if passed is not None:
            return [sendable(passed.attributes, passed.data)]
    return [sendable(_wrapped(message, spec.event_type or default_type), message.payload)]


def sendable(attributes: Mapping[str, str], data: bytes) -> Event:
    """The event, once every attribute is known to be text that can be sent (a transport may
    hand over a name or a value that was not UTF-8, kept as surrogate escapes), with its
    binary-mode headers worked out here, once: most values need no percent-encoding, which
    ``Event.binary_headers`` would otherwise do for each invocation. The headers are the same."""
    headers: dict[str, str] = {}
    for name, value in attributes.items():
        if not name.isascii():
            _check_utf8(name, name)
        if name == "datacontenttype":
            if not value.isascii():
                _check_utf8(name, value)
            headers["content-type"] = value
        elif _AS_IS.fullmatch(value):  # printable ASCII: sent as it is
            headers["ce-" + name] = value
        else:
            if not value.isascii():
                _check_utf8(name, value)
            headers["ce-" + name] = _quoted(value)
    return Event(attributes, data, headers)


@functools.lru_cache(maxsize=1024)
def _quoted(value: str) -> str:
    """A value as ``Event.binary_headers`` sends it (cached: a source such as
    ``amqp://%2F/orders`` comes with every message)."""
    return Event({"v": value}).binary_headers()["ce-v"]


def _check_utf8(name: str, text: str) -> None:
    if not is_utf8(text):
        raise Rejected(f"invalid-attribute: {name} is not UTF-8 text")


def wrap(message: Message, event_type: str) -> Event:
    return Event(_wrapped(message, event_type), message.payload)


def _wrapped(message: Message, event_type: str) -> dict[str, str]:
    """The attributes of a wrapped message."""
    attributes = {
        "specversion": "1.0",
        "id": message.id,
        "source": message.source,
        "type": event_type,
    }
    if message.subject:
        attributes["subject"] = message.subject
    if message.time:
        attributes["time"] = message.time
    if message.content_type:
        attributes["datacontenttype"] = message.content_type
    for name, value in message.extensions.items():
        attributes.setdefault(name, value)
    return attributes


def _passthrough(message: Message) -> Event | None:
    try:
        if message.ce_attributes and "specversion" in message.ce_attributes:
            attributes = dict(message.ce_attributes)
            if message.content_type and "datacontenttype" not in attributes:
                attributes["datacontenttype"] = message.content_type
            return from_attributes(attributes, message.payload, message.attribute_prefix)
        media = (message.content_type or "").split(";", 1)[0].strip().lower()
        if media == STRUCTURED:
            return parse_structured(message.payload)
    except InvalidInput as exc:
        raise Rejected(f"invalid-cloudevent: {exc.detail}") from None
    return None


def _check_charset(message: Message) -> None:
    ctype = (message.content_type or "").lower()
    if "charset=" not in ctype:
        return
    charset = ctype.split("charset=", 1)[1].split(";", 1)[0].strip().strip('"')
    try:
        message.payload.decode(charset)
    except LookupError:
        raise Rejected(f"bad-charset: unknown charset '{charset}'") from None
    except UnicodeError as exc:
        reason = exc.reason if isinstance(exc, UnicodeDecodeError) else str(exc)
        raise Rejected(f"bad-charset: the payload is not valid {charset}: {reason}") from None
    except Exception as exc:  # a codec is any code (a name with a NUL is a ValueError)
        raise Rejected(f"bad-charset: cannot decode as '{charset}': {exc}") from None


def s3_events(payload: bytes) -> list[Event]:
    """One CloudEvent per record of an S3 / MinIO bucket notification.

    ``id`` = bucket/key/sequencer (the record's own identity), ``source`` = ``s3://<bucket>``,
    ``type`` = ``io.minio.`` + the event name with ``:`` as ``.``
    (``io.minio.s3.ObjectCreated.Put``), ``subject`` = the object key, URL-decoded,
    ``time`` = ``eventTime``, data = the record (JSON), extension ``bucket``.
    """
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise Rejected(f"invalid-json: {exc}") from None
    records = doc.get("Records") if isinstance(doc, dict) else None
    if not isinstance(records, list) or not records:
        raise Rejected("not-s3: the payload has no Records")
    return [_s3_event(record, i) for i, record in enumerate(records)]


def _s3_event(record: Any, index: int) -> Event:
    try:
        s3 = record["s3"]
        bucket = str(s3["bucket"]["name"])
        key = unquote_plus(str(s3["object"]["key"]))
        name = str(record["eventName"])
    except (KeyError, TypeError):
        raise Rejected(
            f"not-s3: record {index} lacks s3.bucket.name, s3.object.key or eventName"
        ) from None
    sequencer = str(s3["object"].get("sequencer") or "")
    if not sequencer:
        digest = hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).hexdigest()
        sequencer = digest[:16]
    attributes = {
        "specversion": "1.0",
        "id": f"{bucket}/{key}/{sequencer}",
        "source": f"s3://{bucket}",
        "type": "io.minio." + name.replace(":", "."),
        "subject": key,
        "datacontenttype": "application/json",
        "bucket": bucket,
    }
    if record.get("eventTime"):
        attributes["time"] = str(record["eventTime"])
    return Event(attributes, orjson.dumps(record))


def content_hash(*parts: bytes | str) -> str:
    """A short stable digest, for ids of messages that carry none."""
    digest = hashlib.sha256()
    for part in parts:
        # surrogatepass: text holding bytes that were not UTF-8 still hashes, the same each time
        digest.update(part.encode("utf-8", "surrogatepass") if isinstance(part, str) else part)
        digest.update(b"\x00")
    return digest.hexdigest()[:32]


def ssl_context(tls: TLS) -> ssl.SSLContext:
    """The client TLS context of a source's ``tls`` options."""
    context = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
