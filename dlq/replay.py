"""Replay: dead letters sent back to their function (or another one) as new invocations.

A replay is a job (``replay_jobs``) over a snapshot of dead letters taken when it is created
(``replay_items``, oldest first). Whichever hub process holds the job's lease publishes them at
the job's rate, so a replay of thousands cannot become a new peak, and a job left by a stopped or
killed process is taken over once its lease expires: items already published are not published
again, and a re-publish after a crash is deduplicated by JetStream (the invocation id comes from
the dead letter and the job).

Each replayed event keeps its CloudEvent id, source and data and gains the extensions
``eventhubreplay`` (the job id) and ``eventhubreplaycount`` (how many times this dead letter was
replayed). It is a new invocation with a fresh retry budget, linked to its dead letter: success
marks the dead letter ``resolved``; failure appends the new attempts to the same dead letter. A
dead letter being replayed cannot be replayed again until that replay is over. A flow step's
dead letter keeps its run's context, and so does its replay: once it succeeds, the run goes on
from that step.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
import structlog

from dlq.store import (
    DeadLetterFilter,
    DeadLetterQuery,
    DeadLetterStore,
    event_of,
    flow_context_of,
    to_document,
)
from eventhub.errors import Conflict, FieldProblem, InvalidInput, NotFound
from eventhub.invocations import FlowContext, Invocation
from eventhub.resources import FunctionSpec
from eventhub.routing import Routes
from eventhub.versions import Target, names

log = structlog.get_logger(__name__)
_IDS = uuid.UUID("5c2f8a4e-0b7d-4f3a-9e61-7d2c9b1a0e55")
LEASE = 30.0
_BATCH = 100
_IDLE = 2.0
_JOB_COLUMNS = (
    "id, status, to_function, rate, total, processed, published, skipped, succeeded, failed,"
    " error, created_at, updated_at"
)


class Publisher(Protocol):
    async def publish(self, invocation: Invocation) -> bool: ...


@dataclass(frozen=True)
class ReplayPlan:
    which: DeadLetterFilter
    to: str | None
    rate: float  # dead letters per second


def replay_invocation_id(dl_id: str, job_id: str) -> str:
    return str(uuid.uuid5(_IDS, f"{dl_id}:{job_id}"))


def check_target(to: str, functions: Mapping[str, FunctionSpec]) -> None:
    """A replay's ``to`` must name a function, and a version or alias it has."""
    target = Target.parse(to)
    spec = functions.get(target.function)
    if spec is None:
        problem = f"Function '{target.function}' does not exist"
    elif target.selector is not None and target.selector not in names(spec):
        problem = f"Function '{target.function}' has no version or alias '{target.selector}'"
    else:
        return
    raise InvalidInput(f"to: {problem}", problems=(FieldProblem("to", problem),))


class ReplayJobs:
    def __init__(self, pool: Any, store: DeadLetterStore) -> None:
        self._pool = pool
        self._store = store

    async def preview(self, which: DeadLetterFilter) -> dict[str, Any]:
        count = await self._store.count(which)
        sample = await self._store.page(DeadLetterQuery(filter=which, limit=5))
        return {"count": count, "sample": sample}

    async def create(
        self, plan: ReplayPlan, functions: Mapping[str, FunctionSpec]
    ) -> dict[str, Any]:
        """Take the matching dead letters for a new job, at once: from here on they are
        ``replaying`` and no other replay can take them. ``plan.to`` may name a function, a
        version or an alias (``f``, ``f:v3``, ``f:prod``)."""
        if plan.to is not None:
            check_target(plan.to, functions)
        job_id = str(uuid.uuid4())
        args: list[object] = []
        where = plan.which.where(args)
        async with self._pool.acquire() as conn, conn.transaction():
            if plan.which.ids is not None:
                busy = await conn.fetch(
                    "select id from dead_letters where id = any($1::uuid[])"
                    " and status = 'replaying'",
                    list(plan.which.ids),
                )
                if busy:
                    ids = ", ".join(str(r["id"]) for r in busy)
                    raise Conflict(f"already being replayed: {ids}")
            await conn.execute(
                "insert into replay_jobs (id, to_function, rate, total) values ($1, $2, $3, 0)",
                job_id,
                plan.to,
                plan.rate,
            )
            n = len(args)
            job = f"${n + 1}::uuid"
            status = await conn.execute(
                f"with taken as (update dead_letters set status = 'replaying',"  # noqa: S608
                f" replay_job = {job}, replay_count = replay_count + 1, updated_at = now()"
                f" where {where} and status <> 'replaying' returning id, failed_at)"
                " insert into replay_items (job_id, seq, dead_letter_id)"
                f" select {job}, row_number() over (order by failed_at, id), id from taken",
                *args,
                job_id,
            )
            total = int(status.split()[-1])
            if total == 0:
                raise InvalidInput("no dead letter matches (or all are being replayed)")
            await conn.execute("update replay_jobs set total = $2 where id = $1", job_id, total)
        return await self.get(job_id)

    async def get(self, job_id: str) -> dict[str, Any]:
        try:
            row = await self._pool.fetchrow(
                f"select {_JOB_COLUMNS} from replay_jobs where id = $1::uuid",  # noqa: S608
                job_id,
            )
        except (ValueError, asyncpg.DataError):
            row = None
        if row is None:
            raise NotFound(f"replay job '{job_id}' does not exist")
        return job_document(row)

    async def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = await self._pool.fetch(
            f"select {_JOB_COLUMNS} from replay_jobs"  # noqa: S608 - constants
            " order by created_at desc limit $1",
            limit,
        )
        return [job_document(r) for r in rows]

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Stop a job; the dead letters it had not published yet are free again."""
        await self.get(job_id)
        async with self._pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                "update replay_jobs set status = 'cancelled', updated_at = now()"
                " where id = $1 and status in ('pending', 'running')",
                job_id,
            )
            if not status.endswith(" 0"):
                await release_pending(conn, job_id)
        return await self.get(job_id)


class ReplayRunner:
    """Takes replay jobs one at a time and publishes their dead letters at the job's rate."""

    def __init__(
        self,
        *,
        pool: Any,
        store: DeadLetterStore,
        publisher: Publisher,
        routes: Callable[[], Routes],
        owner: str,
        on_published: Callable[[], None] = lambda: None,
    ) -> None:
        self._pool = pool
        self._store = store
        self._publisher = publisher
        self._routes = routes
        self._owner = owner
        self._on_published = on_published

    async def run(self) -> None:
        """Until cancelled."""
        while True:
            try:
                job = await self._claim()
                if job is None:
                    await asyncio.sleep(_IDLE)
                    continue
                await self._process(str(job["id"]), job["to_function"], float(job["rate"]))
            except Exception as exc:  # the lease runs out and another process takes over
                log.error("replay_runner_failed", error=str(exc) or repr(exc))
                await asyncio.sleep(_IDLE)

    async def _claim(self) -> Any:
        return await self._pool.fetchrow(
            "update replay_jobs set lease_owner = $1,"
            " lease_until = now() + make_interval(secs => $2),"
            " status = 'running', updated_at = now() where id = ("
            " select id from replay_jobs where status in ('pending', 'running')"
            " and (lease_until is null or lease_until < now() or lease_owner = $1)"
            " order by created_at limit 1 for update skip locked)"
            " returning id, to_function, rate",
            self._owner,
            LEASE,
        )

    async def _process(self, job_id: str, to: str | None, rate: float) -> None:
        interval = 1.0 / rate
        next_at = time.monotonic()
        while True:
            items = await self._pool.fetch(
                "select seq, dead_letter_id from replay_items where job_id = $1"
                " and state = 'pending' order by seq limit $2",
                job_id,
                _BATCH,
            )
            if not items:
                await self._finish(job_id)
                return
            for item in items:
                # Wait for the slot in short steps, renewing the lease, and check it once more
                # right before publishing: a slow rate must not let another process take over.
                while (delay := next_at - time.monotonic()) > 0:
                    if not await self._renew(job_id):
                        return  # cancelled, or the lease is someone else's now
                    await asyncio.sleep(min(delay, LEASE / 3))
                if not await self._renew(job_id):
                    return
                next_at = max(next_at + interval, time.monotonic() - interval)
                await self._replay_one(job_id, item["seq"], str(item["dead_letter_id"]), to)

    async def _replay_one(self, job_id: str, seq: int, dl_id: str, to: str | None) -> None:
        row = await self._store.taken_by(dl_id, job_id)
        if row is not None and row["status"] != "replaying":
            # Published before an interruption, and already over: count it, send nothing.
            await self._mark(job_id, seq, "published")
            return
        target = to or (row["function"] if row is not None else None)
        routes = self._routes()
        if row is None or target is None or Target.parse(target).function not in routes.functions:
            if row is not None:  # nowhere to send it: leave it as it was
                await self._store.abandon_replay(dl_id, job_id)
            await self._mark(job_id, seq, "skipped")
            return
        extensions = {"eventhubreplay": job_id, "eventhubreplaycount": str(row["replay_count"])}
        flow = flow_context_of(row)  # a flow step: on success its run goes on from there
        invocation = Invocation(
            id=replay_invocation_id(dl_id, job_id),
            function=target,
            event=event_of(row).with_extensions(**extensions),
            binding=row["binding"],
            replay_of=dl_id,
            version=row["version"],  # the version that failed, unless ``to`` says otherwise
            flow=FlowContext.from_json(flow) if flow is not None else None,
        )
        if to is not None:
            invocation = routes.aim(invocation)
        await self._publisher.publish(invocation)
        await self._mark(job_id, seq, "published")
        self._on_published()

    async def _mark(self, job_id: str, seq: int, state: str) -> None:
        """Count an item once, even if two processes ever got to it."""
        column = "published" if state == "published" else "skipped"
        async with self._pool.acquire() as conn, conn.transaction():
            changed = await conn.execute(
                "update replay_items set state = $3 where job_id = $1 and seq = $2"
                " and state = 'pending'",
                job_id,
                seq,
                state,
            )
            if changed.endswith(" 0"):
                return
            await conn.execute(
                f"update replay_jobs set processed = processed + 1, {column} = {column} + 1,"  # noqa: S608
                " updated_at = now() where id = $1",
                job_id,
            )

    async def _renew(self, job_id: str) -> bool:
        status = await self._pool.fetchval(
            "update replay_jobs set lease_until = now() + make_interval(secs => $3)"
            " where id = $1 and lease_owner = $2 returning status",
            job_id,
            self._owner,
            LEASE,
        )
        return bool(status == "running")

    async def _finish(self, job_id: str) -> None:
        await self._pool.execute(
            "update replay_jobs set status = 'done', lease_owner = null, lease_until = null,"
            " updated_at = now() where id = $1 and status = 'running'",
            job_id,
        )
        log.info("replay_job_done", job=job_id)


async def release_pending(conn: Any, job_id: str) -> None:
    """The dead letters a stopped job had not published go back to ``dead``."""
    await conn.execute(
        "update dead_letters set status = 'dead', replay_count = replay_count - 1,"
        " updated_at = now() where replay_job = $1 and status = 'replaying' and id in ("
        " select dead_letter_id from replay_items where job_id = $1 and state = 'pending')",
        job_id,
    )


def job_document(row: Any) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "status": row["status"],
        "to": row["to_function"],
        "rate": row["rate"],
        "total": row["total"],
        "processed": row["processed"],
        "published": row["published"],
        "skipped": row["skipped"],
        "succeeded": row["succeeded"],
        "failed": row["failed"],
        "error": row["error"],
        "createdAt": row["created_at"].isoformat().replace("+00:00", "Z"),
        "updatedAt": row["updated_at"].isoformat().replace("+00:00", "Z"),
    }


__all__ = ["ReplayJobs", "ReplayPlan", "ReplayRunner", "job_document", "to_document"]
