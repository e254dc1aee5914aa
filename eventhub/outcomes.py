"""What happens after an attempt: the acknowledgement contract of one delivery.

The dispatcher (:mod:`eventhub.dispatcher`) takes a message, decides whether to call, and calls;
:class:`Settler` then does what the outcome asks, always in the same order: what must be durable
(the retry's next message, the dead letter, a replay's result) is written first, the JetStream
message is acknowledged after, and the invocation state, metrics, statistics and callback
follow. The table of outcomes is in the dispatcher's docstring. A step of a flow run goes to
:mod:`eventhub.flows.engine` before the ack: its success advances the run (the next step is
published), its dead letter fails the run.

When PostgreSQL cannot store what a delivery decided, :meth:`Settler.durable` hands the message
back through the retry schedule with ``Eh-Settled`` naming the outcome, and raises
:class:`HandedBack`: the next delivery only writes the outcome down (:meth:`Settler.write_down`).
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

import structlog
from nats.aio.msg import Msg

from eventhub.errors import DependencyDown, MessageTooLarge, QueueFull
from eventhub.events import Event
from eventhub.ingress import Trace
from eventhub.invocations import Invocation, event_invocation_id, to_dead_letter_function
from eventhub.ports import DeadLetterRecord, dead_letter_id
from eventhub.resources import DestinationSpec, FunctionSpec, VersionSpec
from eventhub.results import HOP_LIMIT, failure_event, hops, result_event, source_of
from eventhub.retry import Outcome
from eventhub.state import AttemptRecord

if TYPE_CHECKING:
    from eventhub.dispatcher import Deps

log = structlog.get_logger(__name__)
_T = TypeVar("_T")
_RESCHEDULE_LATER = 5.0  # seconds before a redelivery tries the retry schedule again
_OUTAGE_DELAY = 5.0  # seconds before an invocation handed back for an outage is tried again
_OUTAGE_BACKOFF = (0.5, 5.0)  # waiting in place for a dependency: first and longest pause
_DEPENDENCY_TIMEOUT = 10.0  # a Redis or PostgreSQL step taking longer counts as an outage
H_SETTLED = "Eh-Settled"  # an outcome decided, waiting to be written down
SUCCEEDED = "succeeded"
RESULT_TOO_LARGE = "result-too-large"  # the result cannot be published as one event


class HandedBack(Exception):
    """The message went back through the retry schedule (or ``nak``): nothing more to do."""


@dataclass(slots=True)
class Delivery:
    """One message being handled: its invocation, the version it calls and how, and when the
    invocation was first enqueued (its age counts from then)."""

    msg: Msg
    invocation: Invocation
    call: VersionSpec | None  # None: the version is gone from the function
    enqueued: datetime
    acked: bool = False  # at-most-once: acknowledged before the call

    @property
    def version(self) -> str:
        return self.invocation.version


class Settler:
    """Settles the deliveries of one worker: one function's consumer, or one ordered lane."""

    def __init__(self, name: str, deps: Deps, lane: int | None) -> None:
        self.name = name
        self.lane = lane
        self.function: FunctionSpec | None = None  # kept current by the worker
        self._deps = deps
        self._rand = random.Random()  # noqa: S311 - jitter, not security
        m = deps.metrics
        self._succeeded = functools.lru_cache(maxsize=64)(
            lambda version: m.invocations.labels(name, version, "succeeded")
        )
        self._retried = functools.lru_cache(maxsize=64)(
            lambda version: m.invocations.labels(name, version, "retried")
        )
        self._retries = functools.lru_cache(maxsize=64)(
            lambda version: m.retries.labels(name, version)
        )

    # -- outcomes ---------------------------------------------------------------------------

    async def succeed(
        self,
        d: Delivery,
        record: AttemptRecord | None,
        outcome: Outcome,
        attempts: int,
        recorded: bool = False,
    ) -> None:
        deps, invocation = self._deps, d.invocation
        destination = self.function.on_success if self.function else None
        if (
            destination is not None
            and not invocation.dead_letter_id
            and outcome.headers is not None
        ):
            # Published before anything else, so that a hand-back below never needs it again.
            if outcome.body is None:
                await self.give_up(d, RESULT_TOO_LARGE, record, attempts)
                return
            event = result_event(self.name, d.version, invocation, outcome.headers, outcome.body)
            if not await self._send(d, destination, event, "on-success"):
                await self.give_up(d, RESULT_TOO_LARGE, record, attempts)
                return
        if invocation.flow is not None and deps.flows is not None:
            if outcome.body is None and outcome.headers is not None:
                await self.give_up(d, RESULT_TOO_LARGE, record, attempts)
                return
            flows = deps.flows
            # Should PostgreSQL or JetStream be away, the result is not kept: the message is
            # handed back, and the step called again (this call not counted as an attempt).
            await self.durable(
                d,
                lambda: flows.succeeded(
                    invocation,
                    outcome,
                    attempts=attempts,
                    version=d.version,
                    started_at=record.started_at if record is not None else None,
                ),
                "flow",
                attempts=attempts - 1,
            )
        if invocation.dead_letter_id or invocation.replay_of:
            if record is not None and not recorded:  # kept, should PostgreSQL be away
                await deps.state.attempted(invocation.id, self.name, record)
                recorded = True
            await self.durable(
                d,
                lambda: self._record_success(invocation, record),
                "success",
                attempts=attempts,
                settled=SUCCEEDED,
            )
        await self._ack(d)
        self._succeeded(d.version).inc()
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

    async def retry(self, d: Delivery, record: AttemptRecord, delay: float) -> None:
        """Wait for the next attempt in the retry schedule, which holds no slot; on an ordered
        lane, wait on the lane (a retry holds back its key's later events)."""
        await self._deps.state.finished(d.invocation.id, self.name, "retrying", record)
        due_ms = int((time.time() + delay) * 1000)
        if self.lane is not None or not await self.schedule(d.msg, due_ms, record.attempt):
            await d.msg.nak(delay=delay)
        self._retries(d.version).inc()
        self._retried(d.version).inc()
        self._deps.stats.retry(self.name, d.version)

    async def reschedule(self, msg: Msg, attempt: int) -> None:
        """A message delivered again (its holder crashed or handed it back) is not called:
        the delivery before may have stored the invocation's next message in the schedule
        already, between that PubAck and its ack. Scheduling it again, due now, under the same
        id (see :mod:`eventhub.retries`) settles it: JetStream keeps one of the two, and the
        invocation goes on from there, the delivery cut short counted as an attempt. Should the
        schedule be unavailable, the message is handed back for later, still uncalled: a call
        here could run beside the stored next message and exceed the retry budget."""
        if await self.schedule(msg, int(time.time() * 1000), attempt - 1):
            log.info("invocation_redelivered", rescheduled=True)
        else:
            await msg.nak(delay=_RESCHEDULE_LATER)

    async def schedule(
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

    async def write_down(self, d: Delivery, settled: str, attempts: int) -> None:
        """An outcome decided before PostgreSQL went away: written down now, without a call.
        Its last attempt was recorded in the invocation state when it was handed back."""
        history = await self._deps.state.attempts(d.invocation.id)
        last = AttemptRecord.from_json(history[-1]) if history else None
        if settled == SUCCEEDED:
            outcome = Outcome(status=last.status, error=last.error) if last else Outcome(200)
            await self.succeed(d, last, outcome, attempts, recorded=True)
        else:
            await self.give_up(d, settled, last, attempts, recorded=True)

    async def already_dead(self, d: Delivery, attempt: int) -> bool:
        """A redelivery of an invocation whose dead letter is stored (the ack was lost, or the
        dead-letter function's publish failed): never invoke it again, only finish the job.
        While PostgreSQL cannot say, the message is handed back (see :meth:`durable`)."""
        invocation, msg = d.invocation, d.msg
        if invocation.dead_letter_id or invocation.replay_of:
            return False
        sink = self._deps.sink
        found = await self.durable(
            d,
            lambda: sink.find(dead_letter_id(invocation.id)),
            "dead-letter check",
            attempts=attempt - 1,
            settled=(msg.headers or {}).get(H_SETTLED),
        )
        if found is None:
            return False
        record, dlf_status = found
        if invocation.flow is not None:  # the run may not have heard of it before the crash
            await self._flow_failed(
                d,
                record.reason,
                record.error_message,
                record.id,
                len(record.attempts),
                functools.partial(
                    self.durable,
                    d,
                    attempts=attempt - 1,
                    settled=(msg.headers or {}).get(H_SETTLED),
                ),
            )
        if dlf_status == "pending" and record.dead_letter_function:
            await self._to_dead_letter_function(d, record)
        if self.function is not None and self.function.on_failure is not None:
            # It may not have been published before the crash: again (same id, deduplicated).
            record_event = failure_event(
                self.name,
                d.version,
                invocation,
                reason=record.reason,
                error_code=record.error_code,
                error_message=record.error_message,
                attempts=len(record.attempts),
                dead_letter_id=record.id,
            )
            await self._send(d, self.function.on_failure, record_event, "on-failure")
        await self._ack(d)
        return True

    async def give_up(
        self,
        d: Delivery,
        reason: str,
        last: AttemptRecord | None,
        attempts: int,
        recorded: bool = False,
    ) -> None:
        """Store the dead letter, then ack. ``attempts``: the calls made so far; ``recorded``:
        ``last`` is in the invocation state already (an outcome written down late)."""
        deps, invocation = self._deps, d.invocation
        if last is not None and not recorded:  # kept, should PostgreSQL be away
            await deps.state.attempted(invocation.id, self.name, last)
        durably = functools.partial(self.durable, d, attempts=attempts, settled=reason)
        if invocation.dead_letter_id:
            # A delivery to a dead-letter function failed: recorded on its dead letter, no more.
            error = f"{reason}: {last.error or last.status}" if last else reason
            dl = invocation.dead_letter_id
            await durably(lambda: deps.sink.dead_letter_function_done(dl, False, error), "failure")
            await self._ack(d)
            deps.metrics.invocations.labels(self.name, d.version, "failed").inc()
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
            await self._flow_failed(d, reason, failure[1], replayed, attempts, durably)
            await self._ack(d)
            deps.metrics.replays.labels("failed").inc()
            await deps.state.settled(invocation.id, self.name, "dead-lettered")
            return
        dl_id = dead_letter_id(invocation.id)
        function = self.function
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
            enqueued_at=d.enqueued,
            failed_at=datetime.now(UTC),
            dead_letter_function=(
                function.dead_letter.function if function and function.dead_letter else None
            ),
            version=d.version,
            flow=invocation.flow.to_json() if invocation.flow is not None else None,
        )
        await durably(lambda: deps.sink.store(record), "dead letter")
        await self._flow_failed(d, reason, failure[1], dl_id, attempts, durably)
        if record.dead_letter_function:
            await self._to_dead_letter_function(d, record)
        if function is not None and function.on_failure is not None:
            record_event = failure_event(
                self.name,
                d.version,
                invocation,
                reason=reason,
                error_code=failure[0],
                error_message=failure[1],
                attempts=len(history),
                dead_letter_id=dl_id,
            )
            await self._send(d, function.on_failure, record_event, "on-failure")
        await self._ack(d)
        deps.metrics.dead_letters.labels(self.name, reason).inc()
        deps.metrics.invocations.labels(self.name, d.version, "dead_lettered").inc()
        deps.stats.dead_letter(self.name, d.version)
        log.warning("invocation_dead_lettered", reason=reason, dead_letter_id=dl_id)
        await deps.state.settled(invocation.id, self.name, "dead-lettered", deadLetterId=dl_id)
        last_outcome = (
            Outcome(status=last.status, error=last.error) if last else Outcome(error=reason)
        )
        deps.callbacks.send(invocation, "dead-lettered", last_outcome)

    async def _flow_failed(
        self,
        d: Delivery,
        reason: str,
        error: str,
        dead_letter_id: str,
        attempts: int,
        durably: Callable[[Callable[[], Awaitable[None]], str], Awaitable[None]],
    ) -> None:
        """A flow step's dead letter is stored: the run hears of it, before the ack."""
        flows, invocation = self._deps.flows, d.invocation
        if invocation.flow is None or flows is None:
            return
        await durably(
            lambda: flows.failed(
                invocation,
                reason=reason,
                error=error,
                dead_letter_id=dead_letter_id,
                attempts=attempts,
                version=d.version,
            ),
            "flow",
        )

    async def _send(
        self, d: Delivery, destination: DestinationSpec, event: Event, kind: str
    ) -> bool:
        """Publish a result or failure event to its destination, durably, before the ack: a
        function target gets one invocation; ``events: true`` routes it through the bindings
        of source ``function:<name>``. Past ``max_hops`` it becomes a dead letter instead.
        False when it is too large to publish. Should JetStream refuse it for now, the message
        is handed back (``nak``) and :class:`HandedBack` raised: the call will be made again."""
        deps, invocation = self._deps, d.invocation
        if hops(event) > deps.settings.max_hops:
            await self._hop_limit(d, event)
            return True
        trace = Trace(invocation.traceparent, invocation.tracestate)
        try:
            if destination.function is not None:
                target = Invocation(
                    id=event_invocation_id(event, f"{kind}:{self.name}"),
                    function=destination.function,
                    event=event,
                    traceparent=invocation.traceparent,
                    tracestate=invocation.tracestate,
                )
                await deps.ingress.enqueue(deps.router.routes.aim(target))
            else:
                await deps.ingress.submit(source_of(self.name), [event], trace, record_queued=False)
        except MessageTooLarge:
            log.warning("result_too_large", destination=kind)
            return False
        except Exception as exc:  # JetStream away: the redelivery tries again
            log.warning("result_unpublished", destination=kind, error=said(exc))
            if not d.acked:
                await d.msg.nak(delay=_OUTAGE_DELAY)
            raise HandedBack from exc
        return True

    async def _hop_limit(self, d: Delivery, event: Event) -> None:
        """A chain of results too long (a loop, most likely): its next event is kept as a dead
        letter, sent nowhere."""
        deps = self._deps
        inv_id = event_invocation_id(event, f"{HOP_LIMIT}:{self.name}")
        now = datetime.now(UTC)
        message = (
            f"the chain of results is {hops(event)} hops long (max_hops {deps.settings.max_hops})"
        )
        record = DeadLetterRecord(
            id=dead_letter_id(inv_id),
            invocation_id=inv_id,
            function=self.name,
            binding=d.invocation.binding,
            event=event,
            reason=HOP_LIMIT,
            error_code=HOP_LIMIT,
            error_message=message,
            attempts=[],
            enqueued_at=now,
            failed_at=now,
            dead_letter_function=None,
            version=d.version,
        )
        await self.until_up(d.msg, lambda: deps.sink.store(record), "hop-limit dead letter")
        deps.metrics.dead_letters.labels(self.name, HOP_LIMIT).inc()
        log.warning("result_hop_limit", dead_letter_id=record.id, hops=hops(event))

    async def _ack(self, d: Delivery) -> None:
        if not d.acked:
            await d.msg.ack()
            d.acked = True

    async def _to_dead_letter_function(self, d: Delivery, record: DeadLetterRecord) -> None:
        """Enqueue the dead letter's delivery to the dead-letter function (``f``, ``f:version``
        or ``f:alias``); the version is chosen from the dead letter's id."""
        msg, invocation = d.msg, d.invocation
        try:
            delivery = to_dead_letter_function(
                record,
                d.call.url if d.call is not None else "",
                dead_letter_id(record.id),
                traceparent=invocation.traceparent,
                tracestate=invocation.tracestate,
            )
            delivery = self._deps.choose_version(delivery)
            await self._deps.queue.publish(delivery)
        except MessageTooLarge as exc:
            # It can never fit (a very long URL): recorded on the stored dead letter, no retry.
            log.warning("dead_letter_function_too_large", dead_letter_id=record.id)
            try:
                await self._deps.sink.dead_letter_function_done(
                    record.id, False, f"too-large: {exc}"
                )
            except Exception:
                if not d.acked:
                    await msg.nak(delay=5.0)  # PostgreSQL away: the redelivery records it
                raise
        except Exception:
            # The dead letter is stored; the message stays ours so the delivery is retried
            # (at-most-once: acknowledged already, the dead letter keeps it for a replay).
            if not d.acked:
                await msg.nak(delay=5.0)
            raise

    # -- dependencies -------------------------------------------------------------------------

    async def keep(self, msg: Msg, seconds: float) -> None:
        """Wait ``seconds``, telling JetStream every third of ``ack_wait`` that ``msg`` is
        still being worked on."""
        step = self._deps.settings.ack_wait / 3
        while seconds > 0:
            await asyncio.sleep(min(seconds, step))
            seconds -= step
            if seconds > 0:
                await msg.in_progress()

    async def until_up(self, msg: Msg, step: Callable[[], Awaitable[_T]], what: str) -> _T:
        """Run a Redis or PostgreSQL step; while it fails, keep ``msg`` and try again with
        backoff. Nothing is handed back, so nothing counts as an attempt."""
        pause = _OUTAGE_BACKOFF[0]
        while True:
            try:
                async with asyncio.timeout(_DEPENDENCY_TIMEOUT):
                    return await step()
            except Exception as exc:  # Redis or PostgreSQL away: wait for it
                log.warning(
                    "dependency_unavailable", step=what, function=self.name, error=said(exc)
                )
            await self.keep(msg, pause)
            pause = min(pause * 2, _OUTAGE_BACKOFF[1])

    async def durable(
        self,
        d: Delivery,
        step: Callable[[], Awaitable[_T]],
        what: str,
        *,
        attempts: int,
        settled: str | None = None,
    ) -> _T:
        """Run a PostgreSQL step of a delivery. Should it fail, the message is handed back
        through the retry schedule with ``attempts`` (the calls really made) and ``settled``
        (the outcome decided already, if any), and :class:`HandedBack` is raised. On an
        ordered lane, or once acknowledged (at-most-once), it waits in place instead."""
        msg = d.msg
        if self.lane is not None or d.acked:
            return await self.until_up(msg, step, what)
        try:
            async with asyncio.timeout(_DEPENDENCY_TIMEOUT):
                return await step()
        except Exception as exc:  # PostgreSQL away, or refusing: try again later
            log.warning("dependency_unavailable", step=what, error=said(exc), handed_back=True)
            await self._hand_back(msg, attempts, settled)
            raise HandedBack from exc

    async def _hand_back(self, msg: Msg, attempts: int, settled: str | None) -> None:
        """Store the invocation's next message in the retry schedule, due in a few seconds,
        with the attempts really made: an outage spends none. Should the schedule be
        unavailable too, ``nak`` with a delay (that delivery then counts as an attempt)."""
        delay = _OUTAGE_DELAY * (0.5 + self._rand.random())  # spread the returns
        due_ms = int((time.time() + delay) * 1000)
        extra = {H_SETTLED: settled} if settled else None
        if not await self.schedule(msg, due_ms, attempts, extra):
            await msg.nak(delay=delay)


def said(exc: BaseException) -> str:
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
