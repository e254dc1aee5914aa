"""Kafka source: a consumer group member (aiokafka) with manual, per-partition offset commits.

=============  ====================================================================================
Outcome        What the connector does with the consumer group
=============  ====================================================================================
ack            The offset after a message is committed (``OffsetCommit``, about every 0.5 s and
               on revoke and shutdown) only once ``ctx.deliver`` returned for it and for every
               earlier message of its partition, i.e. once their invocations are in JetStream.
nack           Never explicit: a failure (``deliver`` raises, the broker is unreachable, the hub
               stops or dies) leaves the offsets of undelivered messages uncommitted; whichever
               member owns the partition next (this process after its restart, or another one)
               fetches again from the committed offset.
reject         A message that cannot become an event goes to ``ctx.reject`` (a durable dead letter
               of the source); then it counts as done and its offset is committed with the rest.
throttled      ``deliver`` waits while ``ctx.room`` is clear, and a partition whose batch is in
               delivery is paused (``consumer.pause``): the poll loop keeps polling, so the member
               keeps its partitions, but each partition takes at most one batch (500 records)
               after the source is throttled, and resumes once that batch is in JetStream, i.e.
               when there is room again. Above 2,000 records in delivery, every partition pauses.
rebalance      ``on_partitions_revoked`` cancels the deliveries in progress of the revoked
               partitions, commits what is done and drops the rest: the next owner fetches it
               again, and JetStream deduplicates what was already enqueued.
=============  ====================================================================================

Partitions are delivered concurrently; one partition's messages reach ``deliver`` in offset order,
in chunks of up to 100 events (the dispatcher may still invoke them concurrently).
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
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from connectors.common import Message, Rejected, ssl_context, to_events
from eventhub.events import Event
from eventhub.ports import Connector
from eventhub.resources import Resource
from eventhub.sources import SourceContext
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


def connector(resource: Resource) -> Connector:
    return KafkaConnector(resource)


class KafkaConnector:
    def __init__(self, resource: Resource) -> None:
        self.name = resource.name
        self.spec: KafkaSpec = resource.model
        self.group_id = self.spec.group_id or f"eventhub-{resource.name}"
        self._session: _Session | None = None

    async def run(self, ctx: SourceContext) -> None:
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


@dataclass
class _Batch:
    """The records of one partition being delivered; ``pending`` = oldest offset not done."""

    size: int
    pending: int
    task: asyncio.Task[None] | None = None


class _Session:
    """One consumer's lifetime: its poll loop, deliveries, commits and rebalances."""

    def __init__(self, ctx: SourceContext, consumer: Any, spec: KafkaSpec) -> None:
        self.ctx = ctx
        self.consumer = consumer
        self.spec = spec
        self.batches: dict[TopicPartition, _Batch] = {}
        self.done: dict[TopicPartition, int] = {}  # next offset to commit
        self.committed: dict[TopicPartition, int] = {}
        self.full = False  # too many records in delivery: every partition is paused
        self._tg: asyncio.TaskGroup | None = None

    async def run(self) -> None:
        try:
            await self.consumer.start()
            listener = _Listener(self)
            if self.spec.topic_pattern:
                self.consumer.subscribe(pattern=self.spec.topic_pattern, listener=listener)
            else:
                self.consumer.subscribe(topics=list(self.spec.topics), listener=listener)
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._report_lag(), name=f"kafka-lag:{self.ctx.name}")
                await self._poll()
        except ExceptionGroup as group:  # a delivery failed: report it, not the group
            raise group.exceptions[0]  # noqa: B904 - the group is its context already
        finally:
            with contextlib.suppress(KafkaError, TimeoutError):
                await asyncio.wait_for(self._commit(), _CLOSE_TIMEOUT)
            with contextlib.suppress(KafkaError, TimeoutError):  # leaving the group is a courtesy
                await asyncio.wait_for(self.consumer.stop(), _CLOSE_TIMEOUT)

    async def _poll(self) -> None:
        last_commit = time.monotonic()
        while True:
            self._sync_pauses()
            records = await self.consumer.getmany(timeout_ms=_POLL_MS, max_records=_BATCH)
            for tp, batch in records.items():
                if batch:
                    self._start(tp, batch)
            self._sync_pauses()  # pause the partitions just handed to a delivery
            if time.monotonic() - last_commit >= _COMMIT_EVERY:
                await self._commit()
                last_commit = time.monotonic()

    def _start(self, tp: TopicPartition, records: list[Any]) -> None:
        if tp in self.batches or self._tg is None:
            raise RuntimeError(f"records of {tp} fetched while a batch of it is in delivery")
        batch = _Batch(size=len(records), pending=records[0].offset)
        batch.task = self._tg.create_task(self._deliver(tp, records, batch))
        self.batches[tp] = batch

    async def _deliver(self, tp: TopicPartition, records: list[Any], batch: _Batch) -> None:
        """Deliver one partition's records in order, marking progress after each chunk."""
        events: list[Event] = []
        for record in records:
            try:
                events.extend(self._events(record))
            except Rejected as exc:
                await self._reject(record, exc.reason)
            if len(events) >= _CHUNK:
                await self._send(tp, batch, events)
                events = []
                self._mark(tp, batch, record.offset + 1)
        if events:
            await self._send(tp, batch, events)
        self._mark(tp, batch, records[-1].offset + 1)
        if self.batches.get(tp) is batch:
            del self.batches[tp]
        self._sync_pauses()

    async def _send(self, tp: TopicPartition, batch: _Batch, events: list[Event]) -> None:
        if not self.ctx.room.is_set():
            log.info(
                "kafka_waiting_for_room",
                source=self.ctx.name,
                partition=f"{tp.topic}/{tp.partition}",
                offset=batch.pending,
                events=len(events),
            )
        await self.ctx.deliver(events)

    def _mark(self, tp: TopicPartition, batch: _Batch, offset: int) -> None:
        batch.pending = offset
        self.done[tp] = offset

    def _events(self, record: Any) -> list[Event]:
        message = to_message(record)
        key = message.extensions.get("partitionkey")
        events = to_events(message, self.spec, DEFAULT_TYPE)
        if key is None or self.spec.format == "s3":
            return events
        return [_with_key(event, key) for event in events]

    async def _reject(self, record: Any, reason: str) -> None:
        payload = record.value or b""
        metadata = {
            "topic": record.topic,
            "partition": str(record.partition),
            "offset": str(record.offset),
        }
        await self.ctx.reject(_record_id(record), reason, payload, metadata)

    def _sync_pauses(self) -> None:
        """Pause the partitions in delivery (all of them while too much is in delivery)."""
        assigned = self.consumer.assignment()
        if not assigned:
            return
        in_flight = sum(b.size for b in self.batches.values())
        full = in_flight >= _MAX_IN_FLIGHT
        if full != self.full:
            self.full = full
            event = "kafka_partitions_paused" if full else "kafka_partitions_resumed"
            log.info(event, source=self.ctx.name, in_flight=in_flight)
        wanted = set(assigned) if full else set(self.batches) & assigned
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
        batches = [self.batches.pop(tp) for tp in partitions if tp in self.batches]
        tasks = [b.task for b in batches if b.task is not None]
        for task in tasks:
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
            batch = self.batches.get(tp)
            start = batch.pending if batch else await self.consumer.position(tp)
            lag += max(0, ends.get(tp, 0) - start)
        return lag


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no types
    def __init__(self, session: _Session) -> None:
        self._session = session

    async def on_partitions_revoked(self, revoked: frozenset[TopicPartition]) -> None:
        await self._session.revoked(revoked)

    async def on_partitions_assigned(self, assigned: frozenset[TopicPartition]) -> None:
        self._session.assigned(assigned)


def to_message(record: Any) -> Message:
    """A Kafka record as :func:`connectors.common.to_events` sees it (see the module docs)."""
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


def _timestamp(millis: int | None) -> str | None:
    if millis is None or millis < 0:
        return None
    moment = datetime.fromtimestamp(millis / 1000, UTC)
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
