"""Sources: one supervised connector per Source resource, in the ``ingest`` role.

The :class:`SourceSupervisor` keeps a :class:`SourceRunner` per Source, in step with the routing
table: a Source starts once a Binding names it, a changed one restarts, a paused or deleted one
(or one whose last Binding went) stops (its transport
keeps what arrives meanwhile: Kafka offsets are not committed, AMQP and MQTT messages stay
queued, MinIO's webhook gets 503 and retries). A connector that fails is restarted with capped
exponential backoff; its state and last error are published to Redis for
``GET /v1/sources/{name}/status``, whichever process asks.

A connector talks to the hub only through its :class:`SourceContext`:

- ``deliver(events)`` returns once every invocation is durably in JetStream. While a function
  bound to the source is above the source's ``highWaterMark``, or JetStream is full, it waits
  (``room`` is clear) instead of failing: the connector stops taking, nothing is dropped.
- ``reject(...)`` stores a message that cannot become an event as a dead letter of the source,
  durably, so the connector can acknowledge it and move on.
- ``deliveries(window)`` pipelines: up to ``window`` deliveries in flight at once, each
  acknowledged (its ``ack`` called) only once it and every delivery started before it have
  returned, so the transport hears of them in the order it sent them (see :class:`Deliveries`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import time
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Hashable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

import orjson
import redis.asyncio as aioredis
import structlog

from eventhub.errors import MessageTooLarge, QueueFull
from eventhub.events import Event, now_rfc3339
from eventhub.ingress import Ingress
from eventhub.metrics import Metrics
from eventhub.ports import Connector, DeadLetterRecord, DeadLetterSink, dead_letter_id
from eventhub.queue import InvocationQueue
from eventhub.resources import Resource
from eventhub.routing import Router, Routes
from eventhub.store import ResourceStore

log = structlog.get_logger(__name__)

ConnectorFactory = Callable[[Resource], Connector]
_STATUS_EVERY = 5.0
_STATUS_TTL = 15
_ROOM_EVERY = 1.0
_BACKOFF_MAX = 30.0
_STOP_TIMEOUT = 10.0
PROCESS_ID = f"{socket.gethostname()}:{os.getpid()}"
_CORE_ATTRIBUTES = frozenset({"specversion", "id", "source", "type"})


Ack = Callable[[], None]


def raise_first(group: BaseExceptionGroup[Any]) -> NoReturn:
    """Leave a task group with its first failure rather than the group; but a task being
    cancelled leaves cancelled (Python 3.11's TaskGroup raises the group instead when a child
    failed meanwhile, and a stop request would be lost)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    raise group.exceptions[0]  # the group is its context already


class Deliveries:
    """Deliveries in flight, acknowledged in the order they were started.

    ``start(work, ack)`` waits until fewer than ``window`` are in flight, then runs ``work`` (a
    coroutine that converts messages and calls ``ctx.deliver`` / ``ctx.reject``) in a task of
    its own. ``ack`` (a plain function: it sends or records the acknowledgement, it does not
    wait) is called as soon as that work and the work of every earlier ``start`` have returned,
    in start order, from the completion of the work itself: a transport whose acknowledgements
    are cumulative (an AMQP ``multiple`` ack, a Kafka offset) never acknowledges a message
    whose invocations are not all in JetStream, and an acknowledgement leaves without waiting
    for a task to be scheduled. Work that the connector cancels itself (a revoked Kafka
    partition, through :meth:`cancel`) is skipped: its ``ack`` never runs; work cancelled any
    other way (the block being torn down) stops every later ``ack``. Work that fails (or an
    ``ack`` that raises) fails the block: the work in flight is cancelled, no later ``ack``
    runs, and the failure leaves the block as itself (not an ExceptionGroup). Leaving the
    block without an error waits for the work in flight and its acks.

    While a binding of the source is ``ordered``, work is not concurrent within a ``lane``
    (the whole source unless the connector names lanes, e.g. Kafka partitions): a ``start``
    waits until the work of the lanes it names is acknowledged, so that ordered invocations
    reach JetStream in the transport's order, as they did without pipelining."""

    def __init__(self, ctx: SourceContext, tasks: asyncio.TaskGroup, window: int) -> None:
        self._ctx = ctx
        self._tasks = tasks
        self._free = asyncio.Semaphore(window)
        # Bounded by ``window``: an entry is added after a place is taken, removed before freed.
        self._started: collections.deque[_Started] = collections.deque()
        self._acked = asyncio.Event()  # set after each ack, and on a failed ack
        self._failure: BaseException | None = None
        self._closing = False

    async def start(
        self, work: Coroutine[Any, Any, None], ack: Ack, lane: Hashable = None
    ) -> asyncio.Task[None]:
        try:
            await self._free.acquire()
            while self._ctx.ordered and self._busy(lane):
                self._acked.clear()
                await self._acked.wait()
        except BaseException:
            work.close()  # never started: nothing to acknowledge
            raise
        task = self._tasks.create_task(work)
        self._started.append(_Started(task, ack, lane))
        task.add_done_callback(self._settle)
        return task

    def cancel(self, task: asyncio.Task[None]) -> None:
        """Give up ``task``'s work: it is skipped, and the acks after it go on."""
        for started in self._started:
            if started.task is task:
                started.skipped = True
        task.cancel()

    def _busy(self, lane: Hashable) -> bool:
        return any(lane is None or s.lane is None or s.lane == lane for s in self._started)

    def _settle(self, _done: asyncio.Task[None]) -> None:
        """Acknowledge the finished work at the head of the line, in start order."""
        started = self._started
        while started and self._failure is None:
            head = started[0]
            if not head.task.done():
                return
            if head.task.cancelled() and not head.skipped:
                return  # torn down: nothing after it may be acknowledged
            if not head.task.cancelled():
                if head.task.exception() is not None:
                    return  # the task group cancels the rest and raises it
                try:
                    head.ack()
                except Exception as exc:  # raised by ``_watch``, in the task group
                    self._failure = exc
            started.popleft()
            self._free.release()
            self._acked.set()

    async def _watch(self) -> None:
        """Fails the block when an ack failed; ends once closing and everything is acked."""
        while True:
            if self._failure is not None:
                raise self._failure
            if self._closing and not self._started:
                return
            self._acked.clear()
            await self._acked.wait()


@dataclass(slots=True)
class _Started:
    task: asyncio.Task[None]
    ack: Ack
    lane: Hashable
    skipped: bool = False


class SourceContext:
    """A connector's door into the hub (see the module docstring)."""

    def __init__(self, resource: Resource, supervisor: SourceSupervisor) -> None:
        self.name = resource.name
        self.resource = resource
        self.spec: Any = resource.model
        self.room = asyncio.Event()
        self.room.set()
        self.supervisor = supervisor
        self.state = "starting"
        self.last_error: str | None = None
        self.last_error_at: str | None = None
        self.last_event_at: float | None = None
        self.events_in = 0
        self.restarts = 0
        self.lag: int | None = None

    async def deliver(self, events: Sequence[Event]) -> None:
        while True:
            await self.room.wait()
            try:
                await self.supervisor.ingress.submit(self.name, events, record_queued=False)
            except QueueFull:
                self.room.clear()  # the room check sets it again once JetStream has space
                continue
            except MessageTooLarge as exc:  # nothing was published: drop that one, send the rest
                events = await self._reject_too_large(events, exc)
                if events:
                    continue
            self.events_in += len(events)
            self.last_event_at = time.time()
            self.supervisor.metrics.source_events.labels(self.name).inc(len(events))
            self.supervisor.metrics.source_last_event.labels(self.name).set(self.last_event_at)
            return

    async def _reject_too_large(self, events: Sequence[Event], exc: MessageTooLarge) -> list[Event]:
        """Store the event that cannot fit in one NATS message as a dead letter of the source
        (``too-large``); returns the others."""
        matching = [e for e in events if e.attributes.get("id") == exc.event_id]
        big = max(matching, key=lambda e: len(e.data), default=None)
        if big is None:
            raise exc
        extensions = {k: v for k, v in big.attributes.items() if k not in _CORE_ATTRIBUTES}
        await self.reject(big.id, f"too-large: {exc.detail}", big.data, extensions)
        return [e for e in events if e is not big]

    @property
    def ordered(self) -> bool:
        """Whether a binding of this source keeps the order of its events."""
        return any(route.ordered for route in self.supervisor.router.routes.bindings_of(self.name))

    @contextlib.asynccontextmanager
    async def deliveries(self, window: int) -> AsyncIterator[Deliveries]:
        """A :class:`Deliveries` block, its tasks owned by it."""
        try:
            async with asyncio.TaskGroup() as tasks:
                deliveries = Deliveries(self, tasks, window)
                tasks.create_task(deliveries._watch(), name=f"acks:{self.name}")
                try:
                    yield deliveries
                finally:
                    deliveries._closing = True
                    deliveries._acked.set()
        except ExceptionGroup as group:  # one failure is the story: the supervisor reports it
            raise_first(group)

    async def reject(
        self, message_id: str, reason: str, payload: bytes, metadata: Mapping[str, str]
    ) -> None:
        """Keep an unusable message as a dead letter of this source (durable on return)."""
        attributes = {
            "specversion": "1.0",
            "id": message_id,
            "source": f"/eventhub/sources/{self.name}",
            "type": "eventhub.source.rejected",
            **{k: v for k, v in metadata.items() if k.isalnum() and k.islower()},
        }
        invocation_id = f"source:{self.name}:{message_id}"
        now = datetime.now(UTC)
        await self.supervisor.sink.store(
            DeadLetterRecord(
                id=dead_letter_id(invocation_id),
                invocation_id=invocation_id,
                function=None,
                binding=None,
                event=Event(attributes, payload),
                reason="rejected",
                error_code=reason.split(":", 1)[0],
                error_message=reason,
                attempts=[],
                enqueued_at=now,
                failed_at=now,
                dead_letter_function=None,
                source_name=self.name,
            )
        )
        self.supervisor.metrics.source_errors.labels(self.name, "rejected").inc()
        log.warning("source_message_rejected", source=self.name, reason=reason, id=message_id)

    def set_lag(self, lag: int) -> None:
        self.lag = lag
        self.supervisor.metrics.source_lag.labels(self.name).set(lag)

    async def load_state(self) -> dict[str, Any] | None:
        return await self.supervisor.store.load_state(self.name)

    async def save_state(self, state: dict[str, Any]) -> None:
        await self.supervisor.store.save_state(self.name, state)

    def status(self) -> dict[str, Any]:
        return {
            "process": PROCESS_ID,
            "state": self.state,
            "throttled": not self.room.is_set(),
            "lastError": self.last_error,
            "lastErrorAt": self.last_error_at,
            "lastEventAt": _iso(self.last_event_at),
            "secondsSinceLastEvent": (
                round(time.time() - self.last_event_at, 3) if self.last_event_at else None
            ),
            "eventsIn": self.events_in,
            "restarts": self.restarts,
            "lag": self.lag,
        }


class SourceRunner:
    """Runs one connector, restarting it with capped backoff until stopped."""

    def __init__(self, ctx: SourceContext, connector: Connector) -> None:
        self.ctx = ctx
        self._connector = connector
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"source:{self.ctx.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            _, stuck = await asyncio.wait([self._task], timeout=_STOP_TIMEOUT)
            if stuck:
                log.error("source_ignored_cancellation", source=self.ctx.name)
        self.ctx.state = "stopped"

    async def _supervise(self) -> None:
        ctx, failures = self.ctx, 0
        while True:
            ctx.state = "running"
            started = time.monotonic()
            try:
                await self._connector.run(ctx)
                raise ConnectionError("the connector stopped")
            except Exception as exc:  # any failure: restart, the transport redelivers
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # a client turned it into an error
                    raise asyncio.CancelledError from exc
                if time.monotonic() - started > _BACKOFF_MAX:
                    failures = 0  # it ran a good while: start the backoff over
                failures += 1
                ctx.restarts += 1
                ctx.state = "backoff"
                ctx.last_error = f"{type(exc).__name__}: {exc}"[:500]
                ctx.last_error_at = now_rfc3339()
                ctx.supervisor.metrics.source_errors.labels(ctx.name, "connection").inc()
                delay = min(_BACKOFF_MAX, 0.5 * 2 ** min(failures - 1, 6))
                log.warning("source_failed", source=ctx.name, error=ctx.last_error, retry_in=delay)
                await asyncio.sleep(delay)


class SourceSupervisor:
    def __init__(
        self,
        *,
        router: Router,
        ingress: Ingress,
        queue: InvocationQueue,
        store: ResourceStore,
        sink: DeadLetterSink,
        redis: aioredis.Redis,
        namespace: str,
        connectors: Mapping[str, ConnectorFactory],
        metrics: Metrics,
    ) -> None:
        self.router = router
        self.ingress = ingress
        self.queue = queue
        self.store = store
        self.sink = sink
        self.metrics = metrics
        self._redis = redis
        self._prefix = f"{namespace}:src:"
        self._factories = connectors
        self._runners: dict[str, tuple[Resource, SourceRunner]] = {}
        self._lock = asyncio.Lock()
        self._stopped = False
        self._status_due = False

    def runner(self, name: str) -> SourceRunner | None:
        """The runner of a Source in this process, if it runs here."""
        entry = self._runners.get(name)
        return entry[1] if entry else None

    async def start(self) -> None:
        self.router.on_change(self._sync)
        await self._sync(self.router.routes)

    async def stop(self) -> None:
        async with self._lock:
            self._stopped = True
            runners = [runner for _, runner in self._runners.values()]
            self._runners = {}
        for runner in runners:
            await runner.stop()
        await self.publish_status(runners)

    async def _sync(self, routes: Routes) -> None:
        async with self._lock:
            if self._stopped:
                return
            # A source with no binding is not started: its transport keeps the messages until
            # one exists, instead of their being taken and routed nowhere.
            wanted = {
                n: r for n, r in routes.sources.items() if not r.paused and routes.bindings_of(n)
            }
            for name, (resource, runner) in list(self._runners.items()):
                if wanted.get(name) != resource:
                    del self._runners[name]
                    await runner.stop()
                    log.info("source_stopped", source=name)
            for name, resource in wanted.items():
                if name not in self._runners:
                    self._start(resource)

    def _start(self, resource: Resource) -> None:
        factory = self._factories.get(resource.model.type)
        if factory is None:
            log.error("source_type_unavailable", source=resource.name, type=resource.model.type)
            return
        runner = SourceRunner(SourceContext(resource, self), factory(resource))
        self._runners[resource.name] = (resource, runner)
        self._status_due = True  # show a new source's status without waiting for the period
        runner.start()
        log.info("source_started", source=resource.name, type=resource.model.type)

    async def watch(self) -> None:
        """Until cancelled: open or close each source's room, publish statuses."""
        last_status = 0.0
        while True:
            runners = [runner for _, runner in self._runners.values()]
            with contextlib.suppress(Exception):
                await self._update_room(runners)
            if self._status_due or time.monotonic() - last_status >= _STATUS_EVERY:
                self._status_due = False
                with contextlib.suppress(aioredis.RedisError):
                    await self.publish_status(runners)
                last_status = time.monotonic()
            await asyncio.sleep(_ROOM_EVERY)

    async def _update_room(self, runners: list[SourceRunner]) -> None:
        routes = self.router.routes
        depths = await self.queue.depths() if runners else {}  # one request for every function
        for runner in runners:
            ctx = runner.ctx
            limit = ctx.spec.high_water_mark
            full = any(
                depths.get(route.function, 0) >= limit for route in routes.bindings_of(ctx.name)
            )
            if full and ctx.room.is_set():
                log.info("source_throttled", source=ctx.name, high_water_mark=limit)
                ctx.room.clear()
            elif not full and not ctx.room.is_set():
                log.info("source_resumed", source=ctx.name)
                ctx.room.set()
            self.metrics.source_throttled.labels(ctx.name).set(0 if ctx.room.is_set() else 1)

    async def publish_status(self, runners: list[SourceRunner]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for runner in runners:
                key = f"{self._prefix}{runner.ctx.name}:{PROCESS_ID}"
                pipe.set(key, orjson.dumps(runner.ctx.status()), ex=_STATUS_TTL)
            await pipe.execute()


async def read_status(redis: aioredis.Redis, namespace: str, source: str) -> list[dict[str, Any]]:
    """The status each ingest process published for ``source`` in the last few seconds."""
    keys = [k async for k in redis.scan_iter(match=f"{namespace}:src:{source}:*", count=100)]
    if not keys:
        return []
    values = await redis.mget(keys)
    return sorted(
        (orjson.loads(v) for v in values if v is not None), key=lambda s: str(s["process"])
    )


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")
