"""Runs flows on the hub's queue: each step is an ordinary invocation of its function.

A step's invocation (a parallel step: each branch's) carries the run in NATS headers (see
:class:`~eventhub.invocations.FlowContext`), so the function's limits, retries, versions, dead
letters and statistics apply as to any invocation. This engine is called at three moments:

- :meth:`FlowEngine.start`, by ingress, for an event a flow binding matched: the run's row is
  made (its id derives from the event and the binding) and the first step's invocations are
  returned, for ingress to publish with the rest of the request (PubAck before 202).
- :meth:`FlowEngine.succeeded`, by the dispatcher, when a step's invocation succeeded and
  before its message is acknowledged: the result is recorded, the run advanced (choice steps
  evaluated there and then) and the next step's invocations published.
- :meth:`FlowEngine.failed`, when a step's invocation finally failed, once its dead letter is
  stored and before the ack: the run fails (a branch of an ``onBranchFailure: continue`` step
  counts as over instead, its error in the join).

Each of them is one PostgreSQL transaction, the run's row locked first (a parallel step's join
is decided under that lock: the last branch to finish goes on), then the publishes. Every id
derives from (run, seq, branch) and every write is idempotent, so a crash anywhere is repaired
by the redelivery: it records nothing twice and publishes again only the invocations of steps
still running, which JetStream deduplicates. A step whose invocation cannot be published
(JetStream away) raises, and the dispatcher hands its message back.

A run reads its flow as it is now (a changed flow applies to runs under way; a deleted one, or a
step gone from it, fails them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from eventhub.errors import MessageTooLarge
from eventhub.events import Event
from eventhub.flows import store
from eventhub.flows.plan import JSON, Next, Payload, advance, join
from eventhub.flows.spec import FlowSpec
from eventhub.flows.steps import Origin, run_id, step_invocation
from eventhub.flows.store import JOIN, Run, Settled, StepKey
from eventhub.invocations import FlowContext, Invocation
from eventhub.metrics import Metrics
from eventhub.queue import InvocationQueue

if TYPE_CHECKING:
    from eventhub.retry import Outcome
    from eventhub.routing import Route, Router

log = structlog.get_logger(__name__)


@dataclass
class _Changes:
    """What a transaction did, counted in the metrics once it is committed."""

    invocations: list[Invocation] = field(default_factory=list)
    steps: list[tuple[str, str, str]] = field(default_factory=list)  # (flow, step, status)
    runs: list[tuple[str, str]] = field(default_factory=list)  # (flow, status)


class FlowEngine:
    def __init__(self, pool: Any, router: Router, queue: InvocationQueue, metrics: Metrics) -> None:
        self._pool = pool
        self._router = router
        self._queue = queue
        self._metrics = metrics

    def _flows(self) -> Mapping[str, FlowSpec]:
        return self._router.routes.flows

    # -- the start of runs (ingress) --------------------------------------------------------

    async def start(
        self,
        starts: Sequence[tuple[Event, Route]],
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> list[Invocation]:
        """Make the runs of these (event, flow binding) pairs; returns their first steps'
        invocations, for the caller to publish. A run that exists already (its event came
        again) is left as it is: only its steps still running are returned again."""
        flows = self._flows()
        changes = _Changes()
        prepared: list[tuple[Run, Event, Route, Next]] = []
        for event, route in starts:
            spec = flows.get(route.flow or "")
            if spec is None or route.flow is None:
                continue
            run = Run(
                run_id(event, route.binding),
                route.flow,
                route.binding,
                "running",
                event.id,
                event.source,
            )
            payload = Payload(event.data, event.datacontenttype)
            prepared.append((run, event, route, advance(spec.plan, None, 0, payload)))
        if not prepared:
            return []
        async with self._pool.acquire() as conn, conn.transaction():
            for run, event, route, nxt in prepared:
                if await store.insert_run(conn, run, event.type):
                    changes.runs.append((run.flow, "started"))
                origin = Origin(event, traceparent, tracestate, held=route.paused)
                await self._enter(conn, run, nxt, origin, changes)
        self._count(changes)
        return changes.invocations

    async def abandon(self, invocations: Sequence[Invocation], error: str) -> None:
        """The first steps of these runs could not be published at all (a trigger event too
        large for one message): their runs fail."""
        changes = _Changes()
        async with self._pool.acquire() as conn, conn.transaction():
            for invocation in invocations:
                ctx = invocation.flow
                if ctx is not None and await store.finish_run(conn, ctx.run, "failed", error=error):
                    changes.runs.append((ctx.flow, "failed"))
        self._count(changes)

    # -- a step's outcome (dispatcher) ------------------------------------------------------

    async def succeeded(
        self,
        invocation: Invocation,
        outcome: Outcome,
        *,
        attempts: int,
        version: str,
        started_at: str | None,
    ) -> None:
        """Record the step's result, advance the run, publish what comes next."""
        ctx = invocation.flow
        assert ctx is not None  # noqa: S101 - called for flow steps only
        settled = Settled(
            "succeeded",
            version=version,
            attempts=attempts,
            started_at=_time(started_at),
            output=outcome.body if outcome.body is not None else None,
            output_type=_content_type(outcome.headers),
        )
        changes = _Changes()
        origin = Origin(None, invocation.traceparent, invocation.tracestate)
        async with self._pool.acquire() as conn, conn.transaction():
            await self._success(conn, invocation, ctx, settled, origin, changes)
        await self._publish(changes)

    async def _success(
        self,
        conn: Any,
        invocation: Invocation,
        ctx: FlowContext,
        settled: Settled,
        origin: Origin,
        changes: _Changes,
    ) -> None:
        run = await store.lock_run(conn, ctx.run)
        if run is None:
            log.warning("flow_run_missing", flow=ctx.flow, run=ctx.run, step=ctx.step)
            return
        old, recorded = await store.settle_step(
            conn, _key(ctx), settled, replay=bool(invocation.replay_of)
        )
        if old is None:
            log.warning("flow_step_missing", flow=ctx.flow, run=ctx.run, step=ctx.step)
            return
        if old != "succeeded":
            changes.steps.append((run.flow, ctx.step, "succeeded"))
        if await self._goes_on(conn, run, fresh=old != "succeeded"):
            payload = Payload(recorded.output or b"", recorded.output_type)
            await self._next(conn, run, ctx, payload, origin, changes)

    async def failed(
        self,
        invocation: Invocation,
        *,
        reason: str,
        error: str,
        dead_letter_id: str | None,
        attempts: int,
        version: str,
    ) -> None:
        """The step's invocation is a dead letter: the run fails, unless the step is a branch
        of a parallel step that goes on without it."""
        ctx = invocation.flow
        assert ctx is not None  # noqa: S101 - called for flow steps only
        spec = self._flows().get(ctx.flow)
        step = spec.plan.steps.get(ctx.step) if spec is not None else None
        going_on = ctx.branch is not None and step is not None and step.continues_on_failure
        settled = Settled(
            "failed",
            version=version,
            attempts=attempts,
            error=error,
            dead_letter_id=dead_letter_id,
            fails_run=not going_on,
        )
        changes = _Changes()
        origin = Origin(None, invocation.traceparent, invocation.tracestate)
        async with self._pool.acquire() as conn, conn.transaction():
            await self._failure(conn, invocation, ctx, settled, reason, origin, changes)
        await self._publish(changes)

    async def _failure(
        self,
        conn: Any,
        invocation: Invocation,
        ctx: FlowContext,
        settled: Settled,
        reason: str,
        origin: Origin,
        changes: _Changes,
    ) -> None:
        run = await store.lock_run(conn, ctx.run)
        if run is None:
            log.warning("flow_run_missing", flow=ctx.flow, run=ctx.run, step=ctx.step)
            return
        old, _ = await store.settle_step(
            conn, _key(ctx), settled, replay=bool(invocation.replay_of)
        )
        if old in (None, "succeeded"):
            return  # unknown, or a success recorded before stays
        if old == "running":
            changes.steps.append((run.flow, ctx.step, "failed"))
        if not settled.fails_run:  # a branch the parallel step goes on without
            if run.status == "running":
                await self._next(conn, run, ctx, Payload(b""), origin, changes)
            return
        if ctx.branch is not None:
            failed = f"branch {ctx.branch} failed"
            await store.settle_join(conn, StepKey(run.id, ctx.seq, JOIN), "failed", None, failed)
        message = f"step '{ctx.step}' failed ({reason}): {settled.error}"
        await self._fail(conn, run, message, changes)

    # -- advancing --------------------------------------------------------------------------

    async def _goes_on(self, conn: Any, run: Run, *, fresh: bool) -> bool:
        """Whether a run goes on after a step's success: not once it ended, nor while another
        step's failure holds it failed. A failed run whose every failed step has now
        succeeded (replayed) runs again."""
        if run.status == "running":
            return True
        if run.status == "succeeded" or not fresh:
            return False
        if await store.blocking_failures(conn, run.id):
            return False
        await store.revive_run(conn, run.id)
        log.info("flow_run_resumed", flow=run.flow, run=run.id)
        return True

    async def _next(
        self,
        conn: Any,
        run: Run,
        ctx: FlowContext,
        payload: Payload,
        origin: Origin,
        changes: _Changes,
    ) -> None:
        """After step ``ctx`` (its result ``payload``): a branch waits for the others (the last
        one joins them); then the run enters its next step."""
        spec = self._flows().get(run.flow)
        if spec is None or ctx.step not in spec.plan.steps:
            gone = f"flow '{run.flow}' was deleted" if spec is None else "a changed flow"
            error = f"step '{ctx.step}' is no longer in the flow ({gone})"
            await self._fail(conn, run, error, changes)
            return
        if ctx.branch is not None:
            joined = await self._join(conn, run, ctx.seq)
            if joined is None:
                return  # other branches are still running
            payload = joined
        nxt = advance(spec.plan, ctx.step, ctx.seq + 1, payload)
        await self._enter(conn, run, nxt, origin, changes)

    async def _join(self, conn: Any, run: Run, seq: int) -> Payload | None:
        """Every branch's result, in the order declared, once none is running; a branch that
        failed (``onBranchFailure: continue``) is ``{"error": ..., "deadLetterId": ...}``.
        Decided once: a join recorded before is the join (a branch replayed since changes
        nothing the run already went on with)."""
        before = await store.joined(conn, run.id, seq)
        if before is not None:
            return Payload(before, JSON)
        rows = await store.branches(conn, run.id, seq)
        if any(row.status == "running" for row in rows):
            return None
        results: list[object] = [
            Payload(row.output or b"", row.output_type).value()
            if row.status == "succeeded"
            else {"error": row.error, "deadLetterId": row.dead_letter_id}
            for row in rows
        ]
        payload = join(results)
        await store.settle_join(conn, StepKey(run.id, seq, JOIN), "succeeded", payload.body)
        return payload

    async def _enter(
        self, conn: Any, run: Run, nxt: Next, origin: Origin, changes: _Changes
    ) -> None:
        """Record what ``advance`` decided: choices made, then the end of the run, its failure,
        or the step it enters (whose invocations, while it runs, are to be published)."""
        for chosen in nxt.chosen:
            key = StepKey(run.id, chosen.seq, JOIN)
            if await store.note_choice(conn, key, chosen.step, chosen.next):
                status = "succeeded" if chosen.next is not None else "failed"
                changes.steps.append((run.flow, chosen.step, status))
        if nxt.error is not None:
            await self._fail(conn, run, nxt.error, changes)
            return
        if nxt.output is not None:
            output = store.excerpt_of(nxt.output.body)
            if await store.finish_run(conn, run.id, "succeeded", output=output):
                changes.runs.append((run.flow, "succeeded"))
                log.info("flow_run_succeeded", flow=run.flow, run=run.id)
            return
        assert nxt.step is not None and nxt.kind is not None  # noqa: S101 - set with tasks
        spec = self._flows()[run.flow]
        timeout = spec.plan.steps[nxt.step].timeout
        if nxt.kind == "parallel":
            await store.enter_step(conn, StepKey(run.id, nxt.seq, JOIN), nxt.step, "parallel", None)
        for task in nxt.tasks:
            branch = JOIN if task.branch is None else task.branch
            kind = "function" if task.branch is None else "branch"
            status = await store.enter_step(
                conn, StepKey(run.id, task.seq, branch), task.step, kind, task.target
            )
            if status == "running":
                invocation = step_invocation(run, task, origin, timeout)
                changes.invocations.append(self._router.routes.aim(invocation))

    async def _fail(self, conn: Any, run: Run, error: str, changes: _Changes) -> None:
        if await store.finish_run(conn, run.id, "failed", error=error):
            changes.runs.append((run.flow, "failed"))
            log.warning("flow_run_failed", flow=run.flow, run=run.id, error=error)

    # -- after the transaction --------------------------------------------------------------

    async def _publish(self, changes: _Changes) -> None:
        """Publish the next step's invocations (PubAck) before the caller acks its message.
        An input too large for one message can never be sent: the run fails instead."""
        self._count(changes)
        if not changes.invocations:
            return
        try:
            await self._queue.publish_all(changes.invocations)
        except MessageTooLarge as exc:
            first = changes.invocations[0]
            step = first.flow.step if first.flow is not None else "?"
            await self.abandon(
                changes.invocations, f"the input of step '{step}' is too large: {exc.detail}"
            )

    def _count(self, changes: _Changes) -> None:
        for flow, step, status in changes.steps:
            self._metrics.flow_steps.labels(flow, step, status).inc()
        for flow, status in changes.runs:
            self._metrics.flow_runs.labels(flow, status).inc()
        changes.steps.clear()
        changes.runs.clear()


def _key(ctx: FlowContext) -> StepKey:
    return StepKey(ctx.run, ctx.seq, JOIN if ctx.branch is None else ctx.branch)


def _content_type(headers: Mapping[str, str] | None) -> str | None:
    if not headers:
        return None
    return next((v for k, v in headers.items() if k.lower() == "content-type"), None)


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
