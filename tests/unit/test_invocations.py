"""Unit tests for eventhub.invocations: the NATS message form and deterministic ids."""

from __future__ import annotations

import re
import uuid

import pytest

from eventhub.events import Event
from eventhub.invocations import (
    _IDS,
    H_BINDING,
    H_CALLBACK,
    H_DEAD_LETTER,
    H_FUNCTION,
    H_MSG_ID,
    H_TRACEPARENT,
    H_TRACESTATE,
    Invocation,
    event_invocation_id,
    keyed_invocation_id,
    new_traceparent,
)

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACEPARENT_RE = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$")


def event(source: str = "/orders", event_id: str = "evt-1", **extra: str) -> Event:
    attributes = {
        "specversion": "1.0",
        "id": event_id,
        "source": source,
        "type": "com.example.created",
        **extra,
    }
    return Event(attributes, b'{"n": 1}')


FULL = Invocation(
    id="inv-1",
    function="resize-image",
    event=event(
        datacontenttype="application/json", subject="café au lait", time="2024-05-01T12:00:00Z"
    ),
    binding="orders-to-resize",
    callback_url="https://client.example.com/done?x=1&y=%20",
    dead_letter_id="dl-7",
    traceparent=TRACEPARENT,
    tracestate="congo=t61rcWkgMzE",
)


# ---------------------------------------------------------------- message round trip


def test_headers_carry_the_event_and_eventhub_fields() -> None:
    headers = FULL.headers()
    assert headers[H_MSG_ID] == "inv-1"
    assert headers[H_FUNCTION] == "resize-image"
    assert headers[H_BINDING] == "orders-to-resize"
    assert headers[H_CALLBACK] == "https://client.example.com/done?x=1&y=%20"
    assert headers[H_DEAD_LETTER] == "dl-7"
    assert headers[H_TRACEPARENT] == TRACEPARENT
    assert headers[H_TRACESTATE] == "congo=t61rcWkgMzE"
    assert headers["ce-id"] == "evt-1"
    assert headers["ce-source"] == "/orders"
    assert headers["ce-subject"] == "caf%C3%A9%20au%20lait"
    assert headers["content-type"] == "application/json"


def test_header_names() -> None:
    assert (H_MSG_ID, H_FUNCTION, H_BINDING, H_CALLBACK, H_DEAD_LETTER) == (
        "Nats-Msg-Id",
        "Eh-Function",
        "Eh-Binding",
        "Eh-Callback",
        "Eh-Dead-Letter",
    )


def test_round_trip_with_every_field() -> None:
    restored = Invocation.from_message(FULL.headers(), FULL.event.data)
    assert restored == FULL


def test_round_trip_with_only_required_fields() -> None:
    invocation = Invocation(id="inv-2", function="fn", event=event(), traceparent=TRACEPARENT)
    headers = invocation.headers()
    for name in (H_BINDING, H_CALLBACK, H_DEAD_LETTER, H_TRACESTATE):
        assert name not in headers
    restored = Invocation.from_message(headers, invocation.event.data)
    assert restored == invocation
    assert restored.binding is None
    assert restored.callback_url is None
    assert restored.dead_letter_id is None
    assert restored.tracestate is None


@pytest.mark.parametrize("data", [b"", b"\x00\x01\xff", b'{"pretty":  true}\n', "日本語".encode()])
def test_round_trip_keeps_data_byte_for_byte(data: bytes) -> None:
    invocation = Invocation(
        id="i", function="fn", event=Event(event().attributes, data), traceparent=TRACEPARENT
    )
    assert Invocation.from_message(invocation.headers(), data).event.data == data


def test_round_trip_keeps_non_ascii_extensions() -> None:
    evt = event(tenant="Zürich Ost", note='100% "sure"')
    invocation = Invocation(id="i", function="fn", event=evt, traceparent=TRACEPARENT)
    headers = invocation.headers()
    assert all(value.isascii() for value in headers.values())
    assert Invocation.from_message(headers, evt.data).event == evt


def test_eventhub_headers_do_not_leak_into_event_attributes() -> None:
    restored = Invocation.from_message(FULL.headers(), FULL.event.data)
    assert set(restored.event.attributes) == set(FULL.event.attributes)


def test_missing_traceparent_gets_a_new_one() -> None:
    headers = FULL.headers()
    del headers[H_TRACEPARENT]
    restored = Invocation.from_message(headers, b"")
    assert TRACEPARENT_RE.match(restored.traceparent)


@pytest.mark.parametrize("missing", [H_MSG_ID, H_FUNCTION])
def test_missing_required_header_raises(missing: str) -> None:
    headers = FULL.headers()
    del headers[missing]
    with pytest.raises(KeyError):
        Invocation.from_message(headers, b"")


def test_default_traceparent_is_fresh_and_well_formed() -> None:
    first = Invocation(id="i", function="fn", event=event())
    second = Invocation(id="i", function="fn", event=event())
    assert TRACEPARENT_RE.match(first.traceparent)
    assert first.traceparent != second.traceparent
    assert TRACEPARENT_RE.match(new_traceparent())


# ---------------------------------------------------------------- deterministic ids


def test_event_invocation_id_is_deterministic() -> None:
    first = event_invocation_id(event(), "orders-to-resize")
    again = event_invocation_id(event(), "orders-to-resize")
    assert first == again
    assert uuid.UUID(first).version == 5


@pytest.mark.parametrize(
    ("source", "event_id", "binding"),
    [("/orders", "o-1", "orders-to-resize"), ("/é/ü", "x" * 300, ""), ("", "\x00", "b")],
)
def test_event_invocation_id_is_the_uuid5_of_source_id_and_binding(
    source: str, event_id: str, binding: str
) -> None:
    """Ids stay what they were: a message already in the duplicate window keeps its id."""
    evt = Event({"specversion": "1.0", "id": event_id, "source": source, "type": "t"})
    expected = uuid.uuid5(_IDS, f"{source}\x00{event_id}\x00{binding}")
    assert event_invocation_id(evt, binding) == str(expected)


def test_event_invocation_id_ignores_everything_but_source_id_and_binding() -> None:
    plain = event()
    decorated = Event({**plain.attributes, "type": "other", "time": "2020-01-01T00:00:00Z"}, b"x")
    assert event_invocation_id(plain, "b") == event_invocation_id(decorated, "b")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ((event(), "binding-a"), (event(), "binding-b")),
        ((event(event_id="1"), "b"), (event(event_id="2"), "b")),
        ((event(source="/a"), "b"), (event(source="/b"), "b")),
        # The separator keeps ("/a", "b/c") apart from ("/ab", "/c").
        ((event(source="/a", event_id="b/c"), "x"), (event(source="/ab", event_id="/c"), "x")),
        ((event(event_id="1"), "2b"), (event(event_id="12"), "b")),
    ],
)
def test_event_invocation_id_differs(a: tuple[Event, str], b: tuple[Event, str]) -> None:
    assert event_invocation_id(*a) != event_invocation_id(*b)


def test_keyed_invocation_id() -> None:
    first = keyed_invocation_id("resize-image", "order-42")
    assert first == keyed_invocation_id("resize-image", "order-42")
    assert uuid.UUID(first).version == 5
    assert first != keyed_invocation_id("resize-image", "order-43")
    assert first != keyed_invocation_id("thumbnail", "order-42")


def test_keyed_and_event_ids_live_in_separate_spaces() -> None:
    # A function named like a source and a key named like an event id must not collide.
    evt = event(source="fn", event_id="k")
    assert keyed_invocation_id("fn", "k") != event_invocation_id(evt, "")
