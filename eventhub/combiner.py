"""Collecting the events of combination bindings in PostgreSQL, and firing them.

Ingress hands :meth:`Combiner.collect` every (event, dependency route) it matched, before it
publishes anything and before the source is acknowledged (or the ``202`` sent): in one
transaction, each event is stored under its binding and correlation key, the key's events older
than the window are dropped (a combination timed out), and the condition is evaluated over the
dependencies still pending. When it is true, the combination is recorded (its id derives from
the binding, the key and the events in it), its events are marked fired, and ingress publishes
one invocation (or starts one run) with the combined event.

Redelivery: an event already stored is not collected again. If it was part of a combination that
fired within JetStream's duplicate window, that combination is returned again, so a crash
between the commit and the PubAck is repaired by the redelivery (JetStream drops the repeat);
a later redelivery fires nothing. Events that fired are kept a day for this (so are pending
ones a binding since deleted left behind).

The sweeper (:meth:`Combiner.run`) drops pending events older than their binding's window every
second, counts each key dropped as ``eventhub_combinations_total{outcome="timed_out"}`` and logs
``combination_timed_out`` with the binding, the key and the dependencies that were seen.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from eventhub.combos import Combination
from eventhub.events import Event
from eventhub.expressions import EvaluationError, parse_data
from eventhub.metrics import Metrics

if TYPE_CHECKING:
    from eventhub.routing import Route, Routes

log = structlog.get_logger(__name__)

_IDS = uuid.UUID("8d3c0a4e-5f61-4b7a-9c2e-7e1f04b6d913")
COMBINATION_TYPE = "eventhub.combination"
SWEEP_EVERY = 1.0
_PURGE_EVERY = 60  # sweeps between removals of what fired a day ago


def combination_id(binding: str, key: str, members: Sequence[tuple[str, str, str]]) -> str:
    """One id per (binding, key, the events combined): a repeat of the same is the same."""
    parts = "\x00".join("\x00".join(m) for m in sorted(members))
    return str(uuid.uuid5(_IDS, f"{binding}\x00{key}\x00{parts}"))


def combined_event(cid: str, binding: str, key: str, data: bytes, fired_at: datetime) -> Event:
    """What the target receives: ``{dependency: structured CloudEvent}`` as JSON."""
    attributes = {
        "specversion": "1.0",
        "id": cid,
        "source": f"/eventhub/combinations/{binding}",
        "type": COMBINATION_TYPE,
        "time": fired_at.isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
    }
    if key:
        attributes["subject"] = key
    return Event(attributes, data)


@dataclass
class _Counts:
    fired: list[str]
    timed_out: list[tuple[str, str, list[str]]]  # (binding, key, dependencies seen)


class Combiner:
    def __init__(self, pool: Any, metrics: Metrics, duplicate_window: float) -> None:
        self._pool = pool
        self._metrics = metrics
        self._duplicate_window = duplicate_window

    async def collect(
        self, pairs: Sequence[tuple[Event, Route]], routes: Routes
    ) -> list[tuple[Event, Route]]:
        """Store these (event, dependency route) pairs; returns the combinations that fire now
        (or fired for one of these events moments ago), each with its binding's route."""
        prepared: list[tuple[Combination, str, Event, Route]] = []
        for event, route in pairs:
            combo = routes.combos.get(route.binding)
            if combo is None or route.combo is None:
                continue
            try:
                key = combo.key(parse_data(event.datacontenttype, event.data), event.attributes)
            except EvaluationError as exc:
                log.info(
                    "combination_uncorrelated",
                    binding=route.binding,
                    event_id=event.id,
                    error=str(exc),
                )
                self._metrics.combinations.labels(route.binding, "uncorrelated").inc()
                continue
            prepared.append((combo, key, event, route))
        if not prepared:
            return []
        prepared.sort(key=lambda p: (p[0].binding, p[1]))  # locks always taken in one order
        counts = _Counts([], [])
        fired: list[tuple[Event, Route]] = []
        async with self._pool.acquire() as conn, conn.transaction():
            for combo, key, event, route in prepared:
                combined = await self._one(conn, combo, key, event, route.combo or "", counts)
                if combined is not None:
                    fired.append((combined, route))
        for binding in counts.fired:
            self._metrics.combinations.labels(binding, "fired").inc()
        self._timed_out(counts.timed_out)
        return fired

    async def _one(
        self,
        conn: Any,
        combo: Combination,
        key: str,
        event: Event,
        dependency: str,
        counts: _Counts,
    ) -> Event | None:
        binding = combo.binding
        await conn.execute(
            "select pg_advisory_xact_lock(hashtextextended($1, 0))", f"combination/{binding}/{key}"
        )
        inserted = await conn.fetchval(
            "insert into combination_events"
            " (binding, dependency, event_source, event_id, key, event)"
            " values ($1, $2, $3, $4, $5, $6) on conflict do nothing returning true",
            binding,
            dependency,
            event.source,
            event.id,
            key,
            event.structured_bytes(),
        )
        if not inserted:
            return await self._fired_recently(conn, binding, dependency, event)
        expired = await conn.fetch(
            "delete from combination_events where binding = $1 and key = $2 and fired is null"
            " and received_at < now() - make_interval(secs => $3) returning dependency",
            binding,
            key,
            combo.window,
        )
        if expired:
            counts.timed_out.append((binding, key, sorted({r["dependency"] for r in expired})))
        rows = await conn.fetch(
            "select dependency, event_source, event_id, event from combination_events"
            " where binding = $1 and key = $2 and fired is null order by received_at, event_id",
            binding,
            key,
        )
        latest = {r["dependency"]: r for r in rows}  # a dependency seen twice: the later one
        if not combo.condition(frozenset(latest)):
            return None
        members = [(d, r["event_source"], r["event_id"]) for d, r in latest.items()]
        cid = combination_id(binding, key, members)
        data = orjson.dumps({d: orjson.Fragment(bytes(latest[d]["event"])) for d in sorted(latest)})
        fired_at = await conn.fetchval(
            "insert into combinations (id, binding, key, input) values ($1, $2, $3, $4)"
            " on conflict (id) do update set id = excluded.id returning fired_at",
            uuid.UUID(cid),
            binding,
            key,
            data,
        )
        await conn.execute(
            "update combination_events set fired = $3"
            " where binding = $1 and key = $2 and fired is null",
            binding,
            key,
            uuid.UUID(cid),
        )
        counts.fired.append(binding)
        log.info("combination_fired", binding=binding, key=key, combination=cid, events=members)
        return combined_event(cid, binding, key, data, fired_at)

    async def _fired_recently(
        self, conn: Any, binding: str, dependency: str, event: Event
    ) -> Event | None:
        """A repeat of an event: the combination it fired, if that was within the duplicate
        window (its publish may not have happened); otherwise nothing."""
        row = await conn.fetchrow(
            "select c.id, c.key, c.input, c.fired_at from combination_events e"
            " join combinations c on c.id = e.fired"
            " where e.binding = $1 and e.dependency = $2 and e.event_source = $3"
            " and e.event_id = $4 and c.fired_at > now() - make_interval(secs => $5)",
            binding,
            dependency,
            event.source,
            event.id,
            self._duplicate_window,
        )
        if row is None:
            return None
        return combined_event(
            str(row["id"]), binding, row["key"], bytes(row["input"]), row["fired_at"]
        )

    async def sweep(self, routes: Routes, *, purge: bool = False) -> None:
        """Drop pending events older than their binding's window (and those of bindings gone);
        with ``purge``, what fired more than a day ago too."""
        combos = routes.combos
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "delete from combination_events e"
                " using unnest($1::text[], $2::float8[]) as t(b, w)"
                " where e.fired is null and e.binding = t.b"
                " and e.received_at < now() - make_interval(secs => t.w)"
                " returning e.binding, e.key, e.dependency",
                list(combos),
                [c.window for c in combos.values()],
            )
            if purge:  # what fired, and what bindings since deleted or changed left behind
                await conn.execute(
                    "delete from combination_events where received_at < now() - interval '1 day'"
                )
                await conn.execute(
                    "delete from combinations where fired_at < now() - interval '1 day'"
                )
        seen: dict[tuple[str, str], set[str]] = {}
        for row in rows:
            if row["binding"] in combos:
                seen.setdefault((row["binding"], row["key"]), set()).add(row["dependency"])
        self._timed_out([(b, k, sorted(deps)) for (b, k), deps in seen.items()])

    def _timed_out(self, timed_out: Sequence[tuple[str, str, list[str]]]) -> None:
        for binding, key, deps in timed_out:
            self._metrics.combinations.labels(binding, "timed_out").inc()
            log.info("combination_timed_out", binding=binding, key=key, seen=deps)

    async def run(self, routes: Callable[[], Routes]) -> None:
        """Sweep every second until cancelled; a failed sweep is logged and tried again."""
        rounds = 0
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            rounds += 1
            current = routes()
            purge = rounds % _PURGE_EVERY == 0
            if not current.combos and not purge:
                continue
            try:
                await self.sweep(current, purge=purge)
            except Exception as exc:  # PostgreSQL away: the next round tries again
                log.warning("combination_sweep_failed", error=str(exc) or repr(exc))
