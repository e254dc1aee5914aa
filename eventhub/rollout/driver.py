"""The rollout driver: judges running rollouts about once a second, and moves them on.

Every dispatch process runs one. A running rollout is driven by one process at a time, the one
holding its lease (renewed each round, ``LEASE`` seconds long): a process that stops gives its
leases back, so the next one takes over at once; one that is killed loses them when they lapse.
Each round, for each rollout it holds, the driver:

1. checks the Function as stored: the alias must still point at the stable version alone and
   both versions must still exist (else the rollout is aborted, saying what changed; an alias
   pointed at the canary alone means promoted, which also finishes a promotion cut short);
2. reads the step's window from the statistics of every hub process and judges it
   (:mod:`eventhub.rollout.judge`);
3. on ``held``: the next step's weight, or, after the last step, promotion: the stored alias is
   changed to name the canary (through the resource store, so every process and ``eventhub get``
   see it), then the rollout is marked promoted, in the same transaction as a row lock that keeps
   an operator's pause or abort waiting meanwhile; on ``broke``: rolled back, weight 0 at once,
   the canary withdrawn from the alias (see :meth:`eventhub.rollout.store.Rollouts.overrides`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Literal

import structlog

from eventhub.errors import EventhubError, NotFound
from eventhub.resources import Kind, parse_resource
from eventhub.rollout.judge import Sample, judge, needs_baseline
from eventhub.rollout.store import Rollout, Rollouts, State, entry
from eventhub.stats import Stats
from eventhub.store import InvalidResource, ResourceStore
from eventhub.versions import names

log = structlog.get_logger(__name__)
ROUND = 1.0  # statistics are flushed about once a second
LEASE = 15.0


class RolloutDriver:
    def __init__(
        self,
        *,
        rollouts: Rollouts,
        store: ResourceStore,
        stats: Stats,
        owner: str,
        every: float = ROUND,
        lease: float = LEASE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._rollouts = rollouts
        self._store = store
        self._stats = stats
        self._owner = owner
        self._every = every
        self._lease = lease
        self._clock = clock
        self._failing = False

    async def run(self) -> None:
        """Until cancelled; then the leases held are given back."""
        try:
            while True:
                await self._round_logged()
                await asyncio.sleep(self._every)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._rollouts.release(self._owner))

    async def _round_logged(self) -> None:
        try:
            await self.round()
        except Exception as exc:  # PostgreSQL away: the next round tries again
            if not self._failing:
                log.warning("rollout_round_failed", error=str(exc) or repr(exc))
            self._failing = True
            return
        if self._failing:
            log.info("rollout_round_recovered")
            self._failing = False

    async def round(self) -> None:
        """Judge each running rollout this process holds (or can take) once."""
        for rollout in await self._rollouts.claim(self._owner, self._lease):
            try:
                await self._tick(rollout)
            except EventhubError as exc:  # Redis away, say: this rollout waits, others go on
                log.warning("rollout_tick_failed", rollout=rollout.id, error=exc.detail)

    async def _tick(self, rollout: Rollout) -> None:
        changed = await self._changed_alias(rollout)
        if changed == "wait":
            return
        if isinstance(changed, tuple):
            state, reason = changed
            if await self._rollouts.finish(rollout, self._owner, state, reason, None):
                log.warning("rollout_ended", rollout=rollout.id, state=state, reason=reason)
            return
        now = self._clock()
        window = await self._stats.window(rollout.function, rollout.step_started_at, now + 1)
        canary = Sample.of(window.get(rollout.canary))
        stable = Sample.of(window.get(rollout.stable))
        since_start = None
        if needs_baseline(rollout.analysis, stable):
            began = await self._stats.window(rollout.function, rollout.created_at, now + 1)
            since_start = Sample.of(began.get(rollout.stable))
        verdict = judge(
            rollout.analysis,
            canary=canary,
            stable=stable,
            stable_since_start=since_start,
            elapsed=now - rollout.step_started_at >= rollout.interval,
        )
        if verdict.outcome == "pending":
            return
        compared = verdict.stable or stable  # an error rate breaks without comparing latency
        note = entry(
            rollout, now, verdict.outcome, verdict.reason, canary, compared, verdict.baseline
        )
        bound = log.bind(rollout=rollout.id, function=rollout.function, step=rollout.step)
        if verdict.outcome == "broke":
            if await self._rollouts.finish(
                rollout, self._owner, "rolled-back", verdict.reason, note
            ):
                bound.warning("rollout_rolled_back", reason=verdict.reason)
        elif rollout.step + 1 < len(rollout.steps):
            if await self._rollouts.advance(rollout, self._owner, note, now):
                bound.info("rollout_step_held", weight=rollout.steps[rollout.step + 1])
        else:
            await self._promote(rollout, note)

    async def _promote(self, rollout: Rollout, note: dict[str, Any]) -> None:
        async with self._rollouts.locked(rollout, self._owner) as conn:
            if conn is None:
                return  # paused, aborted or taken over meanwhile
            state: State = "promoted"
            reason = None
            try:
                await self._point_alias(rollout)
            except EventhubError as exc:  # the Function changed under us: said, not retried
                state, reason = "aborted", f"the promotion failed: {exc.detail}"
            await self._rollouts.finish(rollout, self._owner, state, reason, note, conn)
        log.info("rollout_" + state, rollout=rollout.id, function=rollout.function, reason=reason)

    async def _point_alias(self, rollout: Rollout) -> None:
        """The stored Function's alias, now naming the canary alone: a resource update like
        any other (validated, announced to every process)."""
        stored = await self._store.get(Kind.FUNCTION, rollout.function)
        doc = stored.document()
        spec = dict(doc["spec"])
        spec["aliases"] = {**(spec.get("aliases") or {}), rollout.alias: rollout.canary}
        doc["spec"] = spec
        await self._store.put(parse_resource(doc, "rollout", kind=Kind.FUNCTION))

    async def _changed_alias(self, rollout: Rollout) -> tuple[State, str] | Literal["wait"] | None:
        """None when the stored Function is as the rollout needs it; ``"wait"`` when it is
        stored but invalid (routing skips it too); else how the rollout ends, and why."""
        try:
            stored = await self._store.lookup(Kind.FUNCTION, rollout.function)
        except NotFound:
            return "aborted", f"Function '{rollout.function}' was deleted"
        if isinstance(stored, InvalidResource):
            return "wait"
        spec = stored.model
        value = spec.aliases.get(rollout.alias)
        if value is None:
            return "aborted", f"alias '{rollout.alias}' was removed"
        pointed = {value} if isinstance(value, str) else {v for v, w in value.items() if w > 0}
        if pointed == {rollout.canary}:
            return "promoted", f"alias '{rollout.alias}' already points at '{rollout.canary}'"
        if pointed != {rollout.stable}:
            return "aborted", f"alias '{rollout.alias}' was changed to {value}"
        missing = {rollout.stable, rollout.canary} - names(spec)
        if missing:
            return "aborted", f"version '{sorted(missing)[0]}' was removed"
        return None
