"""A function's result as an event: what its ``onSuccess`` and ``onFailure`` destinations get.

On success, the response becomes the result event:

- a response that is a CloudEvent (binary mode: ``ce-*`` headers; structured mode:
  ``Content-Type: application/cloudevents+json``) passes through as it is;
- any other response is wrapped: ``type`` :data:`RESULT_TYPE`, ``source``
  ``/eventhub/functions/<function>``, ``subject`` the version called, ``datacontenttype`` the
  response's ``Content-Type``, and the body, byte for byte, as data.

On failure (once the dead letter is stored), the failure event has ``type``
:data:`FAILURE_TYPE` and, as JSON data, the invocation record: the function and version, the
reason, the last error, the attempts made, the dead letter's id and the triggering event.

Either way the causation is kept in extensions: ``eventhubcauseid`` and ``eventhubcausesource``
(the triggering event's ``id`` and ``source``), ``eventhubinvocation`` (the invocation id), and
``eventhubhops``, one more than the triggering event's: a chain longer than ``max_hops`` stops,
its next event a dead letter with reason :data:`HOP_LIMIT`. A wrapped event's id is derived from
the invocation id, so a redelivered invocation publishes the same event, which JetStream drops
as a duplicate within its window.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from eventhub.errors import InvalidInput
from eventhub.events import Event, now_rfc3339, parse_http
from eventhub.invocations import Invocation

RESULT_TYPE = "eventhub.function.result"
FAILURE_TYPE = "eventhub.function.failure"
HOP_LIMIT = "hop-limit"
HOPS = "eventhubhops"
SOURCE_PREFIX = "function:"  # bindings name "function:<name>" as their source
_IDS = uuid.UUID("b5b8a3c6-52f4-4d0e-8a5e-1f3d0c2a9e11")


def source_of(function: str) -> str:
    """The routing source name of a function's result events."""
    return SOURCE_PREFIX + function


def hops(event: Event) -> int:
    try:
        return max(0, int(event.attributes.get(HOPS, "0")))
    except ValueError:
        return 0


def result_event(
    function: str,
    version: str,
    invocation: Invocation,
    headers: Mapping[str, str],
    body: bytes,
) -> Event:
    """The event a successful call produced (see the module docstring)."""
    event = _as_cloudevent(headers, body)
    if event is None:
        attributes = {
            "specversion": "1.0",
            "id": str(uuid.uuid5(_IDS, f"result\x00{invocation.id}")),
            "source": f"/eventhub/functions/{function}",
            "type": RESULT_TYPE,
            "subject": version,
            "time": now_rfc3339(),
        }
        content_type = _header(headers, "content-type")
        if content_type:
            attributes["datacontenttype"] = content_type
        event = Event(attributes, body)
    return event.with_extensions(**causation(invocation))


def failure_event(
    function: str,
    version: str,
    invocation: Invocation,
    *,
    reason: str,
    error_code: str,
    error_message: str,
    attempts: int,
    dead_letter_id: str | None,
) -> Event:
    """The invocation record of a final failure, as an event."""
    record: dict[str, Any] = {
        "function": function,
        "version": version,
        "invocationId": invocation.id,
        "reason": reason,
        "errorCode": error_code,
        "errorMessage": error_message,
        "attempts": attempts,
        "deadLetterId": dead_letter_id,
        "event": orjson.loads(invocation.event.structured_bytes()),
    }
    attributes = {
        "specversion": "1.0",
        "id": str(uuid.uuid5(_IDS, f"failure\x00{invocation.id}")),
        "source": f"/eventhub/functions/{function}",
        "type": FAILURE_TYPE,
        "subject": version,
        "time": now_rfc3339(),
        "datacontenttype": "application/json",
    }
    event = Event(attributes, orjson.dumps(record))
    return event.with_extensions(**causation(invocation))


def causation(invocation: Invocation) -> dict[str, str]:
    cause = invocation.event
    return {
        "eventhubcauseid": cause.id,
        "eventhubcausesource": cause.source,
        "eventhubinvocation": invocation.id,
        HOPS: str(hops(cause) + 1),
    }


def _as_cloudevent(headers: Mapping[str, str], body: bytes) -> Event | None:
    """The response as a CloudEvent, if it is one; None for any other response (or one that
    claims to be a CloudEvent and is not valid: it is wrapped rather than lost)."""
    content_type = _header(headers, "content-type").split(";", 1)[0].strip().lower()
    binary = any(name.lower() == "ce-specversion" for name in headers)
    if not binary and content_type != "application/cloudevents+json":
        return None
    try:
        events = parse_http(headers, body)
    except InvalidInput:
        return None
    return events[0] if len(events) == 1 else None


def _header(headers: Mapping[str, str], name: str) -> str:
    return next((v for k, v in headers.items() if k.lower() == name), "")
