"""Sizes as NATS counts them, and how hostile bytes are kept: exact header accounting, response
excerpts as text, dead-letter attributes that round-trip, requests that cannot be sent."""

from __future__ import annotations

import gzip
import zlib

import orjson
import pytest
from nats.aio.client import Client as NATS

from dlq.store import _json, _text, attributes_json, attributes_of
from eventhub.errors import MessageTooLarge
from eventhub.events import Event
from eventhub.invocations import Invocation
from eventhub.invoker import INVALID_REQUEST, excerpt_text
from eventhub.retry import Outcome
from eventhub.sizes import (
    INGRESS_RESERVE,
    JETSTREAM_MAX_HEADERS,
    check,
    header_bytes,
    message_bytes,
)


async def _hpub_sizes(headers: dict[str, str], data: bytes) -> tuple[int, int]:
    """(header length, total length) of the HPUB nats-py would send."""
    sent: list[bytes] = []
    client = NATS()

    async def capture(command: bytes, priority: bool = False) -> None:
        sent.append(command)

    client._send_command = capture  # type: ignore[method-assign,assignment]
    await client._send_publish("a.b", "reply", data, len(data), headers)
    fields = sent[0].split(b"\r\n", 1)[0].split()
    return int(fields[-2]), int(fields[-1])


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Nats-Msg-Id": "x", "Eh-Function": "fn"},
        {"ce-subject": " padded ", "content-type": "text/plain; charset=ütf-8"},
        {"ce-note": "line\r\nbreak", " Spaced ": "v", "": "skipped"},
    ],
)
async def test_header_bytes_match_what_nats_py_sends(headers: dict[str, str]) -> None:
    header_length, total = await _hpub_sizes(headers, b"12345")
    assert header_bytes(headers) == header_length
    assert message_bytes(headers, b"12345") == total


async def test_an_invocation_is_measured_with_every_header_it_carries() -> None:
    event = Event(
        {"specversion": "1.0", "id": "e", "source": "/s", "type": "t", "subject": "é/ü"}, b"d" * 10
    )
    invocation = Invocation(id="i", function="fn", event=event, binding="b", tracestate="k=v")
    headers = invocation.headers()
    assert message_bytes(headers, event.data) == (await _hpub_sizes(headers, event.data))[1]


def test_check_names_the_event_and_the_limit() -> None:
    headers = {"Nats-Msg-Id": "x"}
    size = message_bytes(headers, b"x" * 100)
    check([(headers, b"x" * 100, "e-1")], size + INGRESS_RESERVE, INGRESS_RESERVE)
    with pytest.raises(MessageTooLarge) as raised:
        check([(headers, b"x" * 101, "e-1")], size + INGRESS_RESERVE, INGRESS_RESERVE)
    assert raised.value.limit == size and raised.value.size == size + 1
    assert raised.value.event_id == "e-1" and raised.value.status == 413
    assert f"limit of {size} bytes" in raised.value.detail


def test_excerpts_are_text() -> None:
    assert excerpt_text(gzip.compress(b"compressed"), "gzip") == "compressed"
    assert excerpt_text(zlib.compress(b"deflated"), "deflate") == "deflated"
    raw = zlib.compressobj(wbits=-15)
    assert excerpt_text(raw.compress(b"raw") + raw.flush(), "deflate") == "raw"
    truncated = gzip.compress(b"x" * 5000)[:20]  # the first bytes only, as read
    assert "\x00" not in excerpt_text(truncated, "gzip")
    assert excerpt_text(b"\x00\xffa", None) == "\ufffd\ufffda"
    assert excerpt_text(b"...", "br") == "[br-encoded body]"
    assert "cannot be decompressed" in excerpt_text(b"not gzip", "gzip")


def test_a_request_that_cannot_be_sent_is_final() -> None:
    assert not Outcome(error=INVALID_REQUEST).retryable
    assert Outcome(error="connection").retryable


@pytest.mark.parametrize(
    "value", ["plain", "nul\x00inside", "\x00", "lone \udcff surrogate", "é\x01\x7f"]
)
def test_dead_letter_attributes_round_trip(value: str) -> None:
    attributes = {"specversion": "1.0", "id": "1", "note": value}
    stored = attributes_json(attributes)
    assert "\\u0000" not in stored
    stored.encode("utf-8")  # PostgreSQL takes it
    assert attributes_of(stored) == attributes


def test_diagnostic_text_is_storable() -> None:
    assert _text("a\x00b") == "a\ufffdb"
    assert _text("a\udcffb") == "a?b"
    assert _text(None) is None
    attempts = [{"response": "\x00bin", "nested": ["\x00"], "n": 1}]
    stored = _json(attempts)
    assert "\\u0000" not in stored
    assert orjson.loads(stored) == [{"response": "\ufffdbin", "nested": ["\ufffd"], "n": 1}]


def test_check_holds_headers_to_what_jetstream_stores() -> None:
    # JetStream refuses a header block over 64 KiB, even in a message far below max_payload.
    fits = {"ce-big": "x" * (JETSTREAM_MAX_HEADERS - INGRESS_RESERVE - 100)}
    check([(fits, b"", "e-1")], 1024 * 1024, INGRESS_RESERVE)
    big = {"ce-big": "x" * (JETSTREAM_MAX_HEADERS - INGRESS_RESERVE)}
    with pytest.raises(MessageTooLarge) as raised:
        check([(big, b"", "e-2")], 1024 * 1024, INGRESS_RESERVE)
    assert raised.value.limit == JETSTREAM_MAX_HEADERS - INGRESS_RESERVE
    assert raised.value.problems[0].field == "headers"
    assert "NATS headers" in raised.value.detail
