"""Rollouts in PostgreSQL (table ``rollouts``): created, listed, paused, resumed and aborted by
operators; advanced, promoted and rolled back by the driver (:mod:`eventhub.rollout.driver`).

Every change of a rollout's weight or state is written with ``NOTIFY <namespace>_resources``
in the same transaction, so every hub process's router reloads and reads the alias weights in
force through :meth:`Rollouts.overrides`. At most one rollout is running or paused per alias: a
partial unique index says so, and a second one is refused (409).

A change made by the driver is guarded by its lease and by ``state = 'running'``, one made by an
operator by the state it expects: whichever lands second changes nothing, and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg
import orjson
import structlog

from eventhub.errors import Conflict, InvalidInput, NotFound
from eventhub.metrics import Metrics
from eventhub.resources import Kind
from eventhub.rollout.judge import Analysis, Sample
from eventhub.rollout.plan import OnRollback, Plan, Request, plan
from eventhub.stats import Stats
from eventhub.store import ResourceStore
from eventhub.versions import Overrides, Weights, Withdrawal

log = structlog.get_logger(__name__)

State = Literal["running", "paused", "promoted", "rolled-back", "aborted"]
STATES: tuple[State, ...] = ("running", "paused", "promoted", "rolled-back", "aborted")
ACTIVE: tuple[State, ...] = ("running", "paused")
_FIGURES_TIMEOUT = 3.0
_COLUMNS = (
    "id, function, alias, stable, canary, steps, interval_s, max_error_rate, max_latency_ratio,"
    " min_calls, on_rollback, state, step, weight, step_started_at, reason, history,"
    " created_at, updated_at"
)


def iso(when: datetime | float) -> str:
    if not isinstance(when, datetime):
        when = datetime.fromtimestamp(when, UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Rollout:
    """One rollout as stored. Times are unix seconds (the clock the statistics use)."""

    id: str
    function: str
    alias: str
    stable: str
    canary: str
    steps: tuple[int, ...]
    interval: float
    analysis: Analysis
    on_rollback: OnRollback
    state: State
    step: int
    weight: int
    step_started_at: float
    reason: str | None
    history: tuple[dict[str, Any], ...]
    created_at: float
    updated_at: float

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Rollout:
        return cls(
            id=str(row["id"]),
            function=row["function"],
            alias=row["alias"],
            stable=row["stable"],
            canary=row["canary"],
            steps=tuple(row["steps"]),
            interval=float(row["interval_s"]),
            analysis=Analysis(
                float(row["max_error_rate"]),
                float(row["max_latency_ratio"]),
                int(row["min_calls"]),
            ),
            on_rollback=row["on_rollback"],
            state=row["state"],
            step=int(row["step"]),
            weight=int(row["weight"]),
            step_started_at=row["step_started_at"].timestamp(),
            reason=row["reason"],
            history=tuple(orjson.loads(row["history"])),
            created_at=row["created_at"].timestamp(),
            updated_at=row["updated_at"].timestamp(),
        )

    @property
    def weights(self) -> Weights:
        """The alias's weights while it runs: the stable version first, so that a growing
        canary only takes keys from it (see :func:`eventhub.versions.pick`)."""
        return ((self.stable, 100 - self.weight), (self.canary, self.weight))

    def document(self) -> dict[str, Any]:
        """What the API and the CLI show (the shape of ``Rollout`` in /openapi.json)."""
        return {
            "id": self.id,
            "function": self.function,
            "alias": self.alias,
            "stable": self.stable,
            "canary": self.canary,
            "steps": list(self.steps),
            "interval": self.interval,
            "analysis": self.analysis.to_json(),
            "onRollback": self.on_rollback,
            "state": self.state,
            "step": self.step,
            "weight": self.weight,
            "stepStartedAt": iso(self.step_started_at),
            "reason": self.reason,
            "history": list(self.history),
            "createdAt": iso(self.created_at),
            "updatedAt": iso(self.updated_at),
        }


def entry(
    rollout: Rollout,
    now: float,
    verdict: str,
    reason: str | None,
    canary: Sample | None,
    stable: Sample | None,
    baseline: str | None = None,
) -> dict[str, Any]:
    """One item of a rollout's history: how its current step ended, with the figures."""
    return {
        "step": rollout.step,
        "weight": rollout.weight,
        "startedAt": iso(rollout.step_started_at),
        "endedAt": iso(now),
        "verdict": verdict,
        "canary": None if canary is None else canary.to_json(),
        "stable": None if stable is None else stable.to_json(),
        "baseline": baseline,
        "reason": reason,
    }


class Rollouts:
    """The rollouts of one namespace. ``stats`` gives the figures of a step ended by an
    operator (pause, abort); ``metrics`` gets the weights in force at each reload."""

    def __init__(
        self,
        pool: Any,
        resources: ResourceStore,
        stats: Stats | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pool = pool
        self._resources = resources
        self._channel = resources.channel  # every router reloads on it
        self._stats = stats
        self._metrics = metrics
        self.clock = clock

    # Operators.

    async def start(self, function: str, request: Request) -> Rollout:
        """A rollout of ``request`` on ``function`` as stored now (NotFound, InvalidInput
        naming the field, Conflict while another one runs on the alias)."""
        resource = await self._resources.get(Kind.FUNCTION, function)
        return await self.create(plan(function, resource.model, request))

    async def create(self, plan: Plan) -> Rollout:
        """Start ``plan``: the canary takes its first step's weight at once."""
        r = plan.request
        rollout_id = str(uuid.uuid4())
        now = datetime.fromtimestamp(self.clock(), UTC)
        async with self._pool.acquire() as conn, conn.transaction():
            try:
                await conn.execute(
                    "insert into rollouts (id, function, alias, stable, canary, steps, interval_s,"
                    " max_error_rate, max_latency_ratio, min_calls, on_rollback, weight,"
                    " step_started_at, created_at, updated_at)"
                    " values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13, $13)",
                    rollout_id,
                    plan.function,
                    r.alias,
                    plan.stable,
                    r.to,
                    list(r.steps),
                    r.interval,
                    r.analysis.max_error_rate,
                    r.analysis.max_latency_ratio,
                    r.analysis.min_calls,
                    r.on_rollback,
                    r.steps[0],
                    now,
                )
            except asyncpg.UniqueViolationError:
                raise Conflict(
                    f"alias '{r.alias}' of Function '{plan.function}' already has a running or"
                    " paused rollout: abort it first"
                ) from None
            await self._notify(conn, rollout_id)
        log.info(
            "rollout_started",
            rollout=rollout_id,
            function=plan.function,
            alias=r.alias,
            stable=plan.stable,
            canary=r.to,
        )
        return await self.get(rollout_id)

    async def get(self, rollout_id: str) -> Rollout:
        try:
            key = str(uuid.UUID(rollout_id))
        except ValueError:
            raise NotFound(f"rollout '{rollout_id[:60]}' does not exist") from None
        row = await self._pool.fetchrow(
            f"select {_COLUMNS} from rollouts where id = $1::uuid",  # noqa: S608 - constants
            key,
        )
        if row is None:
            raise NotFound(f"rollout '{rollout_id}' does not exist")
        return Rollout.of(row)

    async def resolve(self, text: str) -> Rollout:
        """A rollout by id, or by the start of its id if only one has it (for the CLI)."""
        with contextlib.suppress(ValueError):
            return await self.get(str(uuid.UUID(text)))
        if len(text) < 4 or any(c not in "0123456789abcdef-" for c in text.lower()):
            raise NotFound(f"rollout '{text[:60]}' does not exist")
        rows = await self._pool.fetch(
            f"select {_COLUMNS} from rollouts where id::text like $1 limit 2",  # noqa: S608
            text.lower() + "%",
        )
        if not rows:
            raise NotFound(f"rollout '{text}' does not exist")
        if len(rows) > 1:
            raise InvalidInput(f"'{text}' is the start of several rollout ids: give more of it")
        return Rollout.of(rows[0])

    async def listing(
        self, function: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[Rollout]:
        """Newest first."""
        rows = await self._pool.fetch(
            f"select {_COLUMNS} from rollouts"  # noqa: S608 - constants
            " where ($1::text is null or function = $1) and ($2::text is null or state = $2)"
            " order by created_at desc, id limit $3",
            function,
            state,
            limit,
        )
        return [Rollout.of(r) for r in rows]

    async def pause(self, rollout_id: str) -> Rollout:
        """Hold the canary's weight where it is; nothing is judged until resumed, when the
        step starts over."""
        rollout = await self.get(rollout_id)
        note = await self._ended_here(rollout, "paused", "paused by an operator")
        return await self._operate(
            rollout,
            ("running",),
            "paused",
            "state = 'paused', history = history || $2::jsonb",
            [orjson.dumps([note]).decode()],
        )

    async def resume(self, rollout_id: str) -> Rollout:
        rollout = await self.get(rollout_id)
        now = datetime.fromtimestamp(self.clock(), UTC)
        return await self._operate(
            rollout, ("paused",), "resumed", "state = 'running', step_started_at = $2", [now]
        )

    async def abort(self, rollout_id: str, reason: str | None = None) -> Rollout:
        """Stop it: the alias goes back to the stable version alone. Invocations already
        queued for the canary stay with it (only a rollback withdraws them)."""
        rollout = await self.get(rollout_id)
        why = reason or "aborted by an operator"
        note = await self._ended_here(rollout, "aborted", why)
        return await self._operate(
            rollout,
            ACTIVE,
            "aborted",
            "state = 'aborted', weight = 0, reason = $3, history = history || $2::jsonb",
            [orjson.dumps([note]).decode(), why],
        )

    async def _operate(
        self,
        rollout: Rollout,
        expected: tuple[State, ...],
        verb: str,
        assignments: str,
        args: list[Any],
    ) -> Rollout:
        async with self._pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                f"update rollouts set {assignments}, updated_at = now()"  # noqa: S608
                f" where id = $1 and state = any(${len(args) + 2}::text[])",
                rollout.id,
                *args,
                list(expected),
            )
            if status.endswith(" 0"):
                now = await self.get(rollout.id)
                raise Conflict(
                    f"rollout {rollout.id} is {now.state}: only a"
                    f" {' or '.join(expected)} rollout can be {verb}"
                )
            await self._notify(conn, rollout.id)
        log.info(f"rollout_{verb}", rollout=rollout.id, function=rollout.function)
        return await self.get(rollout.id)

    async def _ended_here(self, rollout: Rollout, verdict: str, reason: str) -> dict[str, Any]:
        """The history item of a step an operator ends, with the figures so far when the
        statistics can be read (a history item without them beats a refused pause)."""
        now = self.clock()
        canary = stable = None
        if self._stats is not None and rollout.state == "running":
            try:
                async with asyncio.timeout(_FIGURES_TIMEOUT):
                    window = await self._stats.window(
                        rollout.function, rollout.step_started_at, now + 1
                    )
                canary = Sample.of(window.get(rollout.canary))
                stable = Sample.of(window.get(rollout.stable))
            except Exception as exc:  # Redis away: the step ends all the same
                log.warning("rollout_figures_unavailable", error=str(exc) or repr(exc))
        return entry(rollout, now, verdict, reason, canary, stable)

    # What every router reads.

    async def overrides(self) -> Overrides:
        """The alias weights in force (running and paused rollouts) and the withdrawn canaries
        (the latest rollout of an alias, rolled back), for :class:`eventhub.routing.Router`."""
        rows = await self._pool.fetch(
            "select distinct on (function, alias) id, function, alias, stable, canary, state,"
            " weight, on_rollback from rollouts order by function, alias, created_at desc"
        )
        weights: dict[tuple[str, str], Weights] = {}
        withdrawn: dict[tuple[str, str, str], Withdrawal] = {}
        for row in rows:
            function, alias, state = row["function"], row["alias"], row["state"]
            stable, canary, weight = row["stable"], row["canary"], int(row["weight"])
            if state in ACTIVE:
                weights[function, alias] = ((stable, 100 - weight), (canary, weight))
            elif state == "rolled-back":
                withdrawn[function, alias, canary] = Withdrawal(
                    row["on_rollback"], stable, str(row["id"])
                )
            if self._metrics is not None:
                canary_weight = 100 if state == "promoted" else weight if state in ACTIVE else 0
                gauge = self._metrics.rollout_weight
                gauge.labels(function, alias, stable).set(100 - canary_weight)
                gauge.labels(function, alias, canary).set(canary_weight)
        return Overrides(weights, withdrawn)

    # The driver.

    async def claim(self, owner: str, lease: float) -> list[Rollout]:
        """The running rollouts whose lease is free, lapsed or already ``owner``'s, now
        ``owner``'s for ``lease`` seconds more."""
        rows = await self._pool.fetch(
            f"update rollouts set lease_owner = $1,"  # noqa: S608 - constants
            " lease_until = now() + make_interval(secs => $2)"
            " where state = 'running'"
            " and (lease_until is null or lease_until < now() or lease_owner = $1)"
            f" returning {_COLUMNS}",
            owner,
            lease,
        )
        return [Rollout.of(r) for r in rows]

    async def release(self, owner: str) -> None:
        """Give up ``owner``'s leases (on stop), so another process takes over at once."""
        await self._pool.execute(
            "update rollouts set lease_owner = null, lease_until = null where lease_owner = $1",
            owner,
        )

    async def advance(self, rollout: Rollout, owner: str, note: dict[str, Any], at: float) -> bool:
        """The step held: on to the next weight. False if the rollout is no longer ``owner``'s
        to drive (paused, aborted, taken over)."""
        step = rollout.step + 1
        return await self._drive(
            rollout,
            owner,
            "step = $3, weight = $4, step_started_at = $5, history = history || $6::jsonb",
            [step, rollout.steps[step], datetime.fromtimestamp(at, UTC), _items(note)],
        )

    async def finish(
        self,
        rollout: Rollout,
        owner: str,
        state: State,
        reason: str | None,
        note: dict[str, Any] | None,
        conn: Any = None,
    ) -> bool:
        """End it (promoted, rolled back, aborted); ``conn``: inside that transaction."""
        weight = 100 if state == "promoted" else 0
        return await self._drive(
            rollout,
            owner,
            "state = $3, weight = $4, reason = $5, history = history || $6::jsonb",
            [state, weight, reason, _items(note)],
            conn,
        )

    async def _drive(
        self, rollout: Rollout, owner: str, assignments: str, args: list[Any], conn: Any = None
    ) -> bool:
        if conn is None:
            async with self._pool.acquire() as own, own.transaction():
                return await self._drive(rollout, owner, assignments, args, own)
        status = await conn.execute(
            f"update rollouts set {assignments}, updated_at = now()"  # noqa: S608
            " where id = $1 and lease_owner = $2 and state = 'running'",
            rollout.id,
            owner,
            *args,
        )
        if status.endswith(" 0"):
            return False
        await self._notify(conn, rollout.id)
        return True

    @contextlib.asynccontextmanager
    async def locked(self, rollout: Rollout, owner: str) -> Any:
        """A transaction holding the rollout's row, yielded only while it is still running
        and ``owner``'s (None otherwise): an operator's pause or abort waits until it ends."""
        async with self._pool.acquire() as conn, conn.transaction():
            state = await conn.fetchval(
                "select state from rollouts where id = $1 and lease_owner = $2 for update",
                rollout.id,
                owner,
            )
            yield conn if state == "running" else None

    async def _notify(self, conn: Any, rollout_id: str) -> None:
        await conn.execute("select pg_notify($1, $2)", self._channel, f"Rollout/{rollout_id}")


def _items(note: dict[str, Any] | None) -> str:
    return orjson.dumps([note] if note is not None else []).decode()


def state_of(text: str) -> State:
    if text not in STATES:
        raise InvalidInput(f"state: must be one of {', '.join(STATES)}")
    return text
