"""Kafka source: a consumer group member (aiokafka) with manual, per-partition offset commits.

=============  ====================================================================================
Outcome        What the connector does with the consumer group
=============  ====================================================================================
ack            The offset after a message is committed (``OffsetCommit``, about every 0.5 s and
               on revoke and shutdown) only once ``ctx.deliver`` returned for it and for every
               earlier message of its partition, i.e. once their invocations are in JetStream:
               chunks of 100 records are delivered concurrently (up to 2,000 records in flight,
               their PubAcks outstanding together) but marked done in offset order, so the
               commit never passes the lowest offset not yet enqueued.
nack           Never explicit: a failure (``deliver`` raises, the broker is unreachable, the hub
               stops or dies) leaves the offsets of undelivered messages uncommitted; whichever
               member owns the partition next (this process after its restart, or another one)
               fetches again from the committed offset.
reject         A message that cannot become an event goes to ``ctx.reject`` (a durable dead letter
               of the source); then it counts as done and its offset is committed with the rest.
throttled      ``deliver`` waits while ``ctx.room`` is clear; while records wait for room, or
               above 2,000 records in delivery, every partition is paused (``consumer.pause``):
               the poll loop keeps polling, so the member keeps its partitions, and they resume
               once there is room again. With an ``ordered`` binding, a partition has one batch
               (500 records) in delivery at a time and is paused meanwhile, as before
               pipelining, so its events reach JetStream in offset order.
rebalance      ``on_partitions_revoked`` cancels the deliveries in progress of the revoked
               partitions, commits what is done and drops the rest: the next owner fetches it
               again, and JetStream deduplicates what was already enqueued.
=============  ====================================================================================

Partitions, and chunks of one partition, are delivered concurrently (a source with an ordered
binding: one batch per partition at a time, in offset order); commits follow offset order.
``ctx.set_lag`` reports, every 2 s, the messages of the assigned partitions not yet in JetStream
(log end offset minus the oldest offset not delivered).

CloudEvents Kafka protocol binding, for ``format: auto`` (the rules are in
:mod:`connectors.common`):

- binary mode: headers ``ce_<attribute>`` with a ``ce_specversion``, ``content-type`` as
  ``datacontenttype``, the value as data.
- structured mode: header ``content-type: application/cloudevents+json``.
- either way, a message key becomes the ``partitionkey`` extension unless the event has one, as
  the binding's key mapping (and the SDK's ``from_binary`` / ``from_structured``) do.
- anything else is wrapped: ``id`` = ``<topic>/<partition>/<offset>``, ``source`` =
  ``kafka://<topic>``, ``type`` = ``eventType`` or ``eventhub.kafka.message``, ``time`` = the
  message timestamp, ``subject`` and ``partitionkey`` = the key when it is UTF-8 text,
  ``datacontenttype`` = the ``content-type`` header, extensions ``topic``, ``partition``,
  ``offset``. A null value (tombstone) is empty data.

A record that cannot become an event (a header name, or a ``ce_`` or ``content-type`` header,
that is not UTF-8, a timestamp past the year 9999, such as one in microseconds, a bad charset, an
invalid binary or structured CloudEvent, any error of the conversion) is rejected
(:func:`record_events`). Header names are read leniently (:mod:`connectors.kafkawire`): aiokafka
alone fails the whole fetch on a name that is not UTF-8, and every consumer would fetch the same
offset again, forever.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from connectors import kafkawire
from connectors.common import Message, Rejected, convert, ssl_context, to_events
from eventhub.events import Event
from eventhub.ports import Connector
from eventhub.resources import Resource
from eventhub.sources import Deliveries, SourceContext, raise_first
from eventhub.sourcespecs import KafkaSpec

log = structlog.get_logger(__name__)

DEFAULT_TYPE = "eventhub.kafka.message"
_POLL_MS = 500  # how long one getmany waits for records (the loop also commits between)
_BATCH = 500  # records per getmany (max_poll_records)
_CHUNK = 100  # events per ctx.deliver
_MAX_IN_FLIGHT = 2000  # records being delivered across partitions before all are paused
_COMMIT_EVERY = 0.5
_LAG_EVERY = 2.0
_CLOSE_TIMEOUT = 5.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_MILLIS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the last time RFC 3339 can write


def connector(resource: Resource) -> Connector:
    return KafkaConnector(resource)


class KafkaConnector:
    def __init__(self, resource: Resource) -> None:
        self.name = resource.name
        self.spec: KafkaSpec = resource.model
        self.group_id = self.spec.group_id or f"eventhub-{resource.name}"
        self._session: _Session | None = None

    async def run(self, ctx: SourceContext) -> None:
        kafkawire.install()  # before anything is fetched: an odd header name must not wedge
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.spec.bootstrap_servers,
            group_id=self.group_id,
            client_id=f"eventhub-{self.name}",
            enable_auto_commit=False,
            auto_offset_reset=self.spec.initial_offset,
            max_poll_records=_BATCH,
            **_security(self.spec),
        )
        self._session = _Session(ctx, consumer, self.spec)
        await self._session.run()

    def paused(self) -> list[str]:
        """The partitions (``topic/partition``) the consumer has paused now, for diagnostics."""
        if self._session is None:
            return []
        return _names(self._session.consumer.paused())


@dataclass(eq=False)
class _Chunk:
    """Up to ``_CHUNK`` consecutive records of one partition, delivered as one."""

    tp: TopicPartition
    size: int
    first: int  # its first offset
    end: int  # the offset after its last record: the partition's next commit once delivered
    revoked: bool = False
    task: asyncio.Task[None] | None = None


class _Session:
    """One consumer's lifetime: its poll loop, deliveries, commits and rebalances."""

    def __init__(self, ctx: SourceContext, consumer: Any, spec: KafkaSpec) -> None:
        self.ctx = ctx
        self.consumer = consumer
        self.spec = spec
        self.chunks: dict[TopicPartition, collections.deque[_Chunk]] = {}  # in delivery
        self.in_flight = 0  # records in delivery
        self.done: dict[TopicPartition, int] = {}  # next offset to commit
        self.committed: dict[TopicPartition, int] = {}
        self.full = False  # too many records in delivery: every partition is paused
        self.generation = 0  # rebalances handled so far
        self._deliveries: Deliveries | None = None

    async def run(self) -> None:
        try:
            await self.consumer.start()
            listener = _Listener(self)
            if self.spec.topic_pattern:
                self.consumer.subscribe(pattern=self.spec.topic_pattern, listener=listener)
            else:
                self.consumer.subscribe(topics=list(self.spec.topics), listener=listener)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._report_lag(), name=f"kafka-lag:{self.ctx.name}")
                # Never full before ``in_flight`` is: the poll loop must not block on it.
                async with self.ctx.deliveries(_MAX_IN_FLIGHT + _BATCH) as deliveries:
                    self._deliveries = deliveries
                    await self._poll()
        except ExceptionGroup as group:  # a delivery failed: report it, not the group
            raise_first(group)
        finally:
            self._deliveries = None
            with contextlib.suppress(KafkaError, TimeoutError):
                await asyncio.wait_for(self._commit(), _CLOSE_TIMEOUT)
            with contextlib.suppress(KafkaError, TimeoutError):  # leaving the group is a courtesy
                await asyncio.wait_for(self.consumer.stop(), _CLOSE_TIMEOUT)

    async def _poll(self) -> None:
        last_commit = time.monotonic()
        while True:
            self._sync_pauses()
            records = await self.consumer.getmany(timeout_ms=_POLL_MS, max_records=_BATCH)
            generation = self.generation
            # Ordered: a partition's batch is one delivery, its partition paused meanwhile.
            step = _BATCH if self.ctx.ordered else _CHUNK
            for tp, batch in records.items():
                for i in range(0, len(batch), step):
                    await self._start(tp, batch[i : i + step], generation)
            if time.monotonic() - last_commit >= _COMMIT_EVERY:
                await self._commit()
                last_commit = time.monotonic()

    async def _start(self, tp: TopicPartition, records: list[Any], generation: int) -> None:
        if self._deliveries is None:
            raise RuntimeError("records fetched outside of the session's deliveries")
        if generation != self.generation:
            # Fetched before a rebalance that was handled while earlier chunks waited to start:
            # whoever owns the partition now reads them again from its last commit. Delivered
            # here, they could move the partition's commit past records not enqueued.
            return
        chunk = _Chunk(tp, len(records), records[0].offset, records[-1].offset + 1)
        self.chunks.setdefault(tp, collections.deque()).append(chunk)
        self.in_flight += chunk.size
        ack = functools.partial(self._delivered, chunk)
        chunk.task = await self._deliveries.start(self._deliver(chunk, records), ack, lane=tp)

    async def _deliver(self, chunk: _Chunk, records: list[Any]) -> None:
        """Deliver one chunk of a partition's records, ``_CHUNK`` events at a time (chunks run
        concurrently; they are acknowledged in the order they were started, so per partition
        in offset order)."""
        events: list[Event] = []
        for record in records:
            try:
                events.extend(record_events(record, self.spec))
            except Rejected as exc:
                await self._reject(record, exc.reason)
            if len(events) >= _CHUNK:
                await self._send(chunk, events)
                events = []
        if events:
            await self._send(chunk, events)

    async def _send(self, chunk: _Chunk, events: list[Event]) -> None:
        if not self.ctx.room.is_set():
            tp = chunk.tp
            log.info(
                "kafka_waiting_for_room",
                source=self.ctx.name,
                partition=f"{tp.topic}/{tp.partition}",
                offset=chunk.first,
                events=len(events),
            )
        await self.ctx.deliver(events)

    def _delivered(self, chunk: _Chunk) -> None:
        """This chunk and every one started before it are in JetStream: commit up to it."""
        if chunk.revoked:
            return  # accounted for by ``revoked``
        self._forget(chunk)
        self.done[chunk.tp] = chunk.end
        self._sync_pauses()

    def _forget(self, chunk: _Chunk) -> None:
        chunks = self.chunks.get(chunk.tp)
        if chunks is not None:
            chunks.remove(chunk)
            if not chunks:
                del self.chunks[chunk.tp]
        self.in_flight -= chunk.size

    async def _reject(self, record: Any, reason: str) -> None:
        payload = record.value or b""
        metadata = {
            "topic": record.topic,
            "partition": str(record.partition),
            "offset": str(record.offset),
        }
        await self.ctx.reject(_record_id(record), reason, payload, metadata)

    def _sync_pauses(self) -> None:
        """Pause every partition while too many records are in delivery, or while some wait
        for room (the source is throttled: take nothing more); for an ordered source, also
        each partition with a delivery in progress."""
        assigned = self.consumer.assignment()
        if not assigned:
            return
        waiting = self.in_flight > 0 and not self.ctx.room.is_set()
        full = self.in_flight >= _MAX_IN_FLIGHT or waiting
        if full != self.full:
            self.full = full
            event = "kafka_partitions_paused" if full else "kafka_partitions_resumed"
            log.info(event, source=self.ctx.name, in_flight=self.in_flight)
        wanted = assigned if full else set(self.chunks) & assigned if self.ctx.ordered else set()
        paused = self.consumer.paused()
        if wanted - paused:
            self.consumer.pause(*(wanted - paused))
        if (paused & assigned) - wanted:
            self.consumer.resume(*((paused & assigned) - wanted))

    async def _commit(self, only: Iterable[TopicPartition] | None = None) -> None:
        assigned = self.consumer.assignment()
        wanted = assigned if only is None else assigned & set(only)
        offsets = {
            tp: offset
            for tp, offset in self.done.items()
            if tp in wanted and self.committed.get(tp) != offset
        }
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The group rebalanced under us: the new owner fetches from the last commit and
            # JetStream deduplicates what this member had already enqueued.
            log.info("kafka_commit_skipped", source=self.ctx.name, reason=str(exc))
            return
        self.committed.update(offsets)

    async def revoked(self, partitions: frozenset[TopicPartition]) -> None:
        self.generation += 1
        chunks = [c for tp in partitions for c in self.chunks.get(tp, ())]
        for chunk in chunks:
            chunk.revoked = True
            self._forget(chunk)
        tasks = [c.task for c in chunks if c.task is not None]
        for task in tasks:
            if self._deliveries is not None:
                self._deliveries.cancel(task)
            else:
                task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        with contextlib.suppress(KafkaError):  # a failed commit here is a redelivery, no loss
            await self._commit(partitions)
        for tp in partitions:
            self.done.pop(tp, None)
            self.committed.pop(tp, None)
        log.info("kafka_partitions_revoked", source=self.ctx.name, partitions=_names(partitions))

    def assigned(self, partitions: frozenset[TopicPartition]) -> None:
        self._sync_pauses()
        log.info("kafka_partitions_assigned", source=self.ctx.name, partitions=_names(partitions))

    async def _report_lag(self) -> None:
        while True:
            await asyncio.sleep(_LAG_EVERY)
            with contextlib.suppress(KafkaError, TimeoutError):
                async with asyncio.timeout(_LAG_EVERY * 2):
                    self.ctx.set_lag(await self._lag())

    async def _lag(self) -> int:
        assigned = list(self.consumer.assignment())
        if not assigned:
            return 0
        ends = await self.consumer.end_offsets(assigned)
        lag = 0
        for tp in assigned:
            chunks = self.chunks.get(tp)
            start = chunks[0].first if chunks else await self.consumer.position(tp)
            lag += max(0, ends.get(tp, 0) - start)
        return lag


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no types
    def __init__(self, session: _Session) -> None:
        self._session = session

    async def on_partitions_revoked(self, revoked: frozenset[TopicPartition]) -> None:
        await self._session.revoked(revoked)

    async def on_partitions_assigned(self, assigned: frozenset[TopicPartition]) -> None:
        self._session.assigned(assigned)


def record_events(record: Any, spec: KafkaSpec) -> list[Event]:
    """The events of one record; raises :class:`Rejected` for one that cannot become any."""
    return convert(lambda: _events(record, spec))


def _events(record: Any, spec: KafkaSpec) -> list[Event]:
    message = to_message(record)
    key = message.extensions.get("partitionkey")
    events = to_events(message, spec, DEFAULT_TYPE)
    if key is None or spec.format == "s3":
        return events
    return [_with_key(event, key) for event in events]


def to_message(record: Any) -> Message:
    """A Kafka record as :func:`connectors.common.to_events` sees it (see the module docs)."""
    unreadable = kafkawire.unreadable(record.headers or ())
    if unreadable is not None:
        raise Rejected(unreadable)
    ce: dict[str, str] = {}
    content_type = None
    for name, raw in record.headers or ():
        lower = name.lower()
        if lower.startswith("ce_"):
            ce[lower[3:]] = _header_text(name, raw)
        elif lower == "content-type":
            content_type = _header_text(name, raw)
    extensions = {
        "topic": record.topic,
        "partition": str(record.partition),
        "offset": str(record.offset),
    }
    key = _key_text(record.key)
    if key is not None:
        extensions["partitionkey"] = key
    return Message(
        payload=record.value or b"",
        id=_record_id(record),
        source=f"kafka://{record.topic}",
        content_type=content_type,
        ce_attributes=ce,
        subject=key,
        time=_timestamp(record.timestamp),
        extensions=extensions,
    )


def _with_key(event: Event, key: str) -> Event:
    """The Kafka binding maps the message key to ``partitionkey``; an event's own one wins."""
    return event if "partitionkey" in event.attributes else event.with_extensions(partitionkey=key)


def _record_id(record: Any) -> str:
    return f"{record.topic}/{record.partition}/{record.offset}"


def _header_text(name: str, raw: bytes | None) -> str:
    try:
        return (raw or b"").decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected(f"invalid-header: header {name} is not UTF-8 text") from None


def _key_text(key: bytes | None) -> str | None:
    if not key:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return None  # a binary key has no text form: no subject, no partitionkey


@functools.lru_cache(maxsize=1024)  # records produced together share their milliseconds
def _timestamp(millis: int | None) -> str | None:
    if millis is None or millis < 0:  # -1: the record has no timestamp
        return None
    if millis > _MAX_MILLIS:
        raise Rejected(
            f"invalid-time: timestamp {millis} is past the year 9999 as milliseconds since the"
            " epoch (microseconds?)"
        )
    moment = _EPOCH + timedelta(milliseconds=millis)  # exact, where a float may not be
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _names(partitions: Iterable[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}/{tp.partition}" for tp in partitions)


def _security(spec: KafkaSpec) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if spec.tls is not None:
        options["ssl_context"] = ssl_context(spec.tls)
    if spec.sasl is not None:
        options.update(
            security_protocol="SASL_SSL" if spec.tls else "SASL_PLAINTEXT",
            sasl_mechanism=spec.sasl.mechanism,
            sasl_plain_username=spec.sasl.username,
            sasl_plain_password=spec.sasl.password.get_secret_value(),
        )
    elif spec.tls is not None:
        options["security_protocol"] = "SSL"
    return options
