"""The retry schedule: where an invocation waits for its next attempt without holding a slot.

A function's consumer has ``max_ack_pending = maxConcurrency``, and a message handed back with
``nak(delay)`` still counts toward it. A retry that waited there would hold one of the
function's slots for its whole backoff, so a few failing events could starve every healthy one.
Instead, a retryable failure on the function's consumer is handled so:

1. the dispatcher publishes the invocation to ``<namespace>.retry.<function>`` with the
   attempts made so far (``Eh-Attempts``), the first enqueue time (``Eh-Enqueued``, for
   ``maxEventAge``) and when it is due (``Eh-Due``), and waits for the PubAck;
2. only then does it ack the failed delivery: the slot is free at once;
3. the :class:`RetrySchedule` of any dispatch process takes the message from the one shared
   consumer ``retry_schedule`` (no ``max_ack_pending`` limit) and hands it back with
   ``nak(delay)`` until it is due;
4. once due, it publishes the invocation back to ``<namespace>.invoke.<function>``, waits for
   the PubAck, and acks the schedule's message. The retry joins the end of the function's
   queue, behind what arrived meanwhile.

Each message that replaces another carries the id ``<invocation id>/s<stream sequence of the
message replaced>``: a crash between a publish and the ack of the message it replaces leads to
a redelivery that publishes the same id again, and JetStream drops the duplicate (within its
duplicate window). Should the schedule be unreachable (the buffer full, say), the dispatcher
falls back to ``nak(delay)`` on the function's consumer: slower, never lossy.

Ordered lanes keep ``nak(delay)``: there a waiting retry is meant to hold back the events after
it in its key.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from nats.aio.msg import Msg

from eventhub.invocations import H_DUE
from eventhub.queue import END, InvocationQueue, Puller, keep_pulling

log = structlog.get_logger(__name__)

_BATCH = 256  # messages in flight in one process's schedule, at most
_PULL_EXPIRES = 30.0
_PULL_HEARTBEAT = 5.0
_EARLY = 0.002  # a message due within this many seconds is released now


class RetrySchedule:
    """Releases due retries to their functions' queues; one per dispatch process."""

    def __init__(self, queue: InvocationQueue) -> None:
        self._queue = queue
        self._in_flight: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._queue.ensure_retry_consumer()
        self._loop = asyncio.create_task(self._fetch_loop(), name="retry-schedule")

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.wait([self._loop])
        if self._in_flight:  # each is one nak, or one publish and ack: short
            _, pending = await asyncio.wait(set(self._in_flight), timeout=5.0)
            for task in pending:  # its message comes back after ack_wait
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    async def _fetch_loop(self) -> None:
        await keep_pulling(
            self._queue.retry_puller,
            self._pull_once,
            self._queue.ensure_retry_consumer,
            lambda: True,  # until cancelled
            consumer="retry_schedule",
        )

    async def _pull_once(self, puller: Puller) -> int:
        while len(self._in_flight) >= _BATCH:
            self._room.clear()
            await self._room.wait()
        room = _BATCH - len(self._in_flight)
        await puller.request(room, expires=_PULL_EXPIRES, heartbeat=_PULL_HEARTBEAT)
        taken = 0
        while taken < room:
            msg = await puller.next(wait=_PULL_HEARTBEAT * 3)
            if msg is END or msg is None:
                break
            taken += 1
            task = asyncio.create_task(self._handle(msg))
            self._in_flight.add(task)
            task.add_done_callback(self._done)
        return taken

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._room.set()
        if not task.cancelled() and task.exception() is not None:
            # The message was neither handed back nor acked: it comes back after ack_wait.
            log.warning("retry_release_failed", error=repr(task.exception()))

    async def _handle(self, msg: Msg) -> None:
        due = int((msg.headers or {}).get(H_DUE) or 0) / 1000
        wait = due - time.time()
        if wait > _EARLY:
            await msg.nak(delay=wait)
            return
        await self._queue.release_retry(msg)
        await msg.ack()
