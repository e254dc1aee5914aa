"""Flow runs as the API (``GET /v1/flows/{name}/runs[/{id}]``) and the CLI (``eventhub flow
runs|show``) show them: a run's status, trigger event and timestamps, and each step it entered
with its status, timing, attempts, the version called and the first KiB of its result."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from eventhub.errors import InvalidInput, NotFound

RUN_STATUSES = ("running", "succeeded", "failed")
_RUN_COLUMNS = (
    "id, flow, binding, status, trigger_id, trigger_source, trigger_type, error, output,"
    " started_at, updated_at, ended_at"
)
_STEP_COLUMNS = (
    "seq, branch, name, kind, status, target, version, attempts, excerpt, error,"
    " dead_letter_id, queued_at, started_at, ended_at"
)


class FlowRuns:
    """Runs as the API and the CLI show them."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def listing(
        self, flow: str, status: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Newest first."""
        if status is not None and status not in RUN_STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(RUN_STATUSES)}")
        rows = await self._pool.fetch(
            f"select {_RUN_COLUMNS} from flow_runs where flow = $1"  # noqa: S608 - constants
            " and ($2::text is null or status = $2) order by started_at desc, id desc limit $3",
            flow,
            status,
            limit,
        )
        return [run_document(r) for r in rows]

    async def exists(self, flow: str) -> bool:
        return bool(await self._pool.fetchval("select 1 from flow_runs where flow = $1", flow))

    async def get(self, run_id: str, flow: str | None = None) -> dict[str, Any]:
        """One run with its steps. ``run_id`` may be the start of an id, when only one run's
        id starts so; ``flow``: it must be a run of this flow."""
        rows = await self._find(run_id, flow)
        if not rows:
            where = f" of flow '{flow}'" if flow is not None else ""
            raise NotFound(f"run '{run_id}'{where} does not exist")
        if len(rows) > 1:
            raise InvalidInput(f"'{run_id}' is the start of several runs' ids: give more of it")
        run = rows[0]
        steps = await self._pool.fetch(
            f"select {_STEP_COLUMNS} from flow_steps where run_id = $1"  # noqa: S608
            " order by seq, branch",
            run["id"],
        )
        return {**run_document(run), "steps": [step_document(s) for s in steps]}

    async def _find(self, run_id: str, flow: str | None) -> list[Any]:
        text = run_id.strip().lower()
        if not text or len(text) > 36 or any(c not in "0123456789abcdef-" for c in text):
            return []
        where = "id = $1::uuid" if len(text) == 36 else "id::text like $1 || '%'"
        try:
            return list(
                await self._pool.fetch(
                    f"select {_RUN_COLUMNS} from flow_runs where {where}"  # noqa: S608
                    " and ($2::text is null or flow = $2) limit 2",
                    text,
                    flow,
                )
            )
        except (ValueError, asyncpg.DataError):
            return []


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def run_document(row: Any) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "flow": row["flow"],
        "binding": row["binding"],
        "status": row["status"],
        "triggerEventId": row["trigger_id"],
        "triggerEvent": {
            "id": row["trigger_id"],
            "source": row["trigger_source"],
            "type": row["trigger_type"],
        },
        "error": row["error"],
        "output": row["output"],
        "startedAt": _iso(row["started_at"]),
        "updatedAt": _iso(row["updated_at"]),
        "endedAt": _iso(row["ended_at"]),
    }


def step_document(row: Any) -> dict[str, Any]:
    started, ended = row["started_at"], row["ended_at"]
    duration = (ended - started).total_seconds() * 1000 if started and ended else None
    return {
        "seq": row["seq"],
        "name": row["name"],
        "kind": row["kind"],
        "branch": row["branch"] if row["branch"] >= 0 else None,
        "status": row["status"],
        "function": row["target"],
        "version": row["version"],
        "attempts": row["attempts"],
        "queuedAt": _iso(row["queued_at"]),
        "startedAt": _iso(started),
        "endedAt": _iso(ended),
        "durationMs": round(duration, 3) if duration is not None else None,
        "output": row["excerpt"],
        "error": row["error"],
        "deadLetterId": str(row["dead_letter_id"]) if row["dead_letter_id"] else None,
    }
