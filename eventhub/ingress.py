"""Ingress: events and direct invocations into JetStream.

``submit`` routes events through the bindings of one source and publishes one invocation per
match; ``invoke`` enqueues one invocation of one function. Both return only after every
invocation is durably in JetStream (PubAck), so a caller that is told "accepted" can forget the
event. The HTTP API and every connector go through this one door. An invocation that would not
fit in one NATS message with :data:`~eventhub.sizes.INGRESS_RESERVE` to spare is refused with
``MessageTooLarge`` (413) before any of the request's invocations is published.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from eventhub.errors import MessageTooLarge, NotFound
from eventhub.events import Event, now_rfc3339
from eventhub.invocations import (
    Invocation,
    event_invocation_id,
    keyed_invocation_id,
    new_traceparent,
)
from eventhub.metrics import Metrics
from eventhub.queue import InvocationQueue
from eventhub.routing import Router
from eventhub.sizes import INGRESS_RESERVE
from eventhub.state import InvocationState
from eventhub.versions import Target, names

if TYPE_CHECKING:
    from eventhub.combiner import Combiner
    from eventhub.flows.engine import FlowEngine
    from eventhub.routing import Route, Routes

INVOKE_SOURCE = "/eventhub/invocations"
_DEPTH_TTL = 1.0
INVOKE_TYPE = "eventhub.invocation"


@dataclass(frozen=True, slots=True)
class Trace:
    traceparent: str | None = None
    tracestate: str | None = None


class Ingress:
    def __init__(
        self,
        router: Router,
        queue: InvocationQueue,
        state: InvocationState,
        metrics: Metrics,
        flows: FlowEngine | None = None,
        combiner: Combiner | None = None,
    ) -> None:
        self._router = router
        self._flows = flows  # starts the runs of flow bindings
        self._combiner = combiner  # collects the events of combination bindings
        self._queue = queue
        self._state = state
        self._metrics = metrics
        self._depths: tuple[float, dict[str, int]] = (-_DEPTH_TTL, {})
        # The labelled counters, looked up once (prometheus_client's labels() takes a lock).
        self._events_in = functools.lru_cache(maxsize=1024)(metrics.events_in.labels)
        self._enqueued = functools.lru_cache(maxsize=4096)(metrics.invocations_enqueued.labels)

    async def submit(
        self,
        source: str,
        events: Sequence[Event],
        trace: Trace = Trace(),
        *,
        record_queued: bool = True,
        caller: str | None = None,
    ) -> list[Invocation]:
        """Publish one invocation per (event, matching binding); returns them.

        ``record_queued`` writes their 'queued' state, for callers that hand the ids out (the
        HTTP API); connectors skip it, and their invocations' state starts at dispatch.
        ``caller`` (a token id) may then read that state."""
        routes = self._router.routes
        traceparent, tracestate = trace.traceparent, trace.tracestate
        invocations: list[Invocation] = []
        starts: list[tuple[Event, Route]] = []  # (event, flow binding): runs to start
        collect: list[tuple[Event, Route]] = []  # (event, dependency of a combination)
        unrouted = 0
        for event in events:
            matched = routes.match(source, event)
            if not matched:
                unrouted += 1
            for route in matched:
                if route.combo is not None:
                    collect.append((event, route))
                    continue
                if route.flow is not None:
                    starts.append((event, route))
                    continue
                inv_id = event_invocation_id(event, route.binding)
                key = event.attributes.get("partitionkey", "") if route.ordered else None
                # One key's events stay on one version (keys hashed per function).
                choice = routes.choose(
                    route.function,
                    route.selector,
                    inv_id if key is None else f"{route.function}\x00{key}",
                )
                invocations.append(
                    Invocation(
                        id=inv_id,
                        function=route.function,
                        event=event,
                        binding=route.binding,
                        traceparent=traceparent or new_traceparent(),
                        tracestate=tracestate,
                        held=route.paused,
                        ordering_key=key,
                        version=choice.version,
                        alias=choice.alias,
                    )
                )
        self._events_in(source).inc(len(events))
        if unrouted:
            self._metrics.events_unrouted.labels(source).inc(unrouted)
        if collect and self._combiner is not None:
            # Stored (PostgreSQL) before anything is published: a combination that fires
            # is one more (event, binding) pair.
            for combined, route in await self._combiner.collect(collect, routes):
                if route.flow is not None:
                    starts.append((combined, route))
                else:
                    invocations.append(_combined_invocation(routes, combined, route, trace))
        first_steps: list[Invocation] = []
        if starts and self._flows is not None:
            # The runs are made (PostgreSQL) before their first steps are published.
            first_steps = await self._flows.start(starts, traceparent, tracestate)
            invocations.extend(first_steps)
        if invocations:
            try:
                await self._queue.publish_all(invocations, reserve=INGRESS_RESERVE)
            except MessageTooLarge as exc:
                if first_steps and self._flows is not None:  # none published: runs fail
                    await self._flows.abandon(first_steps, f"refused: {exc.detail}")
                raise
            if record_queued:
                await self._state.queued(
                    [(i.id, i.function, i.version) for i in invocations], owner=caller
                )
            # One metric update per function, not per invocation (a hot path for sources).
            if len(invocations) == 1:
                self._enqueued(invocations[0].function).inc()
            else:
                for function, count in Counter(i.function for i in invocations).items():
                    self._enqueued(function).inc(count)
        return invocations

    async def enqueue(self, invocation: Invocation) -> bool:
        """One prepared invocation (a replay, a re-send), durably; False if a duplicate."""
        return await self._queue.publish(invocation)

    async def above_high_water(self, source: str, limit: int) -> bool:
        """Whether a function bound to ``source`` has ``limit`` or more invocations waiting
        (every function's depth, cached for a second: a busy webhook costs one lookup a second)."""
        now = time.monotonic()
        if now - self._depths[0] > _DEPTH_TTL:
            self._depths = (now, await self._queue.depths())
        depths = self._depths[1]
        return any(
            depths.get(route.function, 0) >= limit
            for route in self._router.routes.bindings_of(source)
        )

    async def invoke(
        self,
        function: str,
        data: bytes,
        content_type: str | None,
        *,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
        trace: Trace = Trace(),
        caller: str | None = None,
    ) -> Invocation:
        """Enqueue one invocation of ``function`` (``f``, ``f:version`` or ``f:alias``).
        ``caller`` (a token id) owns it: its ``idempotency_key`` is scoped to that caller, and
        only it may read the state."""
        target = Target.parse(function)
        function = target.function
        routes = self._router.routes
        if function not in routes.functions:
            raise NotFound(f"Function '{function}' does not exist")
        if target.selector is not None and target.selector not in names(routes.functions[function]):
            raise NotFound(f"Function '{function}' has no version or alias '{target.selector}'")
        inv_id = (
            keyed_invocation_id(function, idempotency_key, caller or "")
            if idempotency_key
            else str(uuid.uuid4())
        )
        if idempotency_key and await self._state.exists(inv_id):
            # Seen within state_ttl: JetStream's own window is shorter, so answer from here.
            return Invocation(id=inv_id, function=function, event=Event({}, b""))
        attributes = {
            "specversion": "1.0",
            "id": inv_id,
            "source": INVOKE_SOURCE,
            "type": INVOKE_TYPE,
            "subject": function,
            "time": now_rfc3339(),
        }
        if content_type:
            attributes["datacontenttype"] = content_type
        choice = routes.choose(function, target.selector, inv_id)
        invocation = Invocation(
            id=inv_id,
            function=function,
            event=Event(attributes, data),
            callback_url=callback_url,
            traceparent=trace.traceparent or new_traceparent(),
            tracestate=trace.tracestate,
            version=choice.version,
            alias=choice.alias,
        )
        self._events_in("invoke").inc()
        await self._queue.publish(invocation, reserve=INGRESS_RESERVE)
        await self._state.queued([(inv_id, function, choice.version)], owner=caller)
        self._enqueued(function).inc()
        return invocation


def _combined_invocation(routes: Routes, event: Event, route: Route, trace: Trace) -> Invocation:
    """The invocation of a combination that fired: its id derives from the combination."""
    inv_id = event_invocation_id(event, route.binding)
    choice = routes.choose(route.function, route.selector, inv_id)
    return Invocation(
        id=inv_id,
        function=route.function,
        event=event,
        binding=route.binding,
        traceparent=trace.traceparent or new_traceparent(),
        tracestate=trace.tracestate,
        held=route.paused,
        version=choice.version,
        alias=choice.alias,
    )
