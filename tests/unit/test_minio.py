"""MinIO notifications to CloudEvents (the samples in tests/data/minio), the webhook token
check, reconciliation's pure parts, and the reader thread over the SDK's real stream iterator."""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from minio.datatypes import EventIterable, Object

from connectors.common import Rejected, s3_events
from connectors.minio import (
    _Ended,
    _Listener,
    _Opened,
    _Records,
    _StreamEnded,
    authorized,
    changed,
    format_time,
    notification_events,
    parse_time,
    reconciles,
    server_time,
    synthetic_event,
)
from eventhub.sourcespecs import MinIOListen

SAMPLES = Path(__file__).parents[1] / "data" / "minio"
LISTEN = MinIOListen(endpoint="127.0.0.1:9000", access_key="k", secret_key="s", bucket="uploads")  # type: ignore[arg-type]


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def test_put() -> None:
    [event] = notification_events(sample("put.json"))
    assert dict(event.attributes) == {
        "specversion": "1.0",
        "id": "uploads/images/cat.jpg/1879A6C4E3A6F1D2",
        "source": "s3://uploads",
        "type": "io.minio.s3.ObjectCreated.Put",
        "subject": "images/cat.jpg",
        "datacontenttype": "application/json",
        "bucket": "uploads",
        "time": "2026-11-20T08:15:42.118Z",
    }
    record = orjson.loads(event.data)
    assert record["s3"]["object"]["eTag"] == "9b2cf535f27731c974343645a3985328"
    assert record["s3"]["object"]["userMetadata"]["X-Amz-Meta-Owner"] == "ops"


def test_multipart_key_is_url_decoded() -> None:
    [event] = notification_events(sample("multipart.json"))
    assert event.attributes["subject"] == "photos/summer 2024/aé.jpg"
    assert event.id == "media/photos/summer 2024/aé.jpg/1879A6C9B1C20A47"
    assert event.type == "io.minio.s3.ObjectCreated.CompleteMultipartUpload"
    assert event.source == "s3://media"
    assert orjson.loads(event.data)["s3"]["object"]["key"] == "photos%2Fsummer+2024%2Fa%C3%A9.jpg"


def test_delete() -> None:
    [event] = notification_events(sample("delete.json"))
    assert event.type == "io.minio.s3.ObjectRemoved.Delete"
    assert event.attributes["subject"] == "images/cat.jpg"
    assert event.id == "uploads/images/cat.jpg/1879AA3E78A1C0E4"
    assert event.attributes["time"] == "2026-11-20T09:01:10.552Z"


def test_two_records_are_two_events() -> None:
    events = notification_events(sample("two-records.json"))
    assert [e.attributes["subject"] for e in events] == ["images/cat.jpg", "images/dog.png"]
    assert len({e.id for e in events}) == 2
    assert [orjson.loads(e.data)["s3"]["object"]["key"] for e in events] == [
        "images%2Fcat.jpg",
        "images%2Fdog.png",
    ]


def test_listen_stream_lines_skip_keep_alives() -> None:
    lines = sample("listen-stream.ndjson").splitlines()
    docs = [orjson.loads(line) for line in lines if line.strip()]
    assert len(lines) > len(docs) == 3  # blank and " " keep-alive lines in between
    events = [e for doc in docs for e in s3_events(orjson.dumps(doc))]
    assert [e.type for e in events] == [
        "io.minio.s3.ObjectCreated.Put",
        "io.minio.s3.ObjectCreated.Put",
        "io.minio.s3.ObjectRemoved.Delete",
    ]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty"),
        (b"  \n", "empty"),
        (b"{not json", "invalid-json"),
        (b'{"EventName": "s3:ObjectCreated:Put"}', "not-s3"),
        (b'{"Records": [{"eventName": "s3:ObjectCreated:Put"}]}', "not-s3"),
        (b"[1, 2]", "not-s3"),
    ],
)
def test_not_a_notification(body: bytes, reason: str) -> None:
    with pytest.raises(Rejected) as info:
        notification_events(body)
    assert info.value.reason.startswith(reason)


def test_empty_records_is_nothing_to_do() -> None:
    assert notification_events(b'{"Records": []}') == []


@pytest.mark.parametrize(
    ("header", "token", "ok"),
    [
        ("Bearer s3cret", "s3cret", True),  # MinIO: a one-word token gets "Bearer "
        ("bearer  s3cret ", "s3cret", True),
        ("s3cret", "s3cret", True),  # older MinIO: the token as is
        ("Basic dXNlcjpwdw==", "Basic dXNlcjpwdw==", True),  # a two-word token: as is
        ("Bearer wrong", "s3cret", False),
        ("Bearer", "s3cret", False),
        ("", "s3cret", False),
        (None, "s3cret", False),
        ("Basic s3cret", "s3cret", False),
        ("Bearer ", "", False),  # an empty authToken authorizes nobody
        ("", "", False),
    ],
)
def test_authorized(header: str | None, token: str, ok: bool) -> None:
    assert authorized(header, token) is ok


def _object(key: str, modified: datetime, etag: str = "abc", version: str | None = None) -> Any:
    return Object("uploads", key, last_modified=modified, etag=etag, size=3, version_id=version)


T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)


def test_changed_window_and_suffix() -> None:
    since, until = T0, T0 + timedelta(minutes=5)
    assert changed(_object("a.jpg", T0 + timedelta(seconds=1)), ".jpg", since, until)
    assert not changed(_object("a.jpg", T0), ".jpg", since, until)  # delivered already
    assert not changed(_object("a.jpg", until), ".jpg", since, until)  # the stream has it
    assert not changed(_object("a.png", T0 + timedelta(seconds=1)), ".jpg", since, until)


def test_synthetic_event() -> None:
    modified = T0 + timedelta(milliseconds=118)
    event = synthetic_event("uploads", _object("photos/summer 2024/aé.jpg", modified, "e1"))
    assert event.id == f"uploads/photos/summer 2024/aé.jpg/e1-{int(modified.timestamp() * 1000):X}"
    assert event.type == "io.minio.s3.ObjectCreated.Put"
    assert event.attributes["subject"] == "photos/summer 2024/aé.jpg"
    assert event.attributes["reconciled"] == "true"
    assert event.attributes["time"] == "2026-11-20T08:00:00.118Z"
    record = orjson.loads(event.data)
    assert record["eventSource"] == "eventhub:reconcile"
    assert record["s3"]["object"]["key"] == "photos%2Fsummer+2024%2Fa%C3%A9.jpg"
    again = synthetic_event("uploads", _object("photos/summer 2024/aé.jpg", modified, "e1"))
    assert again.id == event.id  # the same object version: the same id, deduplicated
    versioned = synthetic_event("uploads", _object("k", modified, "e1", version="v7"))
    assert versioned.id == "uploads/k/v7"


def test_reconciles_only_created_events() -> None:
    assert reconciles(["s3:ObjectCreated:*", "s3:ObjectRemoved:*"])
    assert reconciles(["s3:ObjectCreated:Put"])
    assert not reconciles(["s3:ObjectRemoved:*"])


def test_times() -> None:
    assert parse_time("2026-11-20T08:15:42.118Z") == datetime(
        2026, 11, 20, 8, 15, 42, 118000, tzinfo=UTC
    )
    assert parse_time(None) is None and parse_time("soon") is None
    assert format_time(parse_time("2026-11-20T08:15:42.118Z")) == "2026-11-20T08:15:42.118Z"

    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert server_time(_SocketResponse(ours)) == datetime(2026, 11, 20, 8, 15, 40, tzinfo=UTC)


class _SocketResponse:
    """What the SDK's EventIterable needs of a urllib3 response, over a real socket, so that
    shutting the socket down behaves as it does in production."""

    def __init__(self, sock: socket.socket) -> None:
        self.connection = self
        self.sock = sock
        self.headers = {"Date": "Fri, 20 Nov 2026 08:15:40 GMT"}
        self._file = sock.makefile("rb")
        self._eof = False

    def readline(self) -> bytes:
        line = self._file.readline()
        self._eof = self._eof or not line
        return line

    @property
    def closed(self) -> bool:
        return self._eof

    def close(self) -> None:
        self._file.close()

    def release_conn(self) -> None:
        pass


class _Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.opened = 0

    def listen_bucket_notification(self, *args: Any) -> EventIterable:
        def open_stream() -> _SocketResponse:
            self.opened += 1
            return _SocketResponse(self.sock)

        return EventIterable(open_stream)


async def _items_until_end(listener: _Listener) -> list[Any]:
    items = []
    while not isinstance(item := await asyncio.wait_for(listener.get(), 5), _Ended):
        items.append(item)
    return [*items, item]


async def test_listener_hands_over_each_document_then_ends() -> None:
    ours, theirs = socket.socketpair()
    theirs.sendall(sample("listen-stream.ndjson"))
    theirs.close()  # the server ends the stream
    client = _Client(ours)
    listener = _Listener(client, LISTEN, asyncio.get_running_loop())
    reader = asyncio.get_running_loop().run_in_executor(None, listener.run)
    items = await _items_until_end(listener)
    await reader
    assert isinstance(items[0], _Opened)
    assert items[0].server_time == datetime(2026, 11, 20, 8, 15, 40, tzinfo=UTC)
    records = [i for i in items if isinstance(i, _Records)]
    assert [r.doc["Records"][0]["eventName"] for r in records] == [
        "s3:ObjectCreated:Put",
        "s3:ObjectCreated:Put",
        "s3:ObjectRemoved:Delete",
    ]
    assert isinstance(items[-1], _Ended) and isinstance(items[-1].error, _StreamEnded)
    assert client.opened == 1  # the SDK's silent reopen was refused: the caller reconciles
    ours.close()


async def test_abandon_stops_a_blocked_reader() -> None:
    ours, theirs = socket.socketpair()
    theirs.sendall(b" ")  # keep-alive only: the reader blocks in readline
    listener = _Listener(_Client(ours), LISTEN, asyncio.get_running_loop())
    reader = asyncio.get_running_loop().run_in_executor(None, listener.run)
    assert isinstance(await asyncio.wait_for(listener.get(), 5), _Opened)
    listener.abandon()
    await asyncio.wait_for(reader, 30)  # without abandon, it would block for good
    theirs.close()
    ours.close()


async def test_close_hands_over_what_was_read() -> None:
    ours, theirs = socket.socketpair()
    listener = _Listener(_Client(ours), LISTEN, asyncio.get_running_loop())
    reader = asyncio.get_running_loop().run_in_executor(None, listener.run)
    assert isinstance(await asyncio.wait_for(listener.get(), 5), _Opened)
    theirs.sendall(sample("put.json").replace(b"\n", b"") + b"\n")
    first = await asyncio.wait_for(listener.get(), 5)
    assert isinstance(first, _Records)
    listener.close()
    assert isinstance(await asyncio.wait_for(listener.get(), 5), _Ended)
    await reader
    theirs.close()
    ours.close()
