"""Hot invocation state in Redis: what ``GET /v1/invocations/{id}`` answers.

Each invocation has a hash ``<ns>:inv:<id>`` (status, function, attempts, last status or error,
timestamps) and a list ``<ns>:inv:<id>:attempts`` (one JSON record per attempt), both expiring
after ``state_ttl``. This state costs no database write per invocation; it is a view, not the
source of truth: JetStream holds the invocation and PostgreSQL the dead letter. If a write here
fails, delivery goes on and the failure is logged.

Statuses: queued -> running -> (retrying -> running)* -> succeeded | dead-lettered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
import structlog

from eventhub.events import now_rfc3339
from eventhub.retry import Outcome

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    attempt: int
    started_at: str
    latency_ms: float
    status: int | None
    error: str | None
    message: str
    response: str

    @classmethod
    def of(cls, attempt: int, started_at: str, outcome: Outcome) -> AttemptRecord:
        return cls(
            attempt=attempt,
            started_at=started_at,
            latency_ms=round(outcome.latency * 1000, 3),
            status=outcome.status,
            error=outcome.error,
            message=outcome.message,
            response=outcome.response_excerpt,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "startedAt": self.started_at,
            "latencyMs": self.latency_ms,
            "status": self.status,
            "error": self.error,
            "message": self.message,
            "response": self.response,
        }


class InvocationState:
    def __init__(self, client: aioredis.Redis, namespace: str, ttl: float) -> None:
        self._redis = client
        self._prefix = f"{namespace}:inv:"
        self._ttl = max(1, int(ttl))

    async def queued(self, ids: list[tuple[str, str]]) -> None:
        """Mark (invocation id, function) pairs queued, unless dispatch already moved them on."""
        now = now_rfc3339()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for inv_id, function in ids:
                    key = self._prefix + inv_id
                    pipe.hsetnx(key, "status", "queued")
                    pipe.hsetnx(key, "createdAt", now)
                    pipe.hsetnx(key, "function", function)
                    pipe.hsetnx(key, "updatedAt", now)
                    pipe.expire(key, self._ttl)
                await pipe.execute()
        except aioredis.RedisError as exc:
            log.warning("invocation_state_write_failed", error=str(exc))

    async def running(self, inv_id: str, function: str, attempt: int) -> None:
        now = now_rfc3339()
        await self._write(
            inv_id,
            {"status": "running", "function": function, "attempts": attempt, "updatedAt": now},
            created=now,
        )

    async def finished(self, inv_id: str, status: str, record: AttemptRecord, **extra: str) -> None:
        fields: dict[str, str | int] = {
            "status": status,
            "attempts": record.attempt,
            "lastStatus": "" if record.status is None else record.status,
            "lastError": record.error or "",
            "updatedAt": now_rfc3339(),
            **extra,
        }
        await self._write(inv_id, fields, attempt=record)

    async def exists(self, inv_id: str) -> bool:
        try:
            return bool(await self._redis.exists(self._prefix + inv_id))
        except aioredis.RedisError:
            return False  # JetStream's duplicate window still applies

    async def attempts(self, inv_id: str) -> list[dict[str, Any]]:
        raw = await self._redis.lrange(self._prefix + inv_id + ":attempts", 0, -1)
        return [orjson.loads(item) for item in raw]

    async def get(self, inv_id: str) -> dict[str, Any] | None:
        key = self._prefix + inv_id
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(key)
            pipe.lrange(key + ":attempts", 0, -1)
            fields, attempts = await pipe.execute()
        if not fields:
            return None
        doc: dict[str, Any] = {k.decode(): v.decode() for k, v in fields.items()}
        doc["id"] = inv_id
        doc["attempts"] = int(doc.get("attempts") or 0)
        if doc.get("lastStatus"):
            doc["lastStatus"] = int(doc["lastStatus"])
        else:
            doc["lastStatus"] = None
        doc["lastError"] = doc.get("lastError") or None
        doc["history"] = [orjson.loads(a) for a in attempts]
        return doc

    async def _write(
        self,
        inv_id: str,
        fields: dict[str, str | int],
        *,
        created: str | None = None,
        attempt: AttemptRecord | None = None,
    ) -> None:
        key = self._prefix + inv_id
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                if created:
                    pipe.hsetnx(key, "createdAt", created)
                pipe.hset(key, mapping=dict(fields))  # type: ignore[arg-type]  # redis-py's Mapping key is invariant
                pipe.expire(key, self._ttl)
                if attempt is not None:
                    pipe.rpush(key + ":attempts", orjson.dumps(attempt.to_json()))
                    pipe.expire(key + ":attempts", self._ttl)
                await pipe.execute()
        except aioredis.RedisError as exc:
            log.warning("invocation_state_write_failed", invocation_id=inv_id, error=str(exc))
