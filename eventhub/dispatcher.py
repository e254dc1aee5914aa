"""The dispatcher: takes invocations from JetStream and calls the functions.

One :class:`FunctionWorker` per function pulls from the function's shared durable consumer and
runs at most ``maxConcurrency`` invocations at once (JetStream's ``max_ack_pending`` holds the same
limit across processes). Under a ``rateLimit`` one message is pulled at a time and waits for
its slot (kept with ``in_progress``) before the call. A paused function has no worker: its
invocations wait in JetStream.

Each message calls the version it was enqueued for (``Eh-Version``; see :mod:`eventhub.versions`)
with that version's URL, timeout and retry policy. This module decides whether and how to call;
:mod:`eventhub.outcomes` does what the outcome asks.

Acknowledgement contract:

==================  ====================================================================
function succeeded  ``ack``
retryable failure   the next attempt stored in the retry schedule (PubAck), then ``ack``:
                    the slot is free while it waits (see :mod:`eventhub.retries`). On an
                    ordered lane, or when the schedule cannot take it: ``nak(delay)``
redelivered         (not on an ordered lane) not called: stored in the retry schedule, due
                    now, under the id a retry of the delivery before would have had, then
                    ``ack``; so a crash can never leave two live messages of one invocation
final failure       dead letter committed to PostgreSQL (and the dead-letter function's
                    invocation to JetStream), then ``ack``
cancelled/shutdown  ``nak()`` without delay: handed back for another process now
dependency down     not called, no attempt spent: see below
hub killed          nothing: JetStream redelivers after ``ack_wait``
version removed     dead letter (reason ``version-removed``), then ``ack``
flow step           as above; on success the run is advanced and its next step published
                    (see :mod:`eventhub.flows.engine`), on a final failure the run fails,
                    both before the ``ack``. A branch past its timeout is not called: dead
                    letter (``branch-timeout``)
canary rolled back  called on the stable version, or a dead letter (``rolled-back``), as the
                    rollout says
at-most-once        ``ack`` (confirmed) before the call; a failed call is a dead letter
                    (``at-most-once``) stored without hand-back: nothing is redelivered
==================  ====================================================================

The attempt number is the attempts an earlier message of the invocation made (``Eh-Attempts``)
plus JetStream's delivery count of this one, so a delivery cut short by a crash counts.

An outage of Redis or PostgreSQL never spends an attempt (a ``nak`` would: the next delivery
counts one more). Under a ``rateLimit`` whose slot Redis cannot book, the message is kept
(``in_progress``) and the booking tried again with backoff; no call is made meanwhile. When
PostgreSQL cannot answer the dead-letter check, or cannot store what an attempt decided (the
dead letter, a replay's or a dead-letter delivery's result), the message is handed back through
the retry schedule, due in a few seconds, with ``Eh-Attempts`` the calls really made; if the
outcome was decided already, ``Eh-Settled`` carries it (``succeeded`` or the dead-letter reason)
so that the next delivery only writes it down, without a call. On an ordered lane the message
waits in place instead, keeping its key's order.

While a call runs longer than a third of ``ack_wait``, ``in_progress`` keeps the message ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg

from eventhub.callbacks import Callbacks
from eventhub.events import now_rfc3339
from eventhub.ingress import Ingress
from eventhub.invocations import H_ATTEMPTS, H_ENQUEUED, Invocation
from eventhub.invoker import Invoker
from eventhub.metrics import Metrics
from eventhub.outcomes import H_SETTLED, Delivery, HandedBack, Settler
from eventhub.ports import DeadLetterSink
from eventhub.queue import END, InvocationQueue, Puller, keep_pulling
from eventhub.ratelimit import RateLimiter
from eventhub.resources import FunctionSpec
from eventhub.retries import RetrySchedule
from eventhub.retry import (
    EXHAUSTED,
    EXPIRED,
    Ack,
    DeadLetter,
    Outcome,
    Retry,
    decide,
    expired,
)
from eventhub.routing import Router, Routes
from eventhub.settings import Settings
from eventhub.state import AttemptRecord, InvocationState
from eventhub.stats import Stats
from eventhub.versions import version_spec

if TYPE_CHECKING:
    from eventhub.flows.engine import FlowEngine

log = structlog.get_logger(__name__)
# An idle pull request costs a heartbeat message every _PULL_HEARTBEAT s and a new request
# every _PULL_EXPIRES s, per consumer: long ones keep a hub of 1,000 functions idle. A request
# lost in a reconnect is replaced within seconds all the same (see Puller.next).
_PULL_EXPIRES = 120.0
_RUNNING_AFTER = 0.05
_PULL_HEARTBEAT = 30.0
_CONSUMER_SETUPS = 32
VERSION_GONE = "version-removed"  # the version it was enqueued for is no longer declared
ROLLED_BACK = "rolled-back"  # its canary was rolled back, and the rollout keeps these aside
AT_MOST_ONCE = "at-most-once"  # the one call failed; at-most-once delivery allows no other
BRANCH_TIMEOUT = "branch-timeout"  # a flow's parallel branch, past its step's timeout


class Dispatcher:
    """Keeps one worker per function in step with the routing table."""

    def __init__(
        self,
        *,
        router: Router,
        queue: InvocationQueue,
        invoker: Invoker,
        state: InvocationState,
        limiter: RateLimiter,
        sink: DeadLetterSink,
        callbacks: Callbacks,
        settings: Settings,
        metrics: Metrics,
        stats: Stats,
        flows: FlowEngine | None = None,
    ) -> None:
        self._router = router
        ingress = Ingress(router, queue, state, metrics, flows)
        self._deps = Deps(
            router,
            queue,
            invoker,
            state,
            limiter,
            sink,
            callbacks,
            settings,
            metrics,
            stats,
            ingress,
            flows,
        )
        # (function, None) pulls the function's consumer; (function, lane) an ordered lane.
        self._workers: dict[tuple[str, int | None], FunctionWorker] = {}
        self._sync_lock = asyncio.Lock()
        self._stopped = False
        self._stopping: set[asyncio.Task[None]] = set()  # workers of removed functions
        self._schedule = RetrySchedule(queue)

    async def start(self) -> None:
        await self._schedule.start()
        self._router.on_change(self._sync)
        await self._sync(self._router.routes)

    async def _sync(self, routes: Routes) -> None:
        async with self._sync_lock:
            if self._stopped:
                return
            wanted = self._wanted(routes)
            await self._ensure_consumers(
                [
                    (key, spec)
                    for key, spec in wanted.items()
                    if key not in self._workers
                    or self._workers[key].spec.max_concurrency != spec.max_concurrency
                ]
            )
            for key, spec in wanted.items():
                worker = self._workers.get(key)
                if worker is None:
                    worker = FunctionWorker(key[0], spec, self._deps, lane=key[1])
                    self._workers[key] = worker
                    worker.start()
                else:
                    worker.spec = spec
            for key in [k for k in self._workers if k not in wanted]:
                # Stopped in the background: its grace period must not hold up the reload.
                task = asyncio.create_task(
                    self._workers.pop(key).stop(self._deps.settings.shutdown_timeout)
                )
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)

    async def _ensure_consumers(
        self, changed: list[tuple[tuple[str, int | None], FunctionSpec]]
    ) -> None:
        """Create or update consumers, _CONSUMER_SETUPS at a time (one after another, a hub of
        1,000 functions spent seconds at start on them)."""
        queue = self._deps.queue
        for i in range(0, len(changed), _CONSUMER_SETUPS):
            await asyncio.gather(
                *(
                    queue.ensure_consumer(function, spec.max_concurrency, lane)
                    for (function, lane), spec in changed[i : i + _CONSUMER_SETUPS]
                )
            )

    def _wanted(self, routes: Routes) -> dict[tuple[str, int | None], FunctionSpec]:
        """A worker per function, and per ordered lane of a function that has (or had: its
        lanes may still hold invocations) an ordered binding."""
        ordered = routes.ordered_functions | {f for f, lane in self._workers if lane is not None}
        wanted: dict[tuple[str, int | None], FunctionSpec] = {}
        for name, spec in routes.functions.items():
            if name in routes.paused_functions:
                continue  # its invocations wait in JetStream until it is resumed
            wanted[(name, None)] = spec
            if name in ordered:
                for lane in range(self._deps.settings.ordered_lanes):
                    wanted[(name, lane)] = spec
        return wanted

    def consumers_wanted(self) -> int:
        """The consumers this process pulls: one per worker, and the retry schedule's."""
        return len(self._workers) + 1

    async def restore_consumers(self) -> None:
        """Create again every consumer this process pulls, and the stream first if it is gone
        (NATS came back without its data). The pull loops would, after their backoff."""
        async with self._sync_lock:
            await self._deps.queue.ensure_retry_consumer()
            await self._ensure_consumers([(key, w.spec) for key, w in self._workers.items()])

    async def stop(self, grace: float) -> None:
        """Stop fetching, let in-flight calls finish within ``grace`` s, hand back the rest."""
        async with self._sync_lock:
            self._stopped = True
            workers, self._workers = list(self._workers.values()), {}
        if workers:
            await asyncio.gather(*(w.stop(grace) for w in workers))
        if self._stopping:
            await asyncio.wait(set(self._stopping), timeout=grace)
        await self._schedule.stop()

    async def release_resumed(self) -> None:
        """Send on what resumed bindings held while they were paused."""
        routes = self._router.routes
        resumed = {
            route.binding
            for routes_of_source in routes.by_source.values()
            for route in routes_of_source
            if not route.paused
        }
        for binding, count in (await self._deps.queue.held_bindings()).items():
            if binding in resumed and count:
                moved = await self._deps.queue.release_held(binding)
                log.info("binding_released", binding=binding, invocations=moved)

    async def refresh_depths(self) -> None:
        """Two stream_info requests for every function together (two per function cost a
        1,000-function hub about 10 % of a core while idle)."""
        metrics = self._deps.metrics
        depths = await self._deps.queue.depths()
        waiting = await self._deps.queue.retries_waiting()
        for name in self._router.routes.functions:
            metrics.queue_depth.labels(name).set(depths.get(name, 0))
            metrics.retries_waiting.labels(name).set(waiting.get(name, 0))


@dataclass
class Deps:
    """What every worker of a dispatcher shares."""

    router: Router
    queue: InvocationQueue
    invoker: Invoker
    state: InvocationState
    limiter: RateLimiter
    sink: DeadLetterSink
    callbacks: Callbacks
    settings: Settings
    metrics: Metrics
    stats: Stats
    ingress: Ingress  # where results published to destinations go in
    flows: FlowEngine | None = None  # advances flow runs as their steps settle

    def choose_version(self, invocation: Invocation) -> Invocation:
        """See :meth:`Routes.aim`."""
        return self.router.routes.aim(invocation)


@dataclass(slots=True)
class _Call:
    """A call being made: its message, when it started, and whether it is marked running."""

    msg: Msg
    started: float
    invocation_id: str
    attempt: int
    version: str
    marked: bool = False


class FunctionWorker:
    """Pulls one consumer: the function's (up to ``maxConcurrency`` calls at once) or one of
    its ordered lanes (one call at a time, so one key's events stay in order)."""

    def __init__(self, name: str, spec: FunctionSpec, deps: Deps, lane: int | None = None) -> None:
        self.name = name
        self.lane = lane
        self._deps = deps
        self._settle = Settler(name, deps, lane)
        self.spec = spec
        self._in_flight: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        self._fetcher: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._stopping = False
        # Calls being made, by the identity of their message (Msg is unhashable).
        self._calls: dict[int, _Call] = {}
        self._marking: asyncio.TimerHandle | None = None  # the next _mark_running, if due
        self._rand = random.Random()  # noqa: S311 - jitter, not security
        self._duration = functools.lru_cache(maxsize=64)(
            lambda version: deps.metrics.duration.labels(name, version)
        )

    @property
    def spec(self) -> FunctionSpec:
        return self._spec

    @spec.setter
    def spec(self, spec: FunctionSpec) -> None:
        self._spec = spec
        self._settle.function = spec

    @property
    def limit(self) -> int:
        return self.spec.max_concurrency if self.lane is None else 1

    def start(self) -> None:
        self._fetcher = asyncio.create_task(self._fetch_loop(), name=f"fetch:{self.name}")
        self._ticker = asyncio.create_task(self._keep_alive(), name=f"in-progress:{self.name}")

    async def stop(self, grace: float) -> None:
        self._stopping = True  # a cancel swallowed by a client library still ends the loop
        if self._fetcher is not None:
            for _ in range(3):
                self._fetcher.cancel()
                done, _ = await asyncio.wait([self._fetcher], timeout=5.0)
                if done:
                    break
        if self._in_flight:
            _, pending = await asyncio.wait(set(self._in_flight), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
                log.warning("dispatch_handed_back", function=self.name, count=len(pending))
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.wait([self._ticker])
        if self._marking is not None:
            self._marking.cancel()

    async def _fetch_loop(self) -> None:
        queue = self._deps.queue
        await keep_pulling(
            lambda: queue.puller(self.name, self.lane),
            self._pull_once,
            lambda: queue.ensure_consumer(self.name, self.spec.max_concurrency, self.lane),
            lambda: not self._stopping,
            function=self.name,
        )

    async def _pull_once(self, puller: Puller) -> int:
        """One pull request for as many messages as there is room for (one under a rate
        limit); each message is dispatched as it arrives. Returns how many came."""
        room = 1 if self.spec.rate_limit is not None else await self._wait_for_room()
        if self.spec.rate_limit is not None:
            await self._wait_for_room()
        await puller.request(room, expires=_PULL_EXPIRES, heartbeat=_PULL_HEARTBEAT)
        taken = 0
        while taken < room:
            msg = await puller.next(wait=_PULL_HEARTBEAT * 3)
            if msg is END or msg is None:
                break
            taken += 1
            if self.spec.rate_limit is not None:
                try:
                    await self._wait_for_slot(msg)
                except asyncio.CancelledError:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(msg.nak())
                    raise
            self._spawn(msg)
        return taken

    async def _wait_for_slot(self, msg: Msg) -> None:
        """Book the rate limit's next slot once a message is here (a slot booked before would
        be spent late, letting a burst through after an idle spell), keeping the message ours
        while waiting. While Redis cannot book it, no call is made: the message is kept and
        the booking tried again, so the outage spends no attempt."""
        rate = self.spec.rate_limit
        assert rate is not None  # noqa: S101 - checked by the caller
        limiter = self._deps.limiter
        settle = self._settle
        wait = await settle.until_up(msg, lambda: limiter.reserve(self.name, rate), "rate-limit")
        await settle.keep(msg, wait)

    async def _wait_for_room(self) -> int:
        while len(self._in_flight) >= self.limit:
            self._room.clear()
            await self._room.wait()
        return self.limit - len(self._in_flight)

    def _spawn(self, msg: Msg) -> None:
        if self._stopping:
            self._give_back(msg)
            return
        task = asyncio.create_task(self._handle(msg))
        self._in_flight.add(task)
        task.add_done_callback(self._done)

    def _give_back(self, msg: Msg) -> None:
        """A message taken while stopping: handed back at once, by a short owned task."""
        task = asyncio.create_task(msg.nak())
        self._in_flight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._room.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("dispatch_crashed", function=self.name, error=repr(task.exception()))

    async def _handle(self, msg: Msg) -> None:
        try:
            invocation = Invocation.from_message(msg.headers or {}, msg.data)
        except KeyError:
            log.error("invocation_unreadable", function=self.name, headers=msg.headers)
            await msg.term()
            return
        meta = msg.metadata
        headers = msg.headers or {}
        attempt = int(headers.get(H_ATTEMPTS) or 0) + meta.num_delivered
        enqueued = meta.timestamp
        if H_ENQUEUED in headers:  # a retry: its age counts from the first enqueue
            enqueued = datetime.fromtimestamp(int(headers[H_ENQUEUED]) / 1000, UTC)
        age = (datetime.now(UTC) - enqueued).total_seconds()
        invocation = self._redirected(invocation)
        delivery = Delivery(msg, invocation, version_spec(self.spec, invocation.version), enqueued)
        # Each message is handled in a task of its own, whose context is a copy: what is bound
        # here needs no unbinding.
        structlog.contextvars.bind_contextvars(
            invocation_id=invocation.id,
            function=self.name,
            version=invocation.version,
            binding=invocation.binding,
            event_id=invocation.event.id,
            source=invocation.event.source,
            attempt=attempt,
        )
        try:
            await self._attempt(delivery, attempt, age)
        except HandedBack:
            return  # back in the retry schedule, said where it happened
        except asyncio.CancelledError:
            if not delivery.acked:
                # Not done: hand the message back at once instead of waiting for ack_wait.
                with contextlib.suppress(Exception):
                    await asyncio.shield(msg.nak())
            raise

    def _redirected(self, invocation: Invocation) -> Invocation:
        """An invocation queued through an alias for a canary since rolled back, whose rollout
        sends such invocations to the stable version: the stable version's, from now on."""
        if invocation.alias is None:
            return invocation
        withdrawn = self._deps.router.routes.overrides.withdrawn
        found = withdrawn.get((self.name, invocation.alias, invocation.version))
        if found is None or found.action != "stable":
            return invocation
        return dataclasses.replace(invocation, version=found.stable)

    def _rolled_back(self, invocation: Invocation) -> bool:
        """Queued through an alias for a canary whose rollout keeps them as dead letters."""
        if invocation.alias is None:
            return False
        withdrawn = self._deps.router.routes.overrides.withdrawn
        found = withdrawn.get((self.name, invocation.alias, invocation.version))
        return found is not None and found.action == "dead-letter"

    async def _attempt(self, d: Delivery, attempt: int, age: float) -> None:
        settle, msg = self._settle, d.msg
        at_most_once = self.spec.delivery == "at-most-once"
        if attempt > 1 and await settle.already_dead(d, attempt):
            return
        if self.lane is None and msg.metadata.num_delivered > 1 and not at_most_once:
            await settle.reschedule(msg, attempt)
            return
        settled = (msg.headers or {}).get(H_SETTLED)
        if settled:
            await settle.write_down(d, settled, attempt - 1)
            return
        if d.call is None or self._rolled_back(d.invocation):
            reason = VERSION_GONE if d.call is None else ROLLED_BACK
            await settle.give_up(d, reason, None, attempt - 1)
            return
        call = d.call
        deadline = d.invocation.flow.deadline_ms if d.invocation.flow is not None else None
        if deadline is not None and time.time() * 1000 > deadline:
            await settle.give_up(d, BRANCH_TIMEOUT, None, attempt - 1)
            return
        if expired(age, call.max_event_age) or attempt > call.retry.max_attempts:
            reason = EXPIRED if expired(age, call.max_event_age) else EXHAUSTED
            await settle.give_up(d, reason, None, attempt - 1)
            return
        if at_most_once:
            # Acknowledged (and the ack confirmed) before the call: never called twice.
            await msg.ack_sync()
            d.acked = True
        started_at = now_rfc3339()
        outcome = await self._call(d, attempt)
        record = AttemptRecord.of(attempt, started_at, outcome, d.version)
        self._duration(d.version).observe(outcome.latency)
        decision = decide(
            outcome,
            attempt=attempt,
            age=age + outcome.latency,
            policy=call.retry,
            max_event_age=call.max_event_age,
            rand=self._rand.random,
        )
        self._deps.stats.call(self.name, d.version, isinstance(decision, Ack), outcome.latency)
        if isinstance(decision, Ack):
            await settle.succeed(d, record, outcome, attempt)
        elif at_most_once:
            await settle.give_up(d, AT_MOST_ONCE, record, attempt)
        elif isinstance(decision, Retry):
            await settle.retry(d, record, decision.delay)
            log.info("invocation_retrying", code=outcome.code, delay=round(decision.delay, 3))
        elif isinstance(decision, DeadLetter):
            await settle.give_up(d, decision.reason, record, attempt)

    async def _call(self, d: Delivery, attempt: int) -> Outcome:
        msg, invocation, call = d.msg, d.invocation, d.call
        assert call is not None  # noqa: S101 - checked by the caller
        started = time.monotonic()
        self._calls[id(msg)] = _Call(msg, started, invocation.id, attempt, d.version)
        if self._marking is None:
            self._marking = asyncio.get_running_loop().call_at(
                started + _RUNNING_AFTER, self._mark_running
            )
        try:
            keep = self.spec.on_success is not None or invocation.flow is not None
            return await self._deps.invoker.invoke(invocation, call, attempt, keep)
        finally:
            del self._calls[id(msg)]

    def _mark_running(self) -> None:
        """A call still running after a moment is marked so; a quick one goes straight from
        queued to its outcome, which saves a state write per invocation. One timer per worker
        at a time (not one per call): it marks every call due, then waits for the next."""
        self._marking = None
        cutoff = time.monotonic() - _RUNNING_AFTER
        next_start: float | None = None
        for call in self._calls.values():
            if call.marked:
                continue
            if call.started <= cutoff:
                call.marked = True
                self._deps.state.running(call.invocation_id, self.name, call.attempt, call.version)
            elif next_start is None or call.started < next_start:
                next_start = call.started
        if next_start is not None:
            self._marking = asyncio.get_running_loop().call_at(
                next_start + _RUNNING_AFTER, self._mark_running
            )

    async def _keep_alive(self) -> None:
        """One ticker per worker: a call running longer than a third of ``ack_wait`` gets an
        ``in_progress`` every third of ``ack_wait``, so JetStream does not redeliver it."""
        interval = self._deps.settings.ack_wait / 3
        while True:
            await asyncio.sleep(interval)
            cutoff = time.monotonic() - interval
            for msg in [c.msg for c in self._calls.values() if c.started <= cutoff]:
                with contextlib.suppress(nats.errors.Error):
                    await msg.in_progress()
