"""MinIO source against the real hub (JetStream, PostgreSQL, Redis).

No MinIO server runs here: webhook mode is driven with MinIO's notification samples
(tests/data/minio), exactly as MinIO posts them; listen mode talks, through the real ``minio``
SDK, to :class:`FakeMinIO`, just enough of MinIO's HTTP API for the calls the connector makes
(GetBucketLocation, ListObjectsV2, and ListenBucketNotification: newline-delimited JSON with
``" "`` keep-alives every half second, as MinIO writes them).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, unquote
from xml.sax.saxutils import escape

import aiohttp
import orjson
import pytest
from aiohttp import web

import connectors.minio as minio_connector
from connectors.minio import notification_events
from tests.support import FunctionServer, HubProcess, RunningHub

SAMPLES = Path(__file__).parents[1] / "data" / "minio"
TOKEN = "minio-webhook-s3cret"
S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _ms(value: datetime) -> str:
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class FakeObject:
    etag: str
    modified: datetime
    size: int


class FakeMinIO:
    """One bucket: objects for ListObjectsV2, and the listeners of ListenBucketNotification.

    ``gate`` held closed makes new listen requests wait (a MinIO that cannot be reached yet);
    ``end_streams()`` ends every open stream the way a MinIO restart does.
    """

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self.objects: dict[str, FakeObject] = {}
        self.gate = asyncio.Event()
        self.gate.set()
        self.connections = 0
        self._streams: set[asyncio.Queue[bytes | None]] = set()
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._last = datetime.now(UTC) - timedelta(hours=1)
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{bucket}", self._bucket)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self.gate.set()
        self.end_streams()
        if self._runner is not None:
            await self._runner.cleanup()

    def _now(self) -> datetime:
        now = datetime.now(UTC)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        self._last = max(now, self._last + timedelta(milliseconds=1))  # ms, strictly increasing
        return self._last

    def put(self, key: str, *, at: datetime | None = None) -> dict[str, Any]:
        """Store an object and notify the listeners (if any), as MinIO does."""
        modified = at.replace(microsecond=at.microsecond // 1000 * 1000) if at else self._now()
        etag = hashlib.md5(f"{key}{modified}".encode(), usedforsecurity=False).hexdigest()
        self.objects[key] = FakeObject(etag, modified, len(key))
        return self._notify(key, "s3:ObjectCreated:Put", modified, etag)

    def remove(self, key: str) -> dict[str, Any]:
        del self.objects[key]
        return self._notify(key, "s3:ObjectRemoved:Delete", self._now(), None)

    def _notify(self, key: str, name: str, at: datetime, etag: str | None) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "key": quote_plus(key, safe=""),
            "sequencer": f"{int(at.timestamp() * 1e9):X}",
        }
        if etag:
            obj |= {"eTag": etag, "size": len(key)}
        record = {
            "eventVersion": "2.0",
            "eventSource": "minio:s3",
            "eventTime": _ms(at),
            "eventName": name,
            "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": self.bucket}, "object": obj},
        }
        self.send(orjson.dumps({"Records": [record]}) + b"\n")
        return record

    def send(self, raw: bytes) -> None:
        for stream in self._streams:
            stream.put_nowait(raw)

    def end_streams(self) -> None:
        for stream in self._streams:
            stream.put_nowait(None)

    async def wait_listening(self, connections: int, wait: float = 15.0) -> None:
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(
                    lambda: self.connections >= connections and bool(self._streams)
                ),
                wait,
            )

    @property
    def listening(self) -> bool:
        return bool(self._streams)

    async def _bucket(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["bucket"] != self.bucket:
            return web.Response(status=404, text="NoSuchBucket")
        if "location" in request.query:
            return _xml(f'<LocationConstraint xmlns="{S3_NS}"></LocationConstraint>')
        if request.query.get("list-type") == "2":
            return self._list(request)
        if "events" in request.query:
            return await self._listen(request)
        return web.Response(status=501, text="not in the fake")

    def _list(self, request: web.Request) -> web.Response:
        prefix = request.query.get("prefix", "")
        after = request.query.get("continuation-token") or request.query.get("start-after", "")
        limit = int(request.query.get("max-keys", "1000"))
        keys = sorted(k for k in self.objects if k.startswith(prefix) and k > after)
        page, truncated = keys[:limit], len(keys) > limit
        contents = "".join(
            f"<Contents><Key>{escape(quote_plus(k, safe='/'))}</Key>"
            f"<LastModified>{_ms(self.objects[k].modified)}</LastModified>"
            f"<ETag>&quot;{self.objects[k].etag}&quot;</ETag><Size>{self.objects[k].size}</Size>"
            "<StorageClass>STANDARD</StorageClass></Contents>"
            for k in page
        )
        token = f"<NextContinuationToken>{escape(page[-1])}</NextContinuationToken>"
        return _xml(
            f'<ListBucketResult xmlns="{S3_NS}"><Name>{self.bucket}</Name>'
            f"<Prefix>{escape(prefix)}</Prefix><KeyCount>{len(page)}</KeyCount>"
            f"<MaxKeys>{limit}</MaxKeys><EncodingType>url</EncodingType>"
            f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"
            f"{token if truncated else ''}{contents}</ListBucketResult>"
        )

    async def _listen(self, request: web.Request) -> web.StreamResponse:
        await self.gate.wait()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        stream: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4000)
        async with self._changed:
            self._streams.add(stream)
            self.connections += 1
            self._changed.notify_all()
        try:
            await response.write(b" ")
            while (line := await _next_line(stream)) is not None:
                await response.write(line)
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass  # the listener went away
        finally:
            async with self._changed:
                self._streams.discard(stream)
                self._changed.notify_all()
        return response


async def _next_line(stream: asyncio.Queue[bytes | None]) -> bytes | None:
    try:
        return await asyncio.wait_for(stream.get(), 0.5)
    except TimeoutError:
        return b" "  # MinIO's keep-alive


def _xml(body: str) -> web.Response:
    text = '<?xml version="1.0" encoding="UTF-8"?>\n' + body
    return web.Response(text=text, content_type="application/xml")


@pytest.fixture
async def fake() -> AsyncIterator[FakeMinIO]:
    server = FakeMinIO("uploads")
    await server.start()
    yield server
    await server.stop()


# -- webhook mode ---------------------------------------------------------------------------


async def _webhook_source(hub: RunningHub, function: FunctionServer, **spec: Any) -> str:
    fn, source = _name("fn"), _name("minio")
    await hub.function(fn, function.url(fn))
    await hub.put(
        "sources", source, {"type": "minio", "mode": "webhook", "authToken": TOKEN, **spec}
    )
    await hub.bind(_name("b"), fn, source=source)
    return source


async def _post(
    hub: RunningHub, source: str, body: bytes, authorization: str | None = f"Bearer {TOKEN}"
) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    url = f"{hub.base_url}/v1/sources/{source}/webhook"
    async with hub.http.post(url, data=body, headers=headers) as response:
        return response.status, await response.json(content_type=None), dict(response.headers)


def _sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


async def test_webhook_samples_become_one_cloudevent_per_record(
    hub: RunningHub, function: FunctionServer
) -> None:
    source = await _webhook_source(hub, function)
    expected: dict[str, dict[str, str]] = {}
    data: dict[str, bytes] = {}
    for name in ("put.json", "multipart.json", "delete.json", "two-records.json"):
        # MinIO sends "Bearer <token>"; releases before 2021 sent the bare token: both work.
        auth = TOKEN if name == "delete.json" else f"Bearer {TOKEN}"
        status, body, _ = await _post(hub, source, _sample(name), auth)
        assert (status, body) == (200, {"accepted": 2 if name == "two-records.json" else 1})
        events = notification_events(_sample(name))
        expected |= {e.id: dict(e.attributes) for e in events}
        data |= {e.id: e.data for e in events}
    # two-records.json's first record is put.json's (same bucket, key and sequencer): the same
    # event id, so JetStream deduplicates it: 5 records posted, 4 distinct events invoked.
    assert len(expected) == 4
    calls = await function.wait_for(4)
    await asyncio.sleep(0.3)
    assert len(function.calls) == 4
    got = {
        unquote(c.ce["id"]): {
            **{k: unquote(v) for k, v in c.ce.items()},
            "datacontenttype": c.headers["content-type"],  # binary mode: Content-Type
        }
        for c in calls
    }
    assert got == expected
    assert {unquote(c.ce["id"]): orjson.loads(c.body) for c in calls} == {
        k: orjson.loads(v) for k, v in data.items()
    }  # data: the record
    multipart = got["media/photos/summer 2024/aé.jpg/1879A6C9B1C20A47"]
    assert multipart["subject"] == "photos/summer 2024/aé.jpg"
    assert multipart["type"] == "io.minio.s3.ObjectCreated.CompleteMultipartUpload"
    assert multipart["source"] == "s3://media"
    delete = next(c for c in calls if c.ce["type"] == "io.minio.s3.ObjectRemoved.Delete")
    assert orjson.loads(delete.body)["s3"]["object"]["key"] == "images%2Fcat.jpg"
    assert delete.headers["content-type"] == "application/json"


async def test_webhook_wrong_or_missing_token_is_401(
    hub: RunningHub, function: FunctionServer
) -> None:
    source = await _webhook_source(hub, function)
    for authorization in ("Bearer nope", None, f"Bearer {TOKEN}x", "test-admin-token"):
        status, body, _ = await _post(hub, source, _sample("put.json"), authorization)
        assert status == 401, body
        assert "authToken" in body["detail"]
    status, _, _ = await _post(hub, source, _sample("delete.json"))
    assert status == 200
    calls = await function.wait_for(1)
    assert [c.ce["type"] for c in calls] == ["io.minio.s3.ObjectRemoved.Delete"]


async def test_webhook_paused_source_is_503_with_retry_after(
    hub: RunningHub, function: FunctionServer
) -> None:
    source = await _webhook_source(hub, function)
    pause = f"{hub.base_url}/v1/sources/{source}/pause"
    async with hub.http.post(pause, headers=hub.auth()) as response:
        assert response.status == 200
    status, body, headers = await _post(hub, source, _sample("put.json"))
    assert status == 503 and "paused" in body["detail"]
    assert int(headers["Retry-After"]) > 0
    async with hub.http.post(pause.replace("/pause", "/resume"), headers=hub.auth()) as response:
        assert response.status == 200
    status, _, _ = await _post(hub, source, _sample("put.json"))  # MinIO's retry
    assert status == 200
    assert len(await function.wait_for(1)) == 1


async def test_webhook_above_the_high_water_mark_is_503(
    hub: RunningHub, function: FunctionServer
) -> None:
    fn, source = _name("fn"), _name("minio")
    function.delays[fn] = 5.0  # every call stays in flight
    await hub.function(fn, function.url(fn), maxConcurrency=1)
    spec = {"type": "minio", "mode": "webhook", "authToken": TOKEN, "highWaterMark": 2}
    await hub.put("sources", source, spec)
    await hub.bind(_name("b"), fn, source=source)
    for sample in ("put.json", "delete.json"):
        status, _, _ = await _post(hub, source, _sample(sample))
        assert status == 200
    await asyncio.sleep(1.1)  # the depth the webhook sees is up to a second old
    status, body, headers = await _post(hub, source, _sample("multipart.json"))
    assert status == 503, body
    assert "highWaterMark" in body["detail"] and int(headers["Retry-After"]) > 0


async def test_webhook_unknown_or_other_source_is_404(
    hub: RunningHub, function: FunctionServer
) -> None:
    status, body, _ = await _post(hub, _name("nosuch"), _sample("put.json"))
    assert status == 404 and "webhook" in body["detail"]
    listen = _name("listen")
    spec = {"endpoint": "127.0.0.1:9", "accessKey": "a", "secretKey": "b", "bucket": "uploads"}
    await hub.put("sources", listen, {"type": "minio", "mode": "listen", "listen": spec})
    status, _, _ = await _post(hub, listen, _sample("put.json"))
    assert status == 404


async def test_webhook_garbage_is_400_and_nothing_is_enqueued(
    hub: RunningHub, function: FunctionServer
) -> None:
    source = await _webhook_source(hub, function, maxMessageSize="4KiB")
    bad = {
        b"": "empty",
        b"<xml/>": "invalid-json",
        b'{"EventName": "s3:ObjectCreated:Put", "Key": "uploads/x"}': "no Records",
        b'{"Records": [{"eventName": "s3:ObjectCreated:Put", "s3": {}}]}': "record 0",
    }
    for body, reason in bad.items():
        status, problem, _ = await _post(hub, source, body)
        assert status == 400, problem
        assert reason in problem["detail"], problem
    status, problem, _ = await _post(hub, source, b'{"Records": [' + b" " * 5000 + b"]}")
    assert status == 413, problem
    status, problem, _ = await _post(hub, source, b'{"Records": []}')
    assert (status, problem) == (200, {"accepted": 0})
    await _post(hub, source, _sample("delete.json"))
    await function.wait_for(1)
    await asyncio.sleep(0.3)
    assert [c.ce["type"] for c in function.calls] == ["io.minio.s3.ObjectRemoved.Delete"]
    assert await hub.dead_letters(source=source) == []


async def test_webhook_repost_of_a_notification_is_invoked_once(
    hub: RunningHub, function: FunctionServer
) -> None:
    source = await _webhook_source(hub, function)
    for _ in range(3):  # MinIO re-posts what it could not confirm
        status, _, _ = await _post(hub, source, _sample("put.json"))
        assert status == 200
    await _post(hub, source, _sample("delete.json"))
    await function.wait_for(2)
    await asyncio.sleep(0.5)
    assert sorted(c.ce["type"] for c in function.calls) == [
        "io.minio.s3.ObjectCreated.Put",
        "io.minio.s3.ObjectRemoved.Delete",
    ]


# -- listen mode ----------------------------------------------------------------------------


def _listen_spec(fake: FakeMinIO, **listen: Any) -> dict[str, Any]:
    return {
        "type": "minio",
        "mode": "listen",
        "listen": {
            "endpoint": fake.endpoint,
            "accessKey": "minioadmin",
            "secretKey": "minioadmin",
            "bucket": fake.bucket,
            **listen,
        },
    }


async def _listen_source(
    hub: RunningHub | HubProcess,
    function: FunctionServer,
    fake: FakeMinIO,
    spec: dict[str, Any] | None = None,
    **fn_spec: Any,
) -> tuple[str, str]:
    fn, source = _name("fn"), _name("minio")
    admin = {"Authorization": f"Bearer {hub.token}"}
    async with aiohttp.ClientSession(headers=admin) as http:
        for kind, name, body in (
            ("functions", fn, {"url": function.url(fn), **fn_spec}),
            ("sources", source, spec or _listen_spec(fake)),
            ("bindings", _name("b"), {"source": source, "function": fn}),
        ):
            url = f"{hub.base_url}/v1/{kind}/{name}"
            async with http.put(url, json={"spec": body}) as response:
                assert response.status in (200, 201), await response.text()
    return fn, source


def _subjects(function: FunctionServer, fn: str) -> list[str]:
    return sorted(unquote(c.ce["subject"]) for c in function.calls_to(fn))


async def test_listen_streams_records_through_keep_alives(
    hub: RunningHub, function: FunctionServer, fake: FakeMinIO
) -> None:
    fn, _ = await _listen_source(hub, function, fake)
    await fake.wait_listening(1)
    fake.send(_sample("listen-stream.ndjson"))  # three notifications, keep-alive lines between
    calls = await function.wait_for(3, fn)
    assert [(c.ce["type"], unquote(c.ce["id"])) for c in calls] == [
        ("io.minio.s3.ObjectCreated.Put", "uploads/images/cat.jpg/1879A6C4E3A6F1D2"),
        ("io.minio.s3.ObjectCreated.Put", "uploads/images/dog.png/1879A6C4E3A6F2B9"),
        ("io.minio.s3.ObjectRemoved.Delete", "uploads/images/cat.jpg/1879AA3E78A1C0E4"),
    ]
    assert all(c.ce["source"] == "s3://uploads" and "reconciled" not in c.ce for c in calls)


async def test_listen_reconciles_objects_created_while_disconnected(
    hub: RunningHub, function: FunctionServer, fake: FakeMinIO
) -> None:
    fake.put("old.jpg", at=datetime.now(UTC) - timedelta(hours=2))  # before the source existed
    fn, _ = await _listen_source(hub, function, fake, _listen_spec(fake, suffix=".jpg"))
    await fake.wait_listening(1)
    fake.put("a.jpg")
    await function.wait_for(1, fn)

    fake.gate.clear()  # MinIO goes away: the stream ends, reconnecting waits
    fake.end_streams()
    fake.put("b.jpg")  # all in the gap: no listener hears of them
    fake.put("c.png")  # outside the suffix filter
    fake.put("d.jpg")
    fake.put("deep/e f.jpg")
    fake.remove("a.jpg")  # a removal in the gap cannot be recovered by listing
    fake.gate.set()
    await fake.wait_listening(2)

    calls = await function.wait_for(4, fn)
    assert _subjects(function, fn) == ["a.jpg", "b.jpg", "d.jpg", "deep/e f.jpg"]
    reconciled = [c for c in calls if c.ce.get("reconciled") == "true"]
    assert sorted(unquote(c.ce["subject"]) for c in reconciled) == [
        "b.jpg",
        "d.jpg",
        "deep/e f.jpg",
    ]
    for call in reconciled:
        assert call.ce["type"] == "io.minio.s3.ObjectCreated.Put"
        obj = fake.objects[unquote(call.ce["subject"])]
        assert unquote(call.ce["id"]).startswith(
            f"uploads/{unquote(call.ce['subject'])}/{obj.etag}-"
        )
        assert orjson.loads(call.body)["eventSource"] == "eventhub:reconcile"

    fake.put("after.jpg")  # the new stream carries notifications again
    await function.wait_for(5, fn)
    await asyncio.sleep(0.3)
    assert _subjects(function, fn) == ["a.jpg", "after.jpg", "b.jpg", "d.jpg", "deep/e f.jpg"]


async def test_listen_burst_above_high_water_mark_pauses_and_loses_nothing(
    hub: RunningHub,
    function: FunctionServer,
    fake: FakeMinIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(minio_connector, "_THROTTLE_GRACE", 0.3)
    spec = {**_listen_spec(fake), "highWaterMark": 2}
    fn, _ = await _listen_source(hub, function, fake, spec, maxConcurrency=1)
    function.delays[fn] = 0.15
    await fake.wait_listening(1)
    keys: list[str] = []
    while fake.listening:  # until, throttled past the grace, it lets go of the stream
        assert len(keys) < 200, "the source never paused"
        keys.append(f"burst/{len(keys):03}.jpg")
        fake.put(keys[-1])
        await asyncio.sleep(0.05)
    gap = [f"gap/{i:02}.jpg" for i in range(12)]
    for key in gap:
        fake.put(key)  # nobody listens: only reconciliation can find these
    await function.wait_for(len(keys + gap), fn, wait=30)
    await asyncio.sleep(0.3)
    assert _subjects(function, fn) == sorted(keys + gap)  # each once, none lost
    assert fake.connections >= 2
    reconciled = [c for c in function.calls_to(fn) if c.ce.get("reconciled") == "true"]
    # the gap, and any notification MinIO sent as the connector let go, came from the listing
    assert set(gap) <= {unquote(c.ce["subject"]) for c in reconciled}


@pytest.mark.slow
async def test_listen_hub_killed_holding_notifications_recovers_them(
    hub_process: Any, function: FunctionServer, fake: FakeMinIO
) -> None:
    """kill -9 while the connector holds notifications it has not enqueued (throttled: the
    function is slow and the source's highWaterMark is 1): the next hub reconciles them."""
    first: HubProcess = hub_process()
    await first.ready()
    spec = {**_listen_spec(fake), "highWaterMark": 1}
    fn, _ = await _listen_source(first, function, fake, spec)
    function.delays[fn] = 6.0  # k0 stays in flight: the function is at its high-water mark
    await fake.wait_listening(1)
    fake.put("k0.jpg")
    await function.wait_for(1, fn)
    await _wait_logged(first, "source_throttled")
    for i in range(1, 4):
        fake.put(f"k{i}.jpg")  # received by the connector, held: no room
    await asyncio.sleep(0.5)
    first.kill()
    assert _subjects(function, fn) == ["k0.jpg"]

    function.delays[fn] = 0
    second: HubProcess = hub_process()
    await second.ready()
    deadline = time.monotonic() + 30
    while set(_subjects(function, fn)) != {f"k{i}.jpg" for i in range(4)}:
        assert time.monotonic() < deadline, _subjects(function, fn)
        await asyncio.sleep(0.1)
    # k1-k3 never reached JetStream: the second hub found them by listing the bucket
    later = [c for c in function.calls_to(fn) if unquote(c.ce["subject"]) != "k0.jpg"]
    assert all(c.ce.get("reconciled") == "true" for c in later)


async def _wait_logged(process: HubProcess, text: str, wait: float = 15.0) -> None:
    deadline = time.monotonic() + wait
    while text not in process.output():
        assert time.monotonic() < deadline, f"never logged {text}: {process.output()}"
        await asyncio.sleep(0.1)
