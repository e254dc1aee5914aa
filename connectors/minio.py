"""MinIO source: bucket notifications by webhook (MinIO pushes) or ListenBucketNotification
(the hub pulls a stream), one CloudEvent per record (:func:`connectors.common.s3_events`).

=============  ====================================================================================
Outcome        ``mode: webhook`` (``POST /v1/sources/{name}/webhook``, :mod:`eventhub.api.webhooks`)
=============  ====================================================================================
ack            ``200`` only once every invocation is durably in JetStream.
nack           ``503`` + ``Retry-After`` while the source is paused or JetStream is full (and a
               ``5xx`` or a dropped connection when the hub fails mid-request). MinIO keeps the
               event in its ``queue_dir`` store and posts it again until a 2xx; without
               ``queue_dir`` MinIO drops it: configure one. A re-post keeps the record's
               ``sequencer``, so JetStream deduplicates it (within its duplicate window).
reject         ``400`` naming the problem for a body that is not a notification (whatever it
               holds: any error of the conversion is such a problem), ``401`` for a
               wrong ``authToken``, ``413`` above ``maxMessageSize``; nothing is enqueued (MinIO
               never posts such a body; its queue store would retry any non-2xx).
throttled      ``highWaterMark`` does not apply: the API process cannot see the functions' queue
               depth. Posts are refused (``503``) only once JetStream itself is full.
=============  ====================================================================================

=============  ====================================================================================
Outcome        ``mode: listen`` (the ``minio`` SDK's ``listen_bucket_notification``)
=============  ====================================================================================
ack            The stream has none. After ``ctx.deliver`` returned, the newest ``eventTime``
               delivered is saved (``ctx.save_state``: ``{"since": ...}``).
nack           None either: MinIO forgets what it streamed. When the stream fails or ends the run
               raises; the supervisor reconnects with backoff and the connector *reconciles*.
reject         A notification that cannot become events (a record without bucket, key or event
               name, values JSON cannot carry, any error of the conversion) becomes a dead letter
               of the source; the stream goes on.
throttled      ``deliver`` waits, the bounded hand-off fills and the reader stops reading. MinIO
               buffers 4000 events for a slow listener and then drops silently, so after
               ``_THROTTLE_GRACE`` seconds still throttled the connector disconnects on purpose,
               delivers what it had received, and reconnects (and reconciles) once there is room.
=============  ====================================================================================

Reconciliation, after every (re)connection: list the bucket (``ListObjectsV2``, the source's
prefix, filtered by its suffix) and emit a synthetic ``s3:ObjectCreated:Put`` record for each
object with ``since < LastModified < connected + 1 s`` (the server's ``Date`` of the listen
response; whole seconds), marked with the extension ``reconciled: "true"`` and
``eventSource: eventhub:reconcile`` in the data. Its id is ``bucket/key/<versionId>``, else
``bucket/key/<ETag>-<LastModified ms, hex>``: the same for every listing of one object version,
so re-listing (a crash mid-reconcile, two reconnects) is deduplicated by JetStream.

What reconciliation recovers: objects created or overwritten while nobody listened (stream down,
hub down, paused source, throttled disconnect), in their latest version. What it cannot:
removals (``ObjectRemoved``), accesses, metadata/tag/retention changes; intermediate versions of
an object overwritten several times; objects created and removed within the gap; objects whose
``LastModified`` is older than ``since`` (replicated or ``mc mirror --preserve`` copies; an
object written before the last delivered event but notified after it). A synthetic event's id
differs from the real notification's (``sequencer`` cannot be rebuilt from a listing), so an
object written in the second around a reconnection, or re-listed after a crash between deliver
and the saved ``since``, may be invoked twice: at-least-once. The first connection of a source
starts from "now" (it has no ``since``). Listing is O(objects under the prefix) per reconnect.
Only sources whose ``events`` include an ``s3:ObjectCreated:`` pattern reconcile.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote_plus, urlsplit

import orjson
import structlog

from connectors.common import Rejected, content_hash, convert, s3_events
from eventhub.events import Event
from eventhub.ports import Connector
from eventhub.resources import Resource
from eventhub.sources import SourceContext
from eventhub.sourcespecs import MinIOListen, MinIOSpec

log = structlog.get_logger(__name__)

_BUFFER = 256  # notifications handed from the reader thread to the loop, at most
_PAGE = 1000  # objects per listing call (one ListObjectsV2 page)
_THROTTLE_GRACE = 5.0  # seconds throttled before disconnecting on purpose
_STOP_WAIT = 5.0  # seconds to wait for the reader thread when stopping
_CONNECT_TIMEOUT = 10.0
_READ_TIMEOUT = 60.0  # MinIO writes a keep-alive every 0.5 s: this long silent is a dead link
_RECONCILE_EVENT = "s3:ObjectCreated:Put"


def connector(resource: Resource) -> Connector:
    return MinIOConnector(resource)


def notification_events(body: bytes) -> list[Event]:
    """The events of one webhook POST; raises :class:`Rejected` for a body that is none.

    MinIO posts exactly one record per request (``{"EventName", "Key", "Records": [record]}``)
    and sends no test notification (its set-up probe is a ``HEAD`` on the endpoint), so an empty
    body or one without ``Records`` is an error; an explicit ``"Records": []`` is nothing to do.
    """
    return convert(lambda: _notification_events(body))


def _notification_events(body: bytes) -> list[Event]:
    if not body.strip():
        raise Rejected("empty: the body is empty; expected a MinIO notification with Records")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Rejected(f"invalid-json: {exc}") from None
    if isinstance(doc, dict) and doc.get("Records") == []:
        return []
    return s3_events(body)


def listen_payload(doc: Any) -> bytes:
    """A notification of the listen stream (parsed by the SDK's ``json``) as JSON bytes. What
    orjson refuses (integers past 64 bits, lone surrogates, NaN) is written by ``json``, so that
    the notification can still be kept as a dead letter."""
    try:
        return orjson.dumps(doc)
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(doc, default=str).encode("ascii")


def listen_events(payload: bytes, max_size: int) -> list[Event]:
    """The events of one notification of the listen stream; raises :class:`Rejected`."""

    def events() -> list[Event]:
        if len(payload) > max_size:
            raise Rejected(f"too-large: {len(payload)} bytes, above maxMessageSize {max_size}")
        return s3_events(payload)

    return convert(events)


def authorized(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` the way MinIO sends it.

    MinIO sends ``Bearer <token>`` for a one-word token and a two-word token (``Basic abc``)
    as is; older releases sent any token as is. Both comparisons are made, in constant time.
    An empty token matches nothing (MinIO sends no header at all for one).
    """
    if not header or not token.strip():
        return False
    given = header.strip()
    scheme, _, credentials = given.partition(" ")
    bearer = credentials.strip() if scheme.lower() == "bearer" else ""
    expected = token.strip().encode()
    as_is = hmac.compare_digest(given.encode(), expected)
    with_bearer = hmac.compare_digest(bearer.encode(), expected)
    return as_is or with_bearer


class MinIOConnector:
    def __init__(self, resource: Resource) -> None:
        self._spec: MinIOSpec = resource.model

    async def run(self, ctx: SourceContext) -> None:
        if self._spec.listen is None or self._spec.mode == "webhook":
            # Notifications arrive over HTTP (eventhub.api.webhooks): nothing to consume here.
            # Staying "running" until stopped keeps the source's status truthful.
            await asyncio.Event().wait()
            return
        await _ListenMode(ctx, self._spec.listen, self._spec.max_message_size).run()


@dataclass(frozen=True)
class _Opened:
    server_time: datetime


@dataclass(frozen=True)
class _Records:
    doc: dict[str, Any]


@dataclass(frozen=True)
class _Ended:
    error: Exception | None


_Item = _Opened | _Records | _Ended


class _ListenMode:
    """One run of a listen source: connections, reconciliation and ``since``."""

    def __init__(self, ctx: SourceContext, listen: MinIOListen, max_size: int) -> None:
        self.ctx = ctx
        self.listen = listen
        self.max_size = max_size
        self.since: datetime | None = None

    async def run(self) -> None:
        state = await self.ctx.load_state() or {}
        self.since = parse_time(state.get("since"))
        client = make_client(self.listen)
        # Its own threads, not the loop's default pool (which getaddrinfo needs): the reader
        # blocks for the life of a connection. Reader, listing, and a spare for a reader still
        # connecting when the next connection starts.
        executor = ThreadPoolExecutor(3, thread_name_prefix=f"minio-{self.ctx.name}")
        try:
            while True:
                await self.ctx.room.wait()
                await self._connection(client, executor)
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

    async def _connection(self, client: Any, executor: ThreadPoolExecutor) -> None:
        """Until the stream fails (raises) or a long throttle (returns once drained)."""
        loop = asyncio.get_running_loop()
        listener = _Listener(client, self.listen, loop)
        reader = loop.run_in_executor(executor, listener.run)
        try:
            while True:
                item = await listener.get()
                if isinstance(item, _Ended):
                    raise ConnectionError(f"the listen stream ended: {item.error}") from item.error
                if isinstance(item, _Opened):
                    await self._reconcile(client, executor, item.server_time)
                    continue
                if not self.ctx.room.is_set() and not await _room_within(self.ctx, _THROTTLE_GRACE):
                    log.info("minio_listen_paused", source=self.ctx.name, reason="throttled")
                    listener.close()
                    await self._deliver(item.doc)
                    await self._drain(listener)
                    return
                await self._deliver(item.doc)
        finally:
            listener.abandon()
            await _finish(reader, self.ctx.name)

    async def _drain(self, listener: _Listener) -> None:
        """Deliver what the closed stream had handed over, up to its end."""
        while not isinstance(item := await listener.get(), _Ended):
            if isinstance(item, _Records):
                await self._deliver(item.doc)

    async def _deliver(self, doc: dict[str, Any]) -> None:
        payload = listen_payload(doc)
        try:
            events = listen_events(payload, self.max_size)
        except Rejected as exc:
            meta = {"bucket": self.listen.bucket}
            await self.ctx.reject(content_hash(payload), exc.reason, payload, meta)
            return
        await self.ctx.deliver(events)
        await self._advance(max((parse_time(e.attributes.get("time")) for e in events), key=_key))

    async def _advance(self, when: datetime | None) -> None:
        if when is not None and (self.since is None or when > self.since):
            self.since = when
            await self.ctx.save_state({"since": format_time(when)})

    async def _reconcile(self, client: Any, executor: ThreadPoolExecutor, at: datetime) -> None:
        since, until = self.since, at + timedelta(seconds=1)
        log.info("minio_listen_connected", source=self.ctx.name, since=format_time(since))
        if since is None or not reconciles(self.listen.events):
            await self._advance(at)  # a first connection starts from now
            return
        loop, after, found = asyncio.get_running_loop(), None, 0
        while True:
            page, after = await loop.run_in_executor(
                executor, list_page, client, self.listen, after
            )
            events = [
                synthetic_event(self.listen.bucket, obj)
                for obj in page
                if changed(obj, self.listen.suffix, since, until)
            ]
            if events:
                await self.ctx.deliver(events)
                found += len(events)
            if after is None:
                break
        log.info("minio_reconciled", source=self.ctx.name, objects=found, until=format_time(until))
        # Not ``until``: an object of that last second listed now and missed later is listed
        # again, with the same id (deduplicated), rather than never.
        await self._advance(at)


class _StreamEnded(ConnectionError):
    pass


class _Abandoned(Exception):
    pass


class _Listener:
    """The SDK's blocking ListenBucketNotification iterator, read in a worker thread and handed
    to the loop through a bounded queue (the thread blocks while ``_BUFFER`` items wait).

    The SDK reopens the stream by itself when it ends; here a second open ends the run instead
    (``_Ended``), so that the caller reconnects *and reconciles*. ``close()`` shuts the socket
    down: the thread hands over what it had read, then ``_Ended``. ``abandon()`` (cancellation)
    also drops what is in hand, so the thread never waits for a consumer that is gone.
    """

    def __init__(self, client: Any, listen: MinIOListen, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._listen = listen
        self._loop = loop
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=_BUFFER + 1)  # + _Ended
        self._slots = threading.Semaphore(_BUFFER)
        self._closing = threading.Event()
        self._abandoned = threading.Event()
        self._lock = threading.Lock()
        self._response: Any = None

    async def get(self) -> _Item:
        item = await self._queue.get()
        if not isinstance(item, _Ended):
            self._slots.release()
        return item

    def close(self) -> None:
        self._closing.set()
        self._shutdown()

    def abandon(self) -> None:
        self._abandoned.set()
        self._slots.release()  # wakes a thread waiting for room in the queue
        self.close()

    def run(self) -> None:
        """The worker thread: read until the stream fails, ends or is closed."""
        error: Exception | None = None
        try:
            stream = self._client.listen_bucket_notification(
                self._listen.bucket, self._listen.prefix, self._listen.suffix,
                tuple(self._listen.events),
            )  # fmt: skip
            # The SDK (7.2) opens and silently reopens through ``_func``: wrap it, to learn of
            # each (re)connection, its response (to shut its socket down) and server Date.
            stream._func = self._opener(stream._func)
            with stream:
                for doc in stream:
                    self._hand(_Records(doc))
        except _Abandoned:
            return
        except Exception as exc:  # handed to the loop, which raises it
            error = exc
        if not self._abandoned.is_set():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                self._loop.call_soon_threadsafe(self._queue.put_nowait, _Ended(error))

    def _opener(self, open_stream: Callable[[], Any]) -> Callable[[], Any]:
        def open_once() -> Any:
            if self._response is not None or self._closing.is_set():
                raise _StreamEnded("the ListenBucketNotification stream was closed")
            response = open_stream()
            with self._lock:
                self._response = response
            if self._closing.is_set():
                self._shutdown()
            self._hand(_Opened(server_time(response)))
            return response

        return open_once

    def _hand(self, item: _Item) -> None:
        self._slots.acquire()
        if self._abandoned.is_set():
            raise _Abandoned
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed
            raise _Abandoned from None

    def _shutdown(self) -> None:
        # Closing a socket does not wake a thread blocked reading it; shutting it down does.
        with self._lock:
            connection = getattr(self._response, "connection", None)
            sock = getattr(connection, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


async def _room_within(ctx: SourceContext, seconds: float) -> bool:
    try:
        await asyncio.wait_for(ctx.room.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def _finish(reader: asyncio.Future[None], source: str) -> None:
    """Wait for the reader thread; its socket is shut down, so it ends at once unless it is
    still connecting (bounded by the client's connect timeout and retries)."""
    done, _ = await asyncio.wait([reader], timeout=_STOP_WAIT)
    if not done:
        log.warning("minio_listen_reader_lingers", source=source)
        reader.add_done_callback(lambda f: f.cancelled() or f.exception())


def make_client(listen: MinIOListen) -> Any:
    import urllib3  # the SDK is imported here: webhook mode needs neither
    from minio import Minio

    endpoint, secure = listen.endpoint, listen.secure
    if "://" in endpoint:  # accept a URL too: its scheme decides ``secure``
        url = urlsplit(endpoint)
        endpoint, secure = url.netloc, url.scheme == "https"
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=_CONNECT_TIMEOUT, read=_READ_TIMEOUT),
        maxsize=4,
        retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )
    return Minio(
        endpoint,
        access_key=listen.access_key,
        secret_key=listen.secret_key.get_secret_value(),
        secure=secure,
        http_client=http,
    )


def list_page(client: Any, listen: MinIOListen, after: str | None) -> tuple[list[Any], str | None]:
    """Up to ``_PAGE`` objects after the key ``after``, and the key to continue from (None at
    the end). Runs in a worker thread."""
    objects = client.list_objects(
        listen.bucket, prefix=listen.prefix or None, recursive=True, start_after=after
    )
    page = list(itertools.islice(objects, _PAGE))
    return page, page[-1].object_name if len(page) == _PAGE else None


def reconciles(patterns: Sequence[str]) -> bool:
    return any(p.startswith("s3:ObjectCreated:") for p in patterns)


def changed(obj: Any, suffix: str, since: datetime, until: datetime) -> bool:
    modified = obj.last_modified
    return (
        not obj.is_dir
        and str(obj.object_name).endswith(suffix)
        and modified is not None
        and since < modified < until
    )


def synthetic_event(bucket: str, obj: Any) -> Event:
    """The ``ObjectCreated`` event of a listed object (see the module docstring)."""
    modified: datetime = obj.last_modified
    version = obj.version_id if obj.version_id not in (None, "", "null") else None
    identity = version or f"{obj.etag}-{int(modified.timestamp() * 1000):X}"
    record = {
        "eventVersion": "2.0",
        "eventSource": "eventhub:reconcile",
        "eventTime": format_time(modified),
        "eventName": _RECONCILE_EVENT,
        "s3": {
            "s3SchemaVersion": "1.0",
            "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
            "object": {
                "key": quote_plus(obj.object_name, safe=""),
                "size": obj.size,
                "eTag": obj.etag,
                "versionId": version or "",
                "sequencer": identity,
            },
        },
    }
    [event] = s3_events(orjson.dumps({"Records": [record]}))
    return event.with_extensions(reconciled="true")


def server_time(response: Any) -> datetime:
    """The server's clock at connection (its ``Date``), else ours."""
    with contextlib.suppress(TypeError, ValueError, AttributeError):
        return parsedate_to_datetime(response.headers.get("Date")).astimezone(UTC)
    return datetime.now(UTC)


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):  # not a time, or one UTC cannot hold (year 1, +05:00)
        return None


def format_time(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _key(value: datetime | None) -> datetime:
    return value or datetime.min.replace(tzinfo=UTC)
