"""Flow runs and their steps in PostgreSQL (tables ``flow_runs`` and ``flow_steps``).

Writes are made by :mod:`eventhub.flows.engine` inside one transaction per settled step, the
run's row locked first (:func:`lock_run`), so two branches finishing at once are serialised and
the join is decided once. Every write is idempotent: a step entered again (a redelivery before
the ack) keeps its row; a result recorded again keeps the first one; a failure never
overwrites a success. :mod:`eventhub.flows.runs` reads them for the API and the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

JOIN = -1  # the branch number of a step itself (a parallel step's join)
_EXCERPT = 1024


@dataclass(frozen=True, slots=True)
class Run:
    id: str
    flow: str
    binding: str | None
    status: str
    trigger_id: str
    trigger_source: str


@dataclass(frozen=True, slots=True)
class StepKey:
    run: str
    seq: int
    branch: int  # JOIN for a step itself


@dataclass(frozen=True, slots=True)
class Settled:
    """What a step's invocation ended with, as recorded."""

    status: str  # succeeded | failed
    version: str | None = None
    attempts: int = 0
    started_at: datetime | None = None
    output: bytes | None = None
    output_type: str | None = None
    error: str | None = None
    dead_letter_id: str | None = None
    fails_run: bool = False


@dataclass(frozen=True, slots=True)
class Branch:
    branch: int
    status: str
    output: bytes | None
    output_type: str | None
    error: str | None
    dead_letter_id: str | None


def excerpt_of(body: bytes | None) -> str | None:
    if body is None:
        return None
    return _text(body[:_EXCERPT].decode("utf-8", "replace"))


def _text(value: str | None) -> str | None:
    """As PostgreSQL text can hold it (no NUL)."""
    return None if value is None else value.replace("\x00", "\ufffd")


# -- writes (inside the engine's transaction) -------------------------------------------------


async def insert_run(conn: Any, run: Run, trigger_type: str) -> bool:
    """Make the run's row; False when it exists already (its event was routed before)."""
    status = await conn.execute(
        "insert into flow_runs (id, flow, binding, trigger_id, trigger_source, trigger_type)"
        " values ($1, $2, $3, $4, $5, $6) on conflict (id) do nothing",
        run.id,
        run.flow,
        run.binding,
        _text(run.trigger_id),
        _text(run.trigger_source),
        _text(trigger_type),
    )
    return bool(status.endswith(" 1"))


async def lock_run(conn: Any, run_id: str) -> Run | None:
    row = await conn.fetchrow(
        "select id, flow, binding, status, trigger_id, trigger_source from flow_runs"
        " where id = $1 for update",
        run_id,
    )
    if row is None:
        return None
    return Run(
        str(row["id"]),
        row["flow"],
        row["binding"],
        row["status"],
        row["trigger_id"],
        row["trigger_source"],
    )


async def finish_run(
    conn: Any, run_id: str, status: str, *, error: str | None = None, output: str | None = None
) -> bool:
    """Mark a running run succeeded or failed; False when it was not running."""
    changed = await conn.execute(
        "update flow_runs set status = $2, error = $3, output = $4, ended_at = now(),"
        " updated_at = now() where id = $1 and status = 'running'",
        run_id,
        status,
        _text(error),
        _text(output),
    )
    return bool(changed.endswith(" 1"))


async def revive_run(conn: Any, run_id: str) -> None:
    """A failed run whose failed step was replayed, and succeeded: it runs again."""
    await conn.execute(
        "update flow_runs set status = 'running', error = null, ended_at = null,"
        " updated_at = now() where id = $1 and status = 'failed'",
        run_id,
    )


async def enter_step(
    conn: Any, key: StepKey, name: str, kind: str, target: str | None, status: str = "running"
) -> str:
    """The step's row, made if new; returns its status (a step entered again keeps its row:
    ``running`` means its invocation may still have to be published)."""
    row = await conn.fetchrow(
        "with made as (insert into flow_steps (run_id, seq, branch, name, kind, target, status,"
        " ended_at) values ($1, $2, $3, $4, $5, $6, $7,"
        " case when $7 = 'running' then null else now() end)"
        " on conflict (run_id, seq, branch) do nothing returning status)"
        " select status from made union all select status from flow_steps"
        " where run_id = $1 and seq = $2 and branch = $3 limit 1",
        key.run,
        key.seq,
        key.branch,
        name,
        kind,
        target,
        status,
    )
    return str(row["status"])


async def note_choice(conn: Any, key: StepKey, name: str, chosen: str | None) -> bool:
    """A choice step evaluated; True when it is recorded now (not before)."""
    status = "succeeded" if chosen is not None else "failed"
    row = await conn.fetchrow(
        "insert into flow_steps (run_id, seq, branch, name, kind, status, excerpt, error,"
        " fails_run, started_at, ended_at)"
        " values ($1, $2, $3, $4, 'choice', $5, $6, $7, $8, now(), now())"
        " on conflict (run_id, seq, branch) do nothing returning 1",
        key.run,
        key.seq,
        key.branch,
        name,
        status,
        f"next: {chosen}" if chosen is not None else None,
        None if chosen is not None else "no rule is true, and there is no default",
        chosen is None,
    )
    return row is not None


async def settle_step(
    conn: Any, key: StepKey, settled: Settled, *, replay: bool = False
) -> tuple[str | None, Settled]:
    """Record how a step's invocation ended. A success replaces anything but a success (a
    replay of a failed step succeeds); a failure replaces only a running step, or a failed
    one when it is a replay's (its attempts add up). Returns the status before (None: no
    row) and what is recorded now (the first result, if the step had succeeded already)."""
    before = await conn.fetchrow(
        "select status, version, attempts, started_at, output, output_type, error,"
        " dead_letter_id, fails_run from flow_steps"
        " where run_id = $1 and seq = $2 and branch = $3 for update",
        key.run,
        key.seq,
        key.branch,
    )
    old = None if before is None else str(before["status"])
    if old == "succeeded" or (settled.status == "failed" and old not in (None, "running")):
        if old == "failed" and settled.status == "failed" and replay:  # failed again
            await _update_step(conn, key, settled)
            return old, settled
        assert before is not None  # noqa: S101 - old is set
        return old, _settled_of(before)
    if before is None:
        return None, settled  # a run entered before this step existed: nothing to settle
    await _update_step(conn, key, settled)
    return old, settled


async def _update_step(conn: Any, key: StepKey, s: Settled) -> None:
    await conn.execute(
        "update flow_steps set status = $4, version = coalesce($5, version),"
        " attempts = attempts + $6, started_at = coalesce($7, started_at), output = $8,"
        " output_type = $9, excerpt = $10, error = $11, dead_letter_id = $12::uuid,"
        " fails_run = $13, ended_at = now() where run_id = $1 and seq = $2 and branch = $3",
        key.run,
        key.seq,
        key.branch,
        s.status,
        s.version,
        s.attempts,
        s.started_at,
        s.output,
        _text(s.output_type),
        excerpt_of(s.output),
        _text(s.error),
        s.dead_letter_id,
        s.fails_run,
    )


def _settled_of(row: Any) -> Settled:
    return Settled(
        status=row["status"],
        version=row["version"],
        attempts=row["attempts"],
        started_at=row["started_at"],
        output=bytes(row["output"]) if row["output"] is not None else None,
        output_type=row["output_type"],
        error=row["error"],
        dead_letter_id=str(row["dead_letter_id"]) if row["dead_letter_id"] else None,
        fails_run=row["fails_run"],
    )


async def settle_join(
    conn: Any, key: StepKey, status: str, output: bytes | None, error: str | None = None
) -> None:
    """A parallel step's own row, once its branches are over (or one failed the run: the
    branch's row, not this one, holds the run failed until it is replayed)."""
    await conn.execute(
        "update flow_steps set status = $4, output = $5, output_type = $6, excerpt = $7,"
        " error = $8, started_at = coalesce(started_at, queued_at), ended_at = now()"
        " where run_id = $1 and seq = $2 and branch = $3 and status <> 'succeeded'",
        key.run,
        key.seq,
        key.branch,
        status,
        output,
        "application/json" if output is not None else None,
        excerpt_of(output),
        _text(error),
    )


async def branches(conn: Any, run_id: str, seq: int) -> list[Branch]:
    rows = await conn.fetch(
        "select branch, status, output, output_type, error, dead_letter_id from flow_steps"
        " where run_id = $1 and seq = $2 and branch >= 0 order by branch",
        run_id,
        seq,
    )
    return [
        Branch(
            r["branch"],
            r["status"],
            bytes(r["output"]) if r["output"] is not None else None,
            r["output_type"],
            r["error"],
            str(r["dead_letter_id"]) if r["dead_letter_id"] else None,
        )
        for r in rows
    ]


async def joined(conn: Any, run_id: str, seq: int) -> bytes | None:
    """A parallel step's join as first recorded; None while it is not."""
    row = await conn.fetchrow(
        "select output from flow_steps where run_id = $1 and seq = $2 and branch = -1"
        " and status = 'succeeded'",
        run_id,
        seq,
    )
    return None if row is None or row["output"] is None else bytes(row["output"])


async def blocking_failures(conn: Any, run_id: str) -> int:
    """Steps whose failure holds the run failed (until each is replayed and succeeds)."""
    return int(
        await conn.fetchval(
            "select count(*) from flow_steps where run_id = $1 and status = 'failed' and fails_run",
            run_id,
        )
    )
