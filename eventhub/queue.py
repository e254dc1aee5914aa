"""The JetStream buffer between ingress and dispatch.

One stream (``<NAMESPACE>_INVOCATIONS``, work-queue retention, ``discard: new``) holds every
pending invocation under the subject ``<namespace>.invoke.<function>``. Each function has one
durable pull consumer, ``fn-<function>``, shared by every hub process: its ``max_ack_pending`` is
the function's ``maxConcurrency``, so the limit holds across processes.

A publish returns only after JetStream's PubAck: the invocation is then durably stored. A
``Nats-Msg-Id`` equal to the invocation id makes JetStream drop a repeat within the duplicate
window. When the stream is full, JetStream refuses the message and :class:`QueueFull` is raised;
nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import nats.errors
import nats.js.errors
import orjson
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

from eventhub import sizes
from eventhub.errors import DependencyDown
from eventhub.invocations import (
    H_ATTEMPTS,
    H_DUE,
    H_ENQUEUED,
    H_FUNCTION,
    H_INVOCATION_ID,
    H_MSG_ID,
    H_ORDERING_KEY,
    Invocation,
)
from eventhub.pubacks import PubAcks, settle
from eventhub.settings import Settings
from eventhub.sizes import RETRY_RESERVE

log = structlog.get_logger(__name__)

_FETCH_WAITING = 512
# How often a waiting pull checks that the connection was not re-established meanwhile (a local
# timer, no traffic): a request lost in a reconnect is replaced within this many seconds.
_RECONNECT_CHECK = 5.0
_PUBLISH_TIMEOUT = 5.0  # seconds for a PubAck (the JetStreamContext's request timeout)
# A message to publish: subject, data, headers, and the event's id (for an error message).
_Outgoing = tuple[str, bytes, dict[str, str], str | None]


class InvocationQueue:
    def __init__(self, nc: NATS, settings: Settings) -> None:
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream(timeout=_PUBLISH_TIMEOUT)
        self._pubacks = PubAcks(nc)
        self._settings = settings
        self.stream = settings.stream_name

    @property
    def js(self) -> JetStreamContext:
        return self._js

    async def ensure_stream(self) -> None:
        s = self._settings
        config = api.StreamConfig(
            name=self.stream,
            subjects=[
                f"{s.namespace}.invoke.>",
                f"{s.namespace}.held.>",
                f"{s.namespace}.retry.>",
            ],
            retention=api.RetentionPolicy.WORK_QUEUE,
            discard=api.DiscardPolicy.NEW,
            max_bytes=s.stream_max_bytes,
            max_msgs=s.stream_max_msgs,
            max_age=s.stream_max_age,
            duplicate_window=s.duplicate_window,
            num_replicas=s.stream_replicas,
            storage=api.StorageType.FILE,
        )
        try:
            try:
                await self._js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                await self._js.add_stream(config)
            else:
                await self._js.update_stream(config)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            raise DependencyDown(f"JetStream stream setup failed: {exc}") from exc

    def _consumer(self, function: str, lane: int | None) -> str:
        if lane is None:
            return self._settings.consumer_for(function)
        return self._settings.ordered_consumer_for(function, lane)

    async def ensure_consumer(
        self, function: str, max_concurrency: int, lane: int | None = None
    ) -> None:
        """Create or update the function's shared consumer, or one of its ordered lanes (one
        message in flight at a time, across every process)."""
        await self._add_consumer(
            self._consumer(function, lane),
            (
                self._settings.subject_for(function)
                if lane is None
                else self._settings.ordered_subject_for(function, lane)
            ),
            max_concurrency if lane is None else 1,
            function,
        )

    async def ensure_retry_consumer(self) -> None:
        """The retry schedule's consumer, shared by every dispatch process: each waiting retry
        is a message delivered to it and handed back (``nak``) until it is due. Nothing limits
        how many wait, and none of them counts toward a function's ``max_ack_pending``."""
        await self._add_consumer(
            self._settings.retry_consumer, self._settings.retry_subject_for(">"), -1, "retries"
        )

    async def _add_consumer(
        self, name: str, filter_subject: str, max_ack_pending: int, what: str
    ) -> None:
        """Create or update a durable pull consumer shared by every process."""
        config = api.ConsumerConfig(
            name=name,
            durable_name=name,
            filter_subject=filter_subject,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=self._settings.ack_wait,
            max_ack_pending=max_ack_pending,
            max_deliver=-1,  # eventhub decides when to give up: see eventhub.retry
            max_waiting=_FETCH_WAITING,
        )
        try:
            try:
                await self._js.add_consumer(self.stream, config)
            except nats.js.errors.NotFoundError:
                # NATS came back without its data: the stream first, then the consumer.
                await self.ensure_stream()
                await self._js.add_consumer(self.stream, config)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            raise DependencyDown(f"JetStream consumer setup failed for {what}: {exc}") from exc

    async def restore_stream(self) -> bool:
        """Create the stream again if it is gone (NATS restarted without its data, or the
        stream was deleted); True when it had to. Raises DependencyDown if NATS is away."""
        try:
            await self._js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            await self.ensure_stream()
            return True
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            raise DependencyDown(f"JetStream is unavailable: {type(exc).__name__}") from exc
        return False

    async def consumer_count(self) -> int:
        """How many consumers the stream has; raises DependencyDown when it is missing."""
        try:
            info = await self._js.stream_info(self.stream)
        except nats.js.errors.NotFoundError as exc:
            raise DependencyDown(f"JetStream stream {self.stream} is missing") from exc
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            raise DependencyDown(f"JetStream is unavailable: {type(exc).__name__}") from exc
        return int(info.state.consumer_count)

    async def puller(self, function: str, lane: int | None = None) -> Puller:
        return await self._open_puller(self._consumer(function, lane))

    async def retry_puller(self) -> Puller:
        return await self._open_puller(self._settings.retry_consumer)

    async def _open_puller(self, consumer: str) -> Puller:
        puller = Puller(self._nc, self.stream, consumer)
        await puller.open()
        return puller

    async def schedule_retry(
        self,
        msg: Msg,
        function: str,
        due_ms: int,
        attempts: int,
        extra: dict[str, str] | None = None,
    ) -> None:
        """Store the next attempt of the invocation ``msg`` carries in the retry schedule,
        durably (PubAck), so that ``msg`` can then be acked. Its id derives from ``msg``'s
        stream sequence: a redelivery of ``msg`` (a crash before its ack) schedules nothing
        twice. ``extra`` headers are set on the stored message."""
        headers = _successor_headers(msg)
        headers.update(extra or {})
        headers[H_ATTEMPTS] = str(attempts)
        headers.setdefault(H_ENQUEUED, str(int(msg.metadata.timestamp.timestamp() * 1000)))
        headers[H_DUE] = str(due_ms)
        await self._publish(self._settings.retry_subject_for(function), msg.data, headers)

    async def release_retry(self, msg: Msg) -> None:
        """Put a due retry back in its function's queue, durably (the caller then acks it)."""
        headers = _successor_headers(msg)
        headers.pop(H_DUE, None)
        await self._publish(self._settings.subject_for(headers[H_FUNCTION]), msg.data, headers)

    async def retries_waiting(self) -> dict[str, int]:
        """Invocations waiting in the retry schedule, by function."""
        return await self._counts(self._settings.retry_subject_for(""))

    async def _counts(self, prefix: str) -> dict[str, int]:
        """Messages in the stream under each subject that starts with ``prefix``, by the rest
        of the subject: one request for them all."""
        try:
            info = await self._js.stream_info(self.stream, subjects_filter=prefix + ">")
        except nats.js.errors.NotFoundError:
            return {}
        subjects = info.state.subjects or {}
        return {subject[len(prefix) :]: count for subject, count in subjects.items()}

    async def function_status(self, function: str) -> dict[str, int]:
        """What JetStream knows of a function's backlog, across every process: invocations
        waiting for a slot, calls in flight, retries waiting for their time."""
        try:
            info = await self._js.consumer_info(self.stream, self._consumer(function, None))
            waiting = await self._js.stream_info(
                self.stream, subjects_filter=self._settings.retry_subject_for(function)
            )
        except nats.js.errors.NotFoundError:
            return {"queued": 0, "inFlight": 0, "retrying": 0}
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            raise DependencyDown(f"JetStream is unavailable: {type(exc).__name__}") from exc
        return {
            "queued": info.num_pending,
            "inFlight": info.num_ack_pending,
            "retrying": sum((waiting.state.subjects or {}).values()),
        }

    async def oldest_waiting(self, function: str) -> float | None:
        """Seconds the oldest invocation waiting in the function's queue (delivered to no
        process yet) has been there; None when none waits. It is the first message on the
        function's subject after the last one its consumer delivered (the queue is FIFO)."""
        try:
            info = await self._js.consumer_info(self.stream, self._consumer(function, None))
            if not info.num_pending:
                return None
            msg = await self._js.get_msg(
                self.stream,
                (info.delivered.stream_seq or 0) + 1,
                subject=self._settings.subject_for(function),
                next=True,
            )
        except nats.js.errors.NotFoundError:  # no consumer, or taken meanwhile
            return None
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            raise DependencyDown(f"JetStream is unavailable: {type(exc).__name__}") from exc
        if msg.time is None:
            return None
        return max(0.0, time.time() - msg.time.timestamp())

    async def publish(self, invocation: Invocation, *, reserve: int = RETRY_RESERVE) -> bool:
        """Store one invocation durably; False when JetStream saw it already (duplicate).
        Raises MessageTooLarge, sending nothing, unless it fits with ``reserve`` bytes to spare
        (see :mod:`eventhub.sizes`)."""
        return bool(await self._publish_many([self._message(invocation)], reserve))

    def _message(self, invocation: Invocation) -> _Outgoing:
        if invocation.held:
            subject = self._settings.held_subject_for(invocation.binding or "")
        else:
            subject = self._subject(invocation.function, invocation.ordering_key)
        return subject, invocation.event.data, invocation.headers(), invocation.event.id

    def _subject(self, function: str, ordering_key: str | None) -> str:
        if ordering_key is None:
            return self._settings.subject_for(function)
        lane = zlib.crc32(ordering_key.encode()) % self._settings.ordered_lanes
        return self._settings.ordered_subject_for(function, lane)

    async def _publish(self, subject: str, data: bytes, headers: dict[str, str]) -> bool:
        """A message that replaces one already stored: its reserve is there to be used."""
        return bool(await self._publish_many([(subject, data, headers, None)], 0))

    async def _publish_many(self, messages: Sequence[_Outgoing], reserve: int | None) -> int:
        """Send every message at once, then wait for their PubAcks together (one deadline);
        returns how many were new. Raises the first failure once every PubAck came back or the
        time is up, so a caller never answers before JetStream did. Unless ``reserve`` is None
        (checked already), raises MessageTooLarge before sending anything if one of them does
        not fit in the server's max_payload less ``reserve``: the server would close the
        connection."""
        if reserve is not None:
            self.check_sizes(messages, reserve)
        sent: list[tuple[str, asyncio.Future[bytes]]] = []
        try:
            for subject, data, headers, _ in messages:
                sent.append(await self._pubacks.send(subject, data, headers))
        except nats.errors.Error as exc:
            self._pubacks.forget(token for token, _ in sent)
            raise DependencyDown(f"JetStream is unavailable: {type(exc).__name__}") from exc
        return await settle(self._pubacks, sent, _PUBLISH_TIMEOUT)

    def check_sizes(self, messages: Iterable[_Outgoing], reserve: int) -> None:
        """Raise MessageTooLarge for the first message that does not fit with ``reserve``."""
        sizes.check(((h, d, e) for _, d, h, e in messages), self._nc.max_payload, reserve)

    async def publish_all(
        self, invocations: Sequence[Invocation], *, reserve: int = RETRY_RESERVE
    ) -> int:
        """Publish concurrently; returns how many were new. Invocations of ordered bindings are
        published one after another, in the order given, so that the stream keeps their order;
        the others are pipelined: every message is sent at once and their PubAcks are awaited
        together (see :mod:`eventhub.pubacks`). Raises the first failure once every PubAck came
        back or timed out, so a caller never answers before JetStream did. Raises
        MessageTooLarge, sending none of them, if one does not fit with ``reserve``."""
        messages = [self._message(i) for i in invocations]
        self.check_sizes(messages, reserve)
        if len(invocations) == 1:
            return await self._publish_many(messages, None)
        ordered = [
            m for m, i in zip(messages, invocations, strict=True) if i.ordering_key is not None
        ]

        async def in_order() -> int:
            return sum([await self._publish_many([m], None) for m in ordered])

        async def pipelined() -> int:
            return await self._publish_many(
                [m for m, i in zip(messages, invocations, strict=True) if i.ordering_key is None],
                None,
            )

        if not ordered:
            return await pipelined()
        results = await asyncio.gather(in_order(), pipelined(), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return sum(int(r) for r in results if not isinstance(r, BaseException))

    async def held_bindings(self) -> dict[str, int]:
        """Bindings with invocations held while paused, and how many."""
        return await self._counts(self._settings.held_subject_for(""))

    async def release_held(self, binding: str, batch: int = 100) -> int:
        """Move a resumed binding's held invocations to their functions; returns how many.

        Each is republished under a new message id (``<id>/released``: the original id is still
        in the duplicate window) and acked only after the PubAck, so a crash here releases it
        again, deduplicated."""
        durable = f"held-{binding}"
        await self._js.add_consumer(
            self.stream,
            api.ConsumerConfig(
                name=durable,
                durable_name=durable,
                filter_subject=self._settings.held_subject_for(binding),
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=self._settings.ack_wait,
                max_ack_pending=batch * 2,
            ),
        )
        sub = await self._js.pull_subscribe_bind(durable=durable, stream=self.stream)
        moved = 0
        try:
            while True:
                try:
                    messages = await sub.fetch(batch, timeout=1.0)
                except nats.errors.TimeoutError:
                    return moved
                for msg in messages:
                    headers = dict(msg.headers or {})
                    invocation_id = headers.get(H_INVOCATION_ID) or headers.get(H_MSG_ID, "")
                    headers[H_INVOCATION_ID] = invocation_id  # the id the caller was given
                    headers[H_MSG_ID] = invocation_id + "/released"
                    subject = self._subject(headers[H_FUNCTION], headers.get(H_ORDERING_KEY))
                    await self._publish(subject, msg.data, headers)
                    await msg.ack()
                    moved += 1
        finally:
            await sub.unsubscribe()

    async def depths(self) -> dict[str, int]:
        """Invocations waiting or in flight per function, ordered lanes included, in one
        request (in a work-queue stream a message stays until acked: a subject's count is its
        depth). A function with none is absent."""
        depths: dict[str, int] = {}
        for rest, count in (await self._counts(self._settings.subject_for(""))).items():
            function = rest.split(".", 1)[0]
            depths[function] = depths.get(function, 0) + count
        return depths


def _successor_headers(msg: Msg) -> dict[str, str]:
    """The headers of a message that replaces ``msg``: same invocation, and a message id that
    is the same for every delivery of ``msg`` and differs for every other message."""
    headers = dict(msg.headers or {})
    invocation_id = headers.get(H_INVOCATION_ID) or headers[H_MSG_ID]
    headers[H_INVOCATION_ID] = invocation_id
    headers[H_MSG_ID] = f"{invocation_id}/s{msg.metadata.sequence.stream}"
    return headers


END = None  # what Puller.next returns when a pull request is over


async def keep_pulling(
    open_puller: Callable[[], Awaitable[Puller]],
    pull_once: Callable[[Puller], Awaitable[int]],
    repair: Callable[[], Awaitable[None]],
    running: Callable[[], bool],
    **context: str,
) -> None:
    """Pull one consumer while ``running()``: ``pull_once`` sends a request and takes what it
    brings. A failure, or a request refused at once (no consumer, no JetStream), backs off
    (0.5 s, doubling up to 30 s) and ``repair``s: re-creates the consumer, in case the stream
    was recreated meanwhile. The puller is closed whatever happens."""
    failures = 0
    while running():
        puller = None
        try:
            puller = await open_puller()
            while running():
                started = time.monotonic()
                if await pull_once(puller) or time.monotonic() - started > 1.0:
                    failures = 0
                    continue
                raise ConnectionError("the pull request was refused")
        except Exception as exc:  # NATS, Redis (rate limit) or anything: back off, go on
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # nats-py turns a pull cancelled on a closed connection into
                # ConnectionClosedError: the cancellation still stands.
                raise asyncio.CancelledError from exc
            failures += 1
            log.warning("pull_failed", error=str(exc) or repr(exc), **context)
            await asyncio.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))
            with contextlib.suppress(DependencyDown):
                await repair()
        finally:
            if puller is not None:
                await asyncio.shield(puller.close())


class Puller:
    """A continuous pull from one durable consumer: each message is handed over as it arrives.

    nats-py's ``fetch`` returns only when its request is over, so a batch that meets the
    consumer's ``max_ack_pending`` waits for the request to expire before any of it is handed
    over. Here the request is sent by hand and its messages are read one by one, so a message
    is processed as soon as JetStream delivers it, while the request stays open for the rest.
    """

    def __init__(self, nc: NATS, stream: str, consumer: str) -> None:
        self._nc = nc
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = ""
        self._sub: Any = None
        self._reconnects = 0

    async def open(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox)

    async def close(self) -> None:
        """Stop pulling; messages already delivered here but not handed over are given back
        (nak), so they are not left waiting for ack_wait."""
        if self._sub is None:
            return
        sub, self._sub = self._sub, None
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
        pending = sub._pending_queue  # nats-py keeps delivered, unread messages here
        while not pending.empty():
            msg = pending.get_nowait()
            if msg.reply and not (msg.headers and msg.headers.get("Status")):
                with contextlib.suppress(nats.errors.Error):
                    await msg.nak()

    async def request(self, batch: int, expires: float, heartbeat: float) -> None:
        self._reconnects = self._nc.stats["reconnects"]
        body = {
            "batch": batch,
            "expires": int(expires * 1e9),
            "idle_heartbeat": int(heartbeat * 1e9),
        }
        await self._nc.publish(self._next_subject, orjson.dumps(body), reply=self._inbox)

    async def next(self, wait: float) -> Msg | None:
        """The next message of the open request, or END when the request is over (expired,
        refused, silent for ``wait`` seconds, or lost: the connection was re-established since
        it was sent, and the server forgot it)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                timeout = min(_RECONNECT_CHECK, deadline - time.monotonic())
                msg: Msg = await self._sub.next_msg(timeout=max(timeout, 0.001))
            except nats.errors.TimeoutError:
                if self._nc.stats["reconnects"] != self._reconnects:
                    return END
                if time.monotonic() >= deadline:
                    return END
                continue
            status = msg.headers.get("Status") if msg.headers else None
            if status is None:
                return msg
            if status == "100":  # idle heartbeat: the request is alive, wait on
                deadline = time.monotonic() + wait
                continue
            if status not in ("404", "408", "409"):
                log.warning(
                    "pull_refused",
                    status=status,
                    description=msg.headers.get("Description") if msg.headers else None,
                )
            return END
