"""The dispatcher: takes invocations from JetStream and calls the functions.

One :class:`FunctionWorker` per function pulls from the function's shared durable consumer and
runs at most ``maxConcurrency`` invocations at once (JetStream's ``max_ack_pending`` holds the same
limit across processes). Under a ``rateLimit`` one message is pulled at a time and waits for
its slot (kept with ``in_progress``) before the call.

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
import functools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg

from eventhub.callbacks import Callbacks
from eventhub.errors import DependencyDown, MessageTooLarge, QueueFull
from eventhub.events import now_rfc3339
from eventhub.invocations import H_ATTEMPTS, H_ENQUEUED, Invocation, to_dead_letter_function
from eventhub.invoker import Invoker
from eventhub.metrics import Metrics
from eventhub.ports import DeadLetterRecord, DeadLetterSink, dead_letter_id
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

log = structlog.get_logger(__name__)
_T = TypeVar("_T")
# An idle pull request costs a heartbeat message every _PULL_HEARTBEAT s and a new request
# every _PULL_EXPIRES s, per consumer: long ones keep a hub of 1,000 functions idle. A request
# lost in a reconnect is replaced within seconds all the same (see Puller.next).
_PULL_EXPIRES = 120.0
_RUNNING_AFTER = 0.05
_PULL_HEARTBEAT = 30.0
_CONSUMER_SETUPS = 32
_RESCHEDULE_LATER = 5.0  # seconds before a redelivery tries the retry schedule again
_OUTAGE_DELAY = 5.0  # seconds before an invocation handed back for an outage is tried again
_OUTAGE_BACKOFF = (0.5, 5.0)  # waiting in place for a dependency: first and longest pause
_DEPENDENCY_TIMEOUT = 10.0  # a Redis or PostgreSQL step taking longer counts as an outage
H_SETTLED = "Eh-Settled"  # an outcome decided, waiting to be written down: see above
SUCCEEDED = "succeeded"


class _HandedBack(Exception):
    """The message went back through the retry schedule (or ``nak``): nothing more to do."""


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
    ) -> None:
        self._router = router
        self._deps = _Deps(queue, invoker, state, limiter, sink, callbacks, settings, metrics)
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
        for name in {function for function, _ in self._workers}:
            metrics.queue_depth.labels(name).set(depths.get(name, 0))
            metrics.retries_waiting.labels(name).set(waiting.get(name, 0))


@dataclass
class _Deps:
    """What every worker of a dispatcher shares."""

    queue: InvocationQueue
    invoker: Invoker
    state: InvocationState
    limiter: RateLimiter
    sink: DeadLetterSink
    callbacks: Callbacks
    settings: Settings
    metrics: Metrics


@dataclass(slots=True)
class _Call:
    """A call being made: its message, when it started, and whether it is marked running."""

    msg: Msg
    started: float
    invocation_id: str
    attempt: int
    marked: bool = False


class FunctionWorker:
    """Pulls one consumer: the function's (up to ``maxConcurrency`` calls at once) or one of
    its ordered lanes (one call at a time, so one key's events stay in order)."""

    def __init__(self, name: str, spec: FunctionSpec, deps: _Deps, lane: int | None = None) -> None:
        self.name = name
        self.spec = spec
        self.lane = lane
        self._deps = deps
        self._in_flight: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        self._fetcher: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._stopping = False
        # Calls being made, by the identity of their message (Msg is unhashable).
        self._calls: dict[int, _Call] = {}
        self._marking: asyncio.TimerHandle | None = None  # the next _mark_running, if due
        self._rand = random.Random()  # noqa: S311 - jitter, not security
        m = deps.metrics
        self._succeeded = m.invocations.labels(name, "succeeded")
        self._retried = m.invocations.labels(name, "retried")
        self._retries = m.retries.labels(name)
        self._duration = m.duration.labels(name)

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
        wait = await self._until_up(msg, lambda: limiter.reserve(self.name, rate), "rate-limit")
        await self._keep(msg, wait)

    async def _keep(self, msg: Msg, seconds: float) -> None:
        """Wait ``seconds``, telling JetStream every third of ``ack_wait`` that ``msg`` is
        still being worked on."""
        step = self._deps.settings.ack_wait / 3
        while seconds > 0:
            await asyncio.sleep(min(seconds, step))
            seconds -= step
            if seconds > 0:
                await msg.in_progress()

    async def _until_up(self, msg: Msg, step: Callable[[], Awaitable[_T]], what: str) -> _T:
        """Run a Redis or PostgreSQL step; while it fails, keep ``msg`` and try again with
        backoff. Nothing is handed back, so nothing counts as an attempt."""
        pause = _OUTAGE_BACKOFF[0]
        while True:
            try:
                async with asyncio.timeout(_DEPENDENCY_TIMEOUT):
                    return await step()
            except Exception as exc:  # Redis or PostgreSQL away: wait for it
                log.warning(
                    "dependency_unavailable", step=what, function=self.name, error=_said(exc)
                )
            await self._keep(msg, pause)
            pause = min(pause * 2, _OUTAGE_BACKOFF[1])

    async def _durable(
        self,
        msg: Msg,
        step: Callable[[], Awaitable[_T]],
        what: str,
        *,
        attempts: int,
        settled: str | None = None,
    ) -> _T:
        """Run a PostgreSQL step of a delivery. Should it fail, the message is handed back
        through the retry schedule with ``attempts`` (the calls really made) and ``settled``
        (the outcome decided already, if any), and :class:`_HandedBack` is raised. On an
        ordered lane the message waits in place instead, keeping its key's order."""
        if self.lane is not None:
            return await self._until_up(msg, step, what)
        try:
            async with asyncio.timeout(_DEPENDENCY_TIMEOUT):
                return await step()
        except Exception as exc:  # PostgreSQL away, or refusing: try again later
            log.warning("dependency_unavailable", step=what, error=_said(exc), handed_back=True)
            await self._hand_back(msg, attempts, settled)
            raise _HandedBack from exc

    async def _hand_back(self, msg: Msg, attempts: int, settled: str | None) -> None:
        """Store the invocation's next message in the retry schedule, due in a few seconds,
        with the attempts really made: an outage spends none. Should the schedule be
        unavailable too, ``nak`` with a delay (that delivery then counts as an attempt)."""
        delay = _OUTAGE_DELAY * (0.5 + self._rand.random())  # spread the returns
        due_ms = int((time.time() + delay) * 1000)
        extra = {H_SETTLED: settled} if settled else None
        if not await self._schedule(msg, due_ms, attempts, extra):
            await msg.nak(delay=delay)

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
        # Each message is handled in a task of its own, whose context is a copy: what is bound
        # here needs no unbinding.
        structlog.contextvars.bind_contextvars(
            invocation_id=invocation.id,
            function=self.name,
            binding=invocation.binding,
            event_id=invocation.event.id,
            source=invocation.event.source,
            attempt=attempt,
        )
        try:
            await self._attempt(msg, invocation, attempt, age, enqueued)
        except _HandedBack:
            return  # back in the retry schedule, said where it happened
        except asyncio.CancelledError:
            # Not done: hand the message back at once instead of waiting for ack_wait.
            with contextlib.suppress(Exception):
                await asyncio.shield(msg.nak())
            raise

    async def _attempt(
        self, msg: Msg, invocation: Invocation, attempt: int, age: float, enqueued: datetime
    ) -> None:
        spec = self.spec
        if attempt > 1 and await self._already_dead(msg, invocation, spec, attempt):
            return
        if self.lane is None and msg.metadata.num_delivered > 1:
            await self._reschedule(msg, attempt)
            return
        settled = (msg.headers or {}).get(H_SETTLED)
        if settled:
            await self._write_down(msg, invocation, spec, settled, attempt - 1, enqueued)
            return
        if expired(age, spec.max_event_age) or attempt > spec.retry.max_attempts:
            reason = EXPIRED if expired(age, spec.max_event_age) else EXHAUSTED
            await self._give_up(msg, invocation, spec, reason, None, enqueued, attempt - 1)
            return
        started_at = now_rfc3339()
        outcome = await self._call(msg, invocation, spec, attempt)
        record = AttemptRecord.of(attempt, started_at, outcome)
        self._duration.observe(outcome.latency)
        decision = decide(
            outcome,
            attempt=attempt,
            age=age + outcome.latency,
            policy=spec.retry,
            max_event_age=spec.max_event_age,
            rand=self._rand.random,
        )
        if isinstance(decision, Ack):
            await self._succeed(msg, invocation, record, outcome, attempt)
        elif isinstance(decision, Retry):
            await self._deps.state.finished(invocation.id, self.name, "retrying", record)
            await self._retry(msg, attempt, decision.delay)
            self._retries.inc()
            self._retried.inc()
            log.info("invocation_retrying", code=outcome.code, delay=round(decision.delay, 3))
        elif isinstance(decision, DeadLetter):
            await self._give_up(msg, invocation, spec, decision.reason, record, enqueued, attempt)

    async def _write_down(
        self,
        msg: Msg,
        invocation: Invocation,
        spec: FunctionSpec,
        settled: str,
        attempts: int,
        enqueued: datetime,
    ) -> None:
        """An outcome decided before PostgreSQL went away: written down now, without a call.
        Its last attempt was recorded in the invocation state when it was handed back."""
        history = await self._deps.state.attempts(invocation.id)
        last = AttemptRecord.from_json(history[-1]) if history else None
        if settled == SUCCEEDED:
            outcome = Outcome(status=last.status, error=last.error) if last else Outcome(200)
            await self._succeed(msg, invocation, last, outcome, attempts, recorded=True)
        else:
            await self._give_up(msg, invocation, spec, settled, last, enqueued, attempts, True)

    async def _succeed(
        self,
        msg: Msg,
        invocation: Invocation,
        record: AttemptRecord | None,
        outcome: Outcome,
        attempts: int,
        recorded: bool = False,
    ) -> None:
        deps = self._deps
        if invocation.dead_letter_id or invocation.replay_of:
            if record is not None and not recorded:  # kept, should PostgreSQL be away
                await deps.state.attempted(invocation.id, self.name, record)
                recorded = True
            await self._durable(
                msg,
                lambda: self._record_success(invocation, record),
                "success",
                attempts=attempts,
                settled=SUCCEEDED,
            )
        await msg.ack()
        self._succeeded.inc()
        if recorded:
            await deps.state.settled(invocation.id, self.name, "succeeded")
        elif record is not None:
            await deps.state.finished(invocation.id, self.name, "succeeded", record)
        deps.callbacks.send(invocation, "succeeded", outcome)

    async def _record_success(self, invocation: Invocation, record: AttemptRecord | None) -> None:
        deps = self._deps
        if invocation.dead_letter_id:
            await deps.sink.dead_letter_function_done(invocation.dead_letter_id, True, None)
        if invocation.replay_of:
            history = [record.to_json()] if record else []
            await deps.sink.replay_finished(invocation.replay_of, True, history, None)
            deps.metrics.replays.labels("succeeded").inc()

    async def _retry(self, msg: Msg, attempt: int, delay: float) -> None:
        """Wait for the next attempt in the retry schedule, which holds no slot; on an ordered
        lane, wait on the lane (a retry holds back its key's later events)."""
        due_ms = int((time.time() + delay) * 1000)
        if self.lane is None and await self._schedule(msg, due_ms, attempt):
            return
        await msg.nak(delay=delay)

    async def _reschedule(self, msg: Msg, attempt: int) -> None:
        """A message delivered again (its holder crashed or handed it back) is not called:
        the delivery before may have stored the invocation's next message in the schedule
        already, between that PubAck and its ack. Scheduling it again, due now, under the same
        id (see :mod:`eventhub.retries`) settles it: JetStream keeps one of the two, and the
        invocation goes on from there, the delivery cut short counted as an attempt. Should the
        schedule be unavailable, the message is handed back for later, still uncalled: a call
        here could run beside the stored next message and exceed the retry budget."""
        if await self._schedule(msg, int(time.time() * 1000), attempt - 1):
            log.info("invocation_redelivered", rescheduled=True)
        else:
            await msg.nak(delay=_RESCHEDULE_LATER)

    async def _schedule(
        self, msg: Msg, due_ms: int, attempts: int, extra: dict[str, str] | None = None
    ) -> bool:
        """Store the invocation's next message in the retry schedule (with ``extra`` headers),
        then ack ``msg``; False (``msg`` untouched) when the schedule cannot take it."""
        try:
            await self._deps.queue.schedule_retry(msg, self.name, due_ms, attempts, extra)
        except (QueueFull, DependencyDown) as exc:
            log.warning("retry_schedule_unavailable", error=str(exc))
            return False
        await msg.ack()
        return True

    async def _call(
        self, msg: Msg, invocation: Invocation, spec: FunctionSpec, attempt: int
    ) -> Outcome:
        started = time.monotonic()
        self._calls[id(msg)] = _Call(msg, started, invocation.id, attempt)
        if self._marking is None:
            self._marking = asyncio.get_running_loop().call_at(
                started + _RUNNING_AFTER, self._mark_running
            )
        try:
            return await self._deps.invoker.invoke(invocation, spec, attempt)
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
                self._deps.state.running(call.invocation_id, self.name, call.attempt)
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

    async def _to_dead_letter_function(
        self, msg: Msg, record: DeadLetterRecord, spec: FunctionSpec, invocation: Invocation
    ) -> None:
        try:
            await self._deps.queue.publish(
                to_dead_letter_function(
                    record,
                    spec.url,
                    dead_letter_id(record.id),
                    traceparent=invocation.traceparent,
                    tracestate=invocation.tracestate,
                )
            )
        except MessageTooLarge as exc:
            # It can never fit (a very long URL): recorded on the stored dead letter, no retry.
            log.warning("dead_letter_function_too_large", dead_letter_id=record.id)
            try:
                await self._deps.sink.dead_letter_function_done(
                    record.id, False, f"too-large: {exc}"
                )
            except Exception:
                await msg.nak(delay=5.0)  # PostgreSQL away: the redelivery records it
                raise
        except Exception:
            # The dead letter is stored; the message stays ours so the delivery is retried.
            await msg.nak(delay=5.0)
            raise

    async def _already_dead(
        self, msg: Msg, invocation: Invocation, spec: FunctionSpec, attempt: int
    ) -> bool:
        """A redelivery of an invocation whose dead letter is stored (the ack was lost, or the
        dead-letter function's publish failed): never invoke it again, only finish the job.
        While PostgreSQL cannot say, the message is handed back (see :meth:`_durable`)."""
        if invocation.dead_letter_id or invocation.replay_of:
            return False
        sink = self._deps.sink
        found = await self._durable(
            msg,
            lambda: sink.find(dead_letter_id(invocation.id)),
            "dead-letter check",
            attempts=attempt - 1,
            settled=(msg.headers or {}).get(H_SETTLED),
        )
        if found is None:
            return False
        record, dlf_status = found
        if dlf_status == "pending" and record.dead_letter_function:
            await self._to_dead_letter_function(msg, record, spec, invocation)
        await msg.ack()
        return True

    async def _give_up(
        self,
        msg: Msg,
        invocation: Invocation,
        spec: FunctionSpec,
        reason: str,
        last: AttemptRecord | None,
        enqueued: datetime,
        attempts: int,
        recorded: bool = False,
    ) -> None:
        """Store the dead letter, then ack. ``attempts``: the calls made so far; ``recorded``:
        ``last`` is in the invocation state already (an outcome written down late)."""
        deps = self._deps
        if last is not None and not recorded:  # kept, should PostgreSQL be away
            await deps.state.attempted(invocation.id, self.name, last)
        durably = functools.partial(self._durable, msg, attempts=attempts, settled=reason)
        if invocation.dead_letter_id:
            # A delivery to a dead-letter function failed: recorded on its dead letter, no more.
            error = f"{reason}: {last.error or last.status}" if last else reason
            dl = invocation.dead_letter_id
            await durably(lambda: deps.sink.dead_letter_function_done(dl, False, error), "failure")
            await msg.ack()
            deps.metrics.invocations.labels(self.name, "failed").inc()
            await deps.state.settled(invocation.id, self.name, "failed")
            return
        history = await deps.state.attempts(invocation.id)
        if last is not None and last.to_json() not in history:
            history.append(last.to_json())
        failure = (_error_code(last, reason), _error_message(last, reason))
        if invocation.replay_of:
            # A replay that failed: its attempts go to the dead letter it replayed, no new row.
            replayed = invocation.replay_of
            await durably(
                lambda: deps.sink.replay_finished(replayed, False, history, failure), "replay"
            )
            await msg.ack()
            deps.metrics.replays.labels("failed").inc()
            await deps.state.settled(invocation.id, self.name, "dead-lettered")
            return
        dl_id = dead_letter_id(invocation.id)
        record = DeadLetterRecord(
            id=dl_id,
            invocation_id=invocation.id,
            function=self.name,
            binding=invocation.binding,
            event=invocation.event,
            reason=reason,
            error_code=failure[0],
            error_message=failure[1],
            attempts=history,
            enqueued_at=enqueued,
            failed_at=datetime.now(UTC),
            dead_letter_function=spec.dead_letter.function if spec.dead_letter else None,
        )
        await durably(lambda: deps.sink.store(record), "dead letter")
        if record.dead_letter_function:
            await self._to_dead_letter_function(msg, record, spec, invocation)
        await msg.ack()
        deps.metrics.dead_letters.labels(self.name, reason).inc()
        deps.metrics.invocations.labels(self.name, "dead_lettered").inc()
        log.warning("invocation_dead_lettered", reason=reason, dead_letter_id=dl_id)
        await deps.state.settled(invocation.id, self.name, "dead-lettered", deadLetterId=dl_id)
        last_outcome = (
            Outcome(status=last.status, error=last.error) if last else Outcome(error=reason)
        )
        deps.callbacks.send(invocation, "dead-lettered", last_outcome)


def _said(exc: BaseException) -> str:
    return str(exc) or repr(exc)


def _error_code(last: AttemptRecord | None, reason: str) -> str:
    if last is None:
        return reason
    return f"http-{last.status}" if last.status is not None else (last.error or "error")


def _error_message(last: AttemptRecord | None, reason: str) -> str:
    if last is None:
        return f"{reason} before the attempt could be made"
    if last.status is not None:
        return f"{reason}: the function answered HTTP {last.status}"
    return f"{reason}: {last.message or last.error}"
