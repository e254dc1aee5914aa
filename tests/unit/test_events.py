"""Unit tests for eventhub.events: the CloudEvents HTTP binding (binary, structured, batch)."""

from __future__ import annotations

import base64
import json
import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from eventhub import events
from eventhub.errors import InvalidInput, UnsupportedMediaType
from eventhub.events import BATCH, STRUCTURED, Event, canonical, parse_http

REQUIRED = {"specversion": "1.0", "id": "evt-1", "source": "/orders", "type": "com.example.created"}
BINARY = {f"ce-{name}": value for name, value in REQUIRED.items()}
TIME = "2024-05-01T12:00:00Z"


def binary(*, drop: str = "", **extra: str) -> dict[str, str]:
    headers = {**BINARY, **extra}
    headers.pop(drop, None)
    return headers


def structured(doc: Any, ctype: str = STRUCTURED) -> list[Event]:
    return parse_http({"content-type": ctype}, json.dumps(doc).encode())


def batch(items: Any) -> list[Event]:
    return parse_http({"content-type": BATCH}, json.dumps(items).encode())


def fields(exc: pytest.ExceptionInfo[InvalidInput]) -> list[str]:
    return [p.field for p in exc.value.problems]


# ---------------------------------------------------------------- binary content mode


def test_binary_mode_reads_ce_headers_and_content_type() -> None:
    headers = binary(**{"ce-time": TIME, "content-type": "application/json"})
    [event] = parse_http(headers, b'{"n": 1}')
    assert event.id == "evt-1"
    assert event.source == "/orders"
    assert event.type == "com.example.created"
    assert event.attributes["specversion"] == "1.0"
    assert event.attributes["time"] == TIME
    assert event.datacontenttype == "application/json"


def test_binary_mode_keeps_content_type_parameters() -> None:
    headers = binary(**{"content-type": "application/json; charset=utf-8"})
    [event] = parse_http(headers, b"{}")
    assert event.datacontenttype == "application/json; charset=utf-8"


def test_binary_mode_without_content_type_has_no_datacontenttype() -> None:
    [event] = parse_http(binary(**{"ce-time": TIME}), b"raw")
    assert "datacontenttype" not in event.attributes
    assert event.datacontenttype is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"n":   1,\n "pretty": true}',  # JSON not re-serialised
        b"\x00\x01\xff\xfe binary",
        b"not json at all",
        b"",
    ],
)
def test_binary_mode_keeps_the_body_byte_for_byte(body: bytes) -> None:
    headers = binary(**{"content-type": "application/json", "ce-time": TIME})
    [event] = parse_http(headers, body)
    assert event.data == body


@pytest.mark.parametrize(
    ("encoded", "decoded"),
    [
        ("a%20b", "a b"),
        ("caf%C3%A9", "café"),
        ("100%25", "100%"),
        ("%22quoted%22", '"quoted"'),
        ("plain-value", "plain-value"),
    ],
)
def test_binary_mode_percent_decodes_header_values(encoded: str, decoded: str) -> None:
    [event] = parse_http(binary(**{"ce-subject": encoded, "ce-time": TIME}), b"")
    assert event.attributes["subject"] == decoded


def test_binary_mode_extensions_are_kept() -> None:
    [event] = parse_http(binary(**{"ce-tenant": "acme", "ce-time": TIME}), b"")
    assert event.attributes["tenant"] == "acme"


def test_binary_mode_header_names_are_case_insensitive() -> None:
    headers = {
        "CE-SpecVersion": "1.0",
        "Ce-Id": "evt-1",
        "ce-SOURCE": "/orders",
        "Ce-Type": "com.example.created",
        "Ce-Time": TIME,
    }
    [event] = parse_http(headers, b"")
    assert (event.id, event.source, event.type) == ("evt-1", "/orders", "com.example.created")


_VALUES = ("", "x", "1.0", "0.3", "a%20b", "%", "%zz", "a b", 'q"', "a\x01b", "\u00e9", TIME)
_NAMES = (
    "ce-specversion",
    "ce-id",
    "ce-subject",
    "ce-dataschema",
    "ce-time",
    "ce-data",
    "ce-Ext1",
    "ce-ext_x",
    "ce-",
    "ce-datacontenttype",
    "content-type",
    "Content-Type",
)


def _outcome(parse: Any, headers: dict[str, str]) -> Any:
    try:
        return [(e.attributes, e.data) for e in parse(headers, b"body")]
    except InvalidInput as exc:
        return (type(exc).__name__, exc.detail, exc.problems)


@pytest.mark.parametrize("seed", range(4))
def test_binary_fast_path_agrees_with_the_sdk(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The binary mode skips the SDK for plain events: every header set, accepted or not,
    gives what the SDK's path gives, and the headers kept to send on are those the attributes
    encode to."""
    rnd = random.Random(seed)
    cases = []
    for _ in range(2000):
        headers = binary()
        for _ in range(rnd.randint(0, 4)):
            headers[rnd.choice(_NAMES)] = rnd.choice(_VALUES)
        cases.append(headers)
    fast = [_outcome(parse_http, h) for h in cases]
    parsed = [e for h in cases for e in _events_or_none(h)]
    assert any(e.wire is not None for e in parsed)  # the fast path was taken
    kept = [e.binary_headers() for e in parsed]
    rebuilt = [Event(e.attributes).binary_headers() for e in parsed]
    monkeypatch.setattr(events, "_binary_fast", lambda lowered, body: None)
    assert fast == [_outcome(parse_http, h) for h in cases]
    assert kept == rebuilt
    assert [list(k) for k in kept] == [list(r) for r in rebuilt]


def _events_or_none(headers: dict[str, str]) -> list[Event]:
    try:
        return parse_http(headers, b"")
    except InvalidInput:
        return []


def test_binary_mode_time_is_canonical() -> None:
    [event] = parse_http(binary(**{"ce-time": "2024-05-01T12:00:00+00:00"}), b"")
    assert event.attributes["time"] == TIME


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"content-type": "application/json"},
        {"content-type": "text/plain", "ce-id": "1", "ce-source": "/s", "ce-type": "t"},
    ],
)
def test_missing_specversion_header_is_unsupported_media_type(headers: dict[str, str]) -> None:
    with pytest.raises(UnsupportedMediaType) as exc:
        parse_http(headers, b"{}")
    assert exc.value.status == 415
    assert fields(exc) == ["ce-specversion"]
    assert STRUCTURED in exc.value.detail
    assert BATCH in exc.value.detail


def test_unsupported_media_type_is_invalid_input() -> None:
    assert issubclass(UnsupportedMediaType, InvalidInput)


@pytest.mark.parametrize("attribute", ["type", "source"])
def test_binary_mode_missing_required_attribute_names_the_header(attribute: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_http(binary(drop=f"ce-{attribute}"), b"")
    assert exc.type is InvalidInput
    assert exc.value.status == 400
    assert fields(exc) == [f"ce-{attribute}"]
    assert f"ce-{attribute}" in exc.value.detail


def test_binary_mode_missing_id_names_the_header() -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_http(binary(drop="ce-id"), b"")
    assert fields(exc) == ["ce-id"]


@pytest.mark.parametrize("version", ["0.3", "2.0", ""])
def test_binary_mode_rejects_other_specversions(version: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_http(binary(**{"ce-specversion": version}), b"")
    assert fields(exc) == ["ce-specversion"]


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_absent_time_is_not_invented(mode: str) -> None:
    if mode == "binary":
        [event] = parse_http(binary(), b"")
    else:
        [event] = structured(REQUIRED)
    assert "time" not in event.attributes


# ---------------------------------------------------------------- structured content mode


def test_structured_mode_with_json_data() -> None:
    [event] = structured({**REQUIRED, "time": TIME, "data": {"a": 1, "b": [True, None]}})
    assert event.id == "evt-1"
    assert event.attributes["time"] == TIME
    assert event.datacontenttype == "application/json"
    assert orjson.loads(event.data) == {"a": 1, "b": [True, None]}


@pytest.mark.parametrize(
    "ctype", [STRUCTURED, f"{STRUCTURED}; charset=utf-8", "Application/CloudEvents+JSON"]
)
def test_structured_mode_content_type_variants(ctype: str) -> None:
    [event] = structured({**REQUIRED, "data": 1}, ctype)
    assert event.id == "evt-1"
    assert event.data == b"1"


def test_structured_mode_keeps_explicit_json_datacontenttype() -> None:
    doc = {**REQUIRED, "datacontenttype": "application/vnd.api+json", "data": {"x": 1}}
    [event] = structured(doc)
    assert event.datacontenttype == "application/vnd.api+json"
    assert orjson.loads(event.data) == {"x": 1}


def test_structured_mode_json_string_data_with_json_content_type() -> None:
    [event] = structured({**REQUIRED, "datacontenttype": "application/json", "data": "str"})
    assert event.data == b'"str"'


def test_structured_mode_string_data_without_content_type_is_json() -> None:
    [event] = structured({**REQUIRED, "data": "str"})
    assert event.data == b'"str"'
    assert orjson.loads(event.structured_bytes())["data"] == "str"


def test_structured_mode_with_text_data() -> None:
    [event] = structured({**REQUIRED, "datacontenttype": "text/plain", "data": "héllo"})
    assert event.datacontenttype == "text/plain"
    assert event.data == "héllo".encode()


def test_structured_mode_with_data_base64() -> None:
    raw = b"\x89PNG\x00\xff"
    doc = {
        **REQUIRED,
        "datacontenttype": "image/png",
        "data_base64": base64.b64encode(raw).decode(),
    }
    [event] = structured(doc)
    assert event.data == raw
    assert event.datacontenttype == "image/png"
    assert "data_base64" not in event.attributes


def test_structured_mode_without_data_has_empty_body() -> None:
    [event] = structured({**REQUIRED, "time": TIME})
    assert event.data == b""
    assert "datacontenttype" not in event.attributes


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, "5"),
        (-3, "-3"),
        (0, "0"),
        (True, "true"),
        (False, "false"),
        ("text", "text"),
    ],
)
def test_structured_mode_extensions_become_canonical_strings(value: Any, expected: str) -> None:
    [event] = structured({**REQUIRED, "ext": value})
    assert event.attributes["ext"] == expected


def test_structured_mode_time_is_canonical() -> None:
    [event] = structured({**REQUIRED, "time": "2024-05-01T12:00:00+00:00"})
    assert event.attributes["time"] == TIME
    [event] = structured({**REQUIRED, "time": "2024-05-01T14:00:00+02:00"})
    assert event.attributes["time"] == "2024-05-01T14:00:00+02:00"


@pytest.mark.parametrize("attribute", ["type", "source"])
def test_structured_mode_missing_required_attribute(attribute: str) -> None:
    doc = {k: v for k, v in REQUIRED.items() if k != attribute}
    with pytest.raises(InvalidInput) as exc:
        structured(doc)
    assert fields(exc) == [attribute]
    assert attribute in exc.value.detail


def test_structured_mode_missing_id() -> None:
    doc = {k: v for k, v in REQUIRED.items() if k != "id"}
    with pytest.raises(InvalidInput) as exc:
        structured(doc)
    assert fields(exc) == ["id"]


def test_structured_mode_missing_specversion() -> None:
    doc = {k: v for k, v in REQUIRED.items() if k != "specversion"}
    with pytest.raises(InvalidInput) as exc:
        structured(doc)
    assert fields(exc) == ["specversion"]


@pytest.mark.parametrize("version", ["0.3", "1.1", "2.0"])
def test_structured_mode_rejects_other_specversions(version: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        structured({**REQUIRED, "specversion": version})
    assert fields(exc) == ["specversion"]


@pytest.mark.parametrize("body", [b"{not json", b"", b'{"id": "1",}'])
def test_structured_mode_invalid_json(body: bytes) -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_http({"content-type": STRUCTURED}, body)
    assert exc.type is InvalidInput
    assert "not valid JSON" in exc.value.detail


@pytest.mark.parametrize("doc", [[REQUIRED], "event", 1, None])
def test_structured_mode_requires_an_object(doc: Any) -> None:
    with pytest.raises(InvalidInput) as exc:
        structured(doc)
    assert fields(exc) == ["body"]


def test_structured_mode_data_and_data_base64_are_exclusive() -> None:
    with pytest.raises(InvalidInput) as exc:
        structured({**REQUIRED, "data": {"a": 1}, "data_base64": "AAEC"})
    assert fields(exc) == ["data_base64"]
    assert "mutually exclusive" in exc.value.detail


# ---------------------------------------------------------------- batch content mode


def test_batch_mode_returns_every_event_in_order() -> None:
    items = [
        {**REQUIRED, "id": "a", "data": {"n": 1}},
        {**REQUIRED, "id": "b", "datacontenttype": "text/plain", "data": "two"},
        {**REQUIRED, "id": "c", "data_base64": base64.b64encode(b"\x00\x01").decode()},
    ]
    events = batch(items)
    assert [e.id for e in events] == ["a", "b", "c"]
    assert orjson.loads(events[0].data) == {"n": 1}
    assert events[1].data == b"two"
    assert events[2].data == b"\x00\x01"


def test_batch_mode_empty_array() -> None:
    assert batch([]) == []


def test_batch_mode_content_type_with_parameters() -> None:
    body = json.dumps([REQUIRED]).encode()
    events = parse_http({"content-type": f"{BATCH}; charset=utf-8"}, body)
    assert [e.id for e in events] == ["evt-1"]


@pytest.mark.parametrize("attribute", ["type", "source"])
def test_batch_mode_problem_names_the_item(attribute: str) -> None:
    second = {k: v for k, v in REQUIRED.items() if k != attribute}
    with pytest.raises(InvalidInput) as exc:
        batch([REQUIRED, second])
    assert fields(exc) == [f"[1].{attribute}"]


def test_batch_mode_missing_id_names_the_item() -> None:
    second = {k: v for k, v in REQUIRED.items() if k != "id"}
    with pytest.raises(InvalidInput) as exc:
        batch([REQUIRED, second])
    assert fields(exc) == ["[1].id"]


def test_batch_mode_data_and_data_base64_name_the_item() -> None:
    with pytest.raises(InvalidInput) as exc:
        batch([REQUIRED, REQUIRED, {**REQUIRED, "data": 1, "data_base64": "AA=="}])
    assert fields(exc) == ["[2].data_base64"]


def test_batch_mode_specversion_names_the_item() -> None:
    with pytest.raises(InvalidInput) as exc:
        batch([{**REQUIRED, "specversion": "0.3"}])
    assert fields(exc) == ["[0].specversion"]


@pytest.mark.parametrize("item", [1, "event", [REQUIRED], None])
def test_batch_mode_item_must_be_an_object(item: Any) -> None:
    with pytest.raises(InvalidInput) as exc:
        batch([REQUIRED, item])
    assert fields(exc) == ["[1]"]


@pytest.mark.parametrize("body", [REQUIRED, "events", 3, None])
def test_batch_must_be_an_array(body: Any) -> None:
    with pytest.raises(InvalidInput) as exc:
        batch(body)
    assert "JSON array" in exc.value.detail


@pytest.mark.parametrize("body", [b"[", b"", b"[{]"])
def test_batch_invalid_json(body: bytes) -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_http({"content-type": BATCH}, body)
    assert "not valid JSON" in exc.value.detail


def test_content_mode_takes_precedence_over_ce_headers() -> None:
    headers = {**binary(), "content-type": STRUCTURED}
    [event] = parse_http(headers, json.dumps({**REQUIRED, "id": "from-body"}).encode())
    assert event.id == "from-body"


# ---------------------------------------------------------------- binary headers round trip


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "with spaces  and  more",
        "café ünïcode 日本語 🎉",
        'quotes " and percent % and %20 literal',
        "~!@#$^&*()_+{}|:<>?`-=[]\\;',./",
        "",
    ],
)
def test_binary_headers_round_trip(value: str) -> None:
    event = Event({**REQUIRED, "subject": value, "ext": value}, b"\x00data")
    headers = event.binary_headers()
    assert Event.from_binary_headers(headers, event.data) == event


def test_binary_headers_are_ascii_without_spaces() -> None:
    event = Event({**REQUIRED, "subject": 'a b é "q" 100%'})
    headers = event.binary_headers()
    assert headers["ce-subject"] == "a%20b%20%C3%A9%20%22q%22%20100%25"
    for value in headers.values():
        assert value.isascii()
        assert " " not in value


def test_binary_headers_map_datacontenttype_to_content_type() -> None:
    event = Event({**REQUIRED, "datacontenttype": "application/json; charset=utf-8"}, b"{}")
    headers = event.binary_headers()
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert "ce-datacontenttype" not in headers
    assert {k for k in headers if k.startswith("ce-")} == {f"ce-{k}" for k in REQUIRED}


def test_from_binary_headers_ignores_other_headers_and_is_case_insensitive() -> None:
    headers = {
        "CE-Id": "1",
        "Ce-Source": "/s",
        "Content-Type": "text/plain",
        "Nats-Msg-Id": "x",
        "traceparent": "00-abc",
    }
    event = Event.from_binary_headers(headers, b"body")
    assert event.attributes == {"id": "1", "source": "/s", "datacontenttype": "text/plain"}
    assert event.data == b"body"


def test_binary_headers_are_accepted_by_parse_http() -> None:
    event = Event(
        {**REQUIRED, "time": TIME, "subject": "a b/ç", "datacontenttype": "application/json"},
        b'{"a":  1}',
    )
    assert parse_http(event.binary_headers(), event.data) == [event]


# ---------------------------------------------------------------- Event accessors


def test_event_accessors_and_with_extensions() -> None:
    event = Event({**REQUIRED, "datacontenttype": "text/plain"}, b"x")
    assert (event.id, event.source, event.type) == ("evt-1", "/orders", "com.example.created")
    assert event.datacontenttype == "text/plain"
    extended = event.with_extensions(tenant="acme", id="other")
    assert extended.attributes["tenant"] == "acme"
    assert extended.id == "other"
    assert extended.data == b"x"
    assert "tenant" not in event.attributes


# ---------------------------------------------------------------- structured output


@pytest.mark.parametrize(
    "ctype", ["application/json", "application/json; charset=utf-8", "text/json", None]
)
def test_structured_inlines_json_data(ctype: str | None) -> None:
    attributes = {**REQUIRED} if ctype is None else {**REQUIRED, "datacontenttype": ctype}
    event = Event(attributes, b'{"a": [1, 2]}')
    doc = orjson.loads(event.structured_bytes())
    assert doc["data"] == {"a": [1, 2]}
    assert "data_base64" not in doc
    assert {k: v for k, v in doc.items() if k != "data"} == attributes


def test_structured_json_data_is_inlined_verbatim() -> None:
    event = Event({**REQUIRED, "datacontenttype": "application/json"}, b'{"a":  1}')
    assert event.structured_bytes().endswith(b'"data":{"a":  1}}')


def test_structured_text_data_is_a_string() -> None:
    event = Event({**REQUIRED, "datacontenttype": "text/plain"}, "héllo".encode())
    doc = event.structured()
    assert doc["data"] == "héllo"
    assert "data_base64" not in doc


@pytest.mark.parametrize(
    ("ctype", "data"),
    [
        ("image/png", b"\x89PNG\r\n\x1a\n\x00"),
        ("application/octet-stream", b"abc"),
        ("text/plain", b"\xff\xfe not utf-8"),
        ("application/json", b"{not json"),
        (None, b"\x00\x01"),
    ],
)
def test_structured_binary_data_is_base64(ctype: str | None, data: bytes) -> None:
    attributes = {**REQUIRED} if ctype is None else {**REQUIRED, "datacontenttype": ctype}
    doc = Event(attributes, data).structured()
    assert "data" not in doc
    assert base64.b64decode(doc["data_base64"]) == data


def test_structured_without_data_has_neither_data_field() -> None:
    doc = Event({**REQUIRED, "datacontenttype": "application/json"}).structured()
    assert doc == {**REQUIRED, "datacontenttype": "application/json"}


@pytest.mark.parametrize(
    ("ctype", "data"),
    [
        ("application/json", b'{"a":1}'),
        ("text/plain", b"hello"),
        ("image/png", b"\x89PNG\x00"),
    ],
)
def test_structured_output_is_accepted_by_parse_http(ctype: str, data: bytes) -> None:
    event = Event({**REQUIRED, "time": TIME, "datacontenttype": ctype}, data)
    assert parse_http({"content-type": STRUCTURED}, event.structured_bytes()) == [event]


# ---------------------------------------------------------------- canonical


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, "true"),
        (False, "false"),
        (0, "0"),
        (42, "42"),
        (-7, "-7"),
        ("text", "text"),
        ("", ""),
        (datetime(2024, 5, 1, 12, 0, tzinfo=UTC), "2024-05-01T12:00:00Z"),
        (datetime(2024, 5, 1, 12, 0), "2024-05-01T12:00:00Z"),  # noqa: DTZ001 - naive is UTC
        (datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC), "2024-05-01T12:00:00.500000Z"),
        (
            datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))),
            "2024-05-01T14:00:00+02:00",
        ),
    ],
)
def test_canonical(value: object, expected: str) -> None:
    assert canonical(value) == expected
