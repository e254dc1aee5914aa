"""CloudEvents as eventhub carries them, and their HTTP protocol binding.

An :class:`Event` holds the context attributes (extensions included) in their canonical string form
(the form HTTP, Kafka and NATS headers carry) and the data as the exact bytes received. Parsing and
validation of incoming HTTP messages (binary, structured and batch content modes) use the
``cloudevents`` SDK; problems are reported as :class:`InvalidInput` naming the attribute.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

import orjson
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.exceptions import BaseCloudEventException, CloudEventValidationError
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from eventhub.errors import FieldProblem, InvalidInput, UnsupportedMediaType

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
_JSON_TYPE = re.compile(r"^(application|text)/([a-zA-Z0-9\-.]+\+)?json(;.*)?$")
# Disallowed in CloudEvents strings (spec, "Type System"): C0 and C1 controls, DEL.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_SAFE = "".join(c for c in map(chr, range(0x21, 0x7F)) if c not in ' "%')
_FORMAT = JSONFormat()
# Attributes the binary fast path takes as they are (``time`` is left to the SDK: it parses it).
_KNOWN = frozenset(
    {"specversion", "id", "source", "type", "subject", "dataschema", "datacontenttype"}
)
_REQUIRED_NOT_EMPTY = ("id", "source", "type")
# Left to the SDK: ``time`` (parsed), ``data`` (reserved: the SDK names the problem) and
# ``datacontenttype`` as a ce- header (Content-Type's attribute: the SDK's path decides which wins).
_SLOW = frozenset({"time", "data", "datacontenttype"})
_PLAIN = re.compile(r"[!#$&-~]*")  # header text that percent-encoding leaves as it is (_SAFE)
_EXTENSION_NAME = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True, slots=True)
class Event:
    attributes: Mapping[str, str]
    data: bytes = b""
    # The binary-mode headers this event was read from, kept to be sent on as they are.
    wire: Mapping[str, str] | None = field(default=None, compare=False, repr=False)

    @property
    def id(self) -> str:
        return self.attributes["id"]

    @property
    def source(self) -> str:
        return self.attributes["source"]

    @property
    def type(self) -> str:
        return self.attributes["type"]

    @property
    def datacontenttype(self) -> str | None:
        return self.attributes.get("datacontenttype")

    def with_extensions(self, **extensions: str) -> Event:
        return Event({**self.attributes, **extensions}, self.data)

    def binary_headers(self) -> dict[str, str]:
        """Headers of the binary content mode (HTTP, and NATS alike): ``ce-*`` and Content-Type."""
        if self.wire is not None:
            return dict(self.wire)
        headers = {}
        for name, value in self.attributes.items():
            if name == "datacontenttype":
                headers["content-type"] = value
            else:
                headers["ce-" + name] = quote(value, safe=_SAFE)
        return headers

    @classmethod
    def from_binary_headers(cls, headers: Mapping[str, str], data: bytes) -> Event:
        """The inverse of :meth:`binary_headers`, for headers this process wrote itself."""
        attributes = {}
        wire = {}
        for name, value in headers.items():
            lower = name.lower()
            if lower.startswith("ce-"):
                attributes[lower[3:]] = unquote(value) if "%" in value else value
                wire[name] = value
            elif lower == "content-type":
                attributes["datacontenttype"] = value
                wire[name] = value
        return cls(attributes, data, wire)

    def structured(self) -> dict[str, Any]:
        """The JSON event format: data inline when it is JSON or text, else ``data_base64``."""
        doc: dict[str, Any] = dict(self.attributes)
        if not self.data:
            return doc
        ctype = self.datacontenttype or "application/json"
        if _JSON_TYPE.match(ctype):
            try:
                doc["data"] = orjson.Fragment(self.data) if _is_json(self.data) else None
            except ValueError:
                doc["data"] = None
            if doc["data"] is not None:
                return doc
            del doc["data"]
        if ctype.startswith("text/"):
            try:
                doc["data"] = self.data.decode("utf-8")
                return doc
            except UnicodeDecodeError:
                pass
        doc["data_base64"] = base64.b64encode(self.data).decode("ascii")
        return doc

    def structured_bytes(self) -> bytes:
        return orjson.dumps(self.structured())


def parse_http(headers: Mapping[str, str], body: bytes) -> list[Event]:
    """The events in one HTTP request, in any content mode; raises InvalidInput/415."""
    ctype = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    media = ctype.split(";", 1)[0].strip().lower()
    if media == BATCH:
        return _parse_batch(body)
    if media == STRUCTURED:
        return [parse_structured(body)]
    if not any(name.lower() == "ce-specversion" for name in headers):
        raise UnsupportedMediaType(
            "not a CloudEvent: send the binary content mode (ce-specversion, ce-id, ce-source, "
            f"ce-type headers) or Content-Type {STRUCTURED} or {BATCH}",
            problems=(FieldProblem("ce-specversion", "header is missing"),),
        )
    lowered = {k.lower(): v for k, v in headers.items()}
    fast = _binary_fast(lowered, body)
    if fast is not None:
        return [fast]
    _require({k[3:] for k in lowered if k.startswith("ce-")}, "ce-")
    message = ce_http.HTTPMessage(headers=lowered, body=b"")
    try:
        sdk_event = ce_http.from_binary(message, _FORMAT, CloudEvent)
    except CloudEventValidationError as exc:
        raise _validation_problem(exc, "ce-") from None
    except (BaseCloudEventException, ValueError, TypeError) as exc:
        raise InvalidInput(f"invalid CloudEvent headers: {exc}") from None
    event = _from_sdk(sdk_event, body, had_time="ce-time" in lowered)
    _check_controls(event.attributes, _header_of)
    return [event]


def _binary_fast(lowered: Mapping[str, str], body: bytes) -> Event | None:
    """The binary content mode without the SDK, for the common event: every attribute the SDK
    would accept as it is (required ones present, no empty value, ``specversion`` 1.0, no
    ``time``, extension names of lowercase letters and digits). The attributes are those the
    SDK's path gives, decoded the same way, in the same order. None: let the SDK decide (and
    name what is wrong)."""
    attributes: dict[str, str] = {}
    wire: dict[str, str] = {}  # what binary_headers() would make of them, kept to send on
    for name, value in lowered.items():
        if name.startswith("ce-"):
            attribute = name[3:]
            if (
                not value
                or attribute in _SLOW
                or (attribute not in _KNOWN and not _EXTENSION_NAME.fullmatch(attribute))
            ):
                return None
            decoded = unquote(value) if "%" in value else value
            attributes[attribute] = decoded
            wire[name] = value if _PLAIN.fullmatch(value) else quote(decoded, safe=_SAFE)
        elif name == "content-type":
            if not value:
                return None
            attributes["datacontenttype"] = wire[name] = value
    if attributes.get("specversion") != "1.0" or not all(
        attributes.get(a) for a in _REQUIRED_NOT_EMPTY
    ):
        return None
    _check_controls(attributes, _header_of)
    return Event(attributes, body, wire)


def _header_of(attribute: str) -> str:
    return "content-type" if attribute == "datacontenttype" else "ce-" + attribute


def _check_controls(attributes: Mapping[str, str], name_of: Callable[[str], str]) -> None:
    """Refuse control characters in attribute values: the CloudEvents type system disallows
    them, HTTP headers cannot carry them, PostgreSQL cannot store NUL in text."""
    problems = tuple(
        FieldProblem(name_of(name), "must not contain control characters")
        for name, value in attributes.items()
        if _CONTROL.search(value)
    )
    if problems:
        detail = "; ".join(str(p) for p in problems)
        raise InvalidInput(f"invalid CloudEvent: {detail}", problems=problems)


def _parse_batch(body: bytes) -> list[Event]:
    try:
        items = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the batch is not valid JSON: {exc}") from None
    if not isinstance(items, list):
        raise InvalidInput("a batch must be a JSON array of CloudEvents")
    return [parse_structured(orjson.dumps(item), f"[{i}].") for i, item in enumerate(items)]


def _require(present: set[str], prefix: str) -> None:
    """The SDK invents a missing id and time: an incoming event must carry its own."""
    missing = [a for a in ("specversion", "id", "source", "type") if a not in present]
    if missing:
        problems = tuple(FieldProblem(prefix + a, "is required") for a in missing)
        detail = "; ".join(str(p) for p in problems)
        raise InvalidInput(f"invalid CloudEvent: {detail}", problems=problems)


def from_attributes(attributes: Mapping[str, str], data: bytes, prefix: str = "") -> Event:
    """An event from attributes carried as transport headers or properties (binary mode of the
    Kafka, AMQP, MQTT bindings): validated like HTTP's, problems named ``<prefix><attribute>``."""
    _require(set(attributes), prefix)
    values: dict[str, Any] = dict(attributes)
    try:
        if "time" in values:
            values["time"] = datetime.fromisoformat(values["time"].replace("Z", "+00:00"))
        CloudEvent(dict(values))
    except CloudEventValidationError as exc:
        raise _validation_problem(exc, prefix) from None
    except (BaseCloudEventException, ValueError, TypeError) as exc:
        raise InvalidInput(f"invalid CloudEvent attributes: {exc}") from None
    _check_controls(attributes, lambda name: prefix + name)
    return Event(dict(attributes), data)


def parse_structured(body: bytes, prefix: str = "") -> Event:
    """One event in the JSON event format (structured content mode); raises InvalidInput."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the structured CloudEvent is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput(
            "a structured CloudEvent must be a JSON object",
            problems=(FieldProblem(prefix.rstrip(".") or "body", "must be a JSON object"),),
        )
    if "data" in doc and "data_base64" in doc:
        raise InvalidInput(
            "data and data_base64 are mutually exclusive",
            problems=(FieldProblem(prefix + "data_base64", "must not be set with data"),),
        )
    _require(set(doc), prefix)
    try:
        event = _FORMAT.read(CloudEvent, orjson.dumps(doc))
    except CloudEventValidationError as exc:
        raise _validation_problem(exc, prefix) from None
    except (BaseCloudEventException, ValueError, TypeError, AttributeError) as exc:
        # AttributeError: the SDK parses a non-string "time" (a list...) without checking it.
        raise InvalidInput(f"invalid CloudEvent: {exc}") from None
    if not isinstance(event, CloudEvent):
        raise InvalidInput("only CloudEvents 1.0 are accepted")
    parsed = _from_sdk(event, None, had_time="time" in doc)
    _check_controls(parsed.attributes, lambda name: prefix + name)
    return parsed


def _from_sdk(event: Any, raw_data: bytes | None, *, had_time: bool) -> Event:
    attributes = {}
    for name, value in event.get_attributes().items():
        if value is None or (name == "time" and not had_time):
            continue
        attributes[name] = canonical(value)
    if raw_data is not None:
        return Event(attributes, raw_data)
    data = event.get_data()
    if data is None:
        body = b""
    elif isinstance(data, bytes):
        body = data
    elif isinstance(data, str) and not _JSON_TYPE.match(
        attributes.get("datacontenttype", "application/json")
    ):
        body = data.encode("utf-8")
    else:
        body = orjson.dumps(data)
        attributes.setdefault("datacontenttype", "application/json")
    return Event(attributes, body)


def canonical(value: object) -> str:
    """The canonical string of an attribute value (CloudEvents type system)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        text = value.isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    return str(value)


def _validation_problem(exc: CloudEventValidationError, prefix: str) -> InvalidInput:
    problems = []
    for attribute, errors in exc.errors.items():
        if errors:  # the SDK lists every consequence of one problem: the first says it best
            problems.append(FieldProblem(prefix + attribute, _clean(str(errors[0]))))
    detail = "; ".join(str(p) for p in problems) or "invalid CloudEvent"
    return InvalidInput(f"invalid CloudEvent: {detail}", problems=tuple(problems))


def _clean(message: str) -> str:
    return message.split(": ", 1)[-1] if message.startswith("Invalid") else message


def _is_json(data: bytes) -> bool:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return True


_second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text


def now_rfc3339() -> str:
    """Now, as RFC 3339 in UTC with microseconds (called several times per invocation: the
    formatting of the second is kept, only the fraction is new)."""
    global _second
    now = time.time()
    cached = _second  # read once: another thread may replace it meanwhile
    if int(now) != cached[0]:
        cached = _second = (int(now), time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)))
    return f"{cached[1]}.{int((now - cached[0]) * 1_000_000):06d}Z"
