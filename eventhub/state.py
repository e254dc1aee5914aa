"""Hot invocation state in Redis: what ``GET /v1/invocations/{id}`` answers.

Each invocation has a hash ``<ns>:inv:<id>`` (status, function, attempts, last status or error,
timestamps) and a list ``<ns>:inv:<id>:attempts`` (one JSON record per attempt), both expiring
after ``state_ttl``. This state costs no database write per invocation; it is a view, not the
source of truth: JetStream holds the invocation and PostgreSQL the dead letter. If a write here
fails, delivery goes on and the failure is logged.

Statuses: queued -> running -> (retrying -> running)* -> succeeded | dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    version: str = "latest"  # the version that was called

    @classmethod
    def of(
        cls, attempt: int, started_at: str, outcome: Outcome, version: str = "latest"
    ) -> AttemptRecord:
        return cls(
            version=version,
            attempt=attempt,
            started_at=started_at,
            latency_ms=round(outcome.latency * 1000, 3),
            status=outcome.status,
            error=outcome.error,
            message=outcome.message,
            response=outcome.response_excerpt,
        )

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> AttemptRecord:
        """The inverse of :meth:`to_json` (a record read back from Redis)."""
        return cls(
            attempt=int(doc.get("attempt") or 0),
            started_at=str(doc.get("startedAt") or ""),
            latency_ms=float(doc.get("latencyMs") or 0.0),
            status=doc.get("status"),
            error=doc.get("error"),
            message=str(doc.get("message") or ""),
            response=str(doc.get("response") or ""),
            version=str(doc.get("version") or "latest"),
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
            "version": self.version,
        }


# The transitions of a batch of invocations, in one call (a script call per invocation cost more
# CPU in this process than everything else the state does). KEYS: per invocation, its hash then
# its attempts list. ARGV[1]: the ttl; ARGV[2]: a JSON array with, per invocation, [fields set
# only if absent, fields always set (in order: a later one wins), attempt records to append].
_TRANSITIONS = """
local ttl = tonumber(ARGV[1])
local writes = cjson.decode(ARGV[2])
for i, w in ipairs(writes) do
  local hash, list = KEYS[2 * i - 1], KEYS[2 * i]
  local nx, always, attempts = w[1], w[2], w[3]
  for j = 1, #nx, 2 do redis.call('HSETNX', hash, nx[j], nx[j + 1]) end
  if #always > 0 then redis.call('HSET', hash, unpack(always)) end
  redis.call('EXPIRE', hash, ttl)
  if #attempts > 0 then
    redis.call('RPUSH', list, unpack(attempts))
    redis.call('EXPIRE', list, ttl)
  end
end
return #writes
"""
_QUEUE_SIZE = 10_000
_BATCH = 500
# Seconds a write may wait for others to share its batch. Under load an invocation's 'queued'
# and its outcome then mostly share one batch and are merged into one write; a reader never
# waits for it (a flush cuts the wait short).
_LINGER = 0.05


@dataclass
class _Write:
    """What to do to one invocation's state; writes to the same invocation are merged."""

    nx: list[str]
    always: list[str]
    attempts: list[str]

    def merge(self, later: _Write) -> None:
        self.nx += later.nx
        self.always += later.always
        self.attempts += later.attempts

    def packed(self) -> tuple[list[str], list[str], list[str]]:
        return self.nx, self.always, self.attempts


class InvocationState:
    """Writes are queued and applied in batches by :meth:`run` (one pipeline of one script
    call per transition), so no caller waits for Redis on the hot path. Reads flush first."""

    def __init__(self, client: aioredis.Redis, namespace: str, ttl: float) -> None:
        self._redis = client
        self._prefix = f"{namespace}:inv:"
        self._ttl = str(max(1, int(ttl)))
        self._script = client.register_script(_TRANSITIONS)
        self._pending: asyncio.Queue[tuple[str, _Write]] = asyncio.Queue(maxsize=_QUEUE_SIZE)
        self._queued = 0  # writes queued so far
        self._applied = 0  # writes applied (or failed and logged) so far
        self._progress = asyncio.Condition()
        self._hurry = asyncio.Event()  # a reader waits: apply what is queued now
        self._wanted = 0  # writes a reader waits for: applied without lingering

    async def queued(self, ids: list[tuple[str, str, str]], owner: str | None = None) -> None:
        """Mark (invocation id, function, version) triples queued, unless dispatch already
        moved them on; ``owner`` (the id of the token that asked) is kept in the hash's
        ``owner`` field."""
        now = now_rfc3339()
        for inv_id, function, version in ids:
            nx = ["status", "queued", "createdAt", now, "function", function, "updatedAt", now]
            nx += ["version", version]
            if owner:
                nx += ["owner", owner]
            await self._put(inv_id, _Write(nx, [], []))

    def running(self, inv_id: str, function: str, attempt: int, version: str) -> None:
        now = now_rfc3339()
        always = ["status", "running", "function", function, "attempts", str(attempt)]
        always += ["version", version]
        self._put_nowait(inv_id, _Write(["createdAt", now], [*always, "updatedAt", now], []))

    async def attempted(self, inv_id: str, function: str, record: AttemptRecord) -> None:
        """Record an attempt whose outcome is decided but not yet settled (its dead letter or
        success could not be written while PostgreSQL was away): the status stays as it is."""
        await self.finished(inv_id, function, "", record)

    async def settled(self, inv_id: str, function: str, status: str, **extra: str) -> None:
        """Set the final status of an invocation whose last attempt is recorded already."""
        fields = ["function", function, "status", status, "updatedAt", now_rfc3339()]
        for name, value in extra.items():
            fields += [name, value]
        await self._put(inv_id, _Write([], fields, []))

    async def finished(
        self, inv_id: str, function: str, status: str, record: AttemptRecord, **extra: str
    ) -> None:
        """Record an attempt and set the status (an empty ``status`` leaves it as it is)."""
        fields = [
            "function",
            function,
            "version",
            record.version,
            *(["status", status] if status else []),
            "attempts",
            str(record.attempt),
            "lastStatus",
            "" if record.status is None else str(record.status),
            "lastError",
            record.error or "",
            "updatedAt",
            now_rfc3339(),
        ]
        for name, value in extra.items():
            fields += [name, value]
        nx = ["createdAt", record.started_at]  # for invocations that were not marked queued
        await self._put(inv_id, _Write(nx, fields, [orjson.dumps(record.to_json()).decode()]))

    async def _put(self, inv_id: str, write: _Write) -> None:
        self._put_nowait(inv_id, write)

    def _put_nowait(self, inv_id: str, write: _Write) -> None:
        """Queue a write; when Redis is so slow that the queue is full, the write is dropped
        (and logged) rather than holding up delivery: this state is a view."""
        try:
            self._pending.put_nowait((inv_id, write))
        except asyncio.QueueFull:
            log.warning("invocation_state_write_dropped", invocation_id=inv_id)
            return
        self._queued += 1

    async def flush(self) -> None:
        """Wait until the writes queued before this call are applied (or failed, logged)."""
        target = self._queued
        self._wanted = max(self._wanted, target)
        self._hurry.set()
        async with self._progress:
            await self._progress.wait_for(lambda: self._applied >= target)

    async def run(self) -> None:
        """Apply queued writes until cancelled; a failed batch is logged, delivery goes on."""
        while True:
            first_id, first = await self._pending.get()
            if self._pending.qsize() < _BATCH and self._applied >= self._wanted:
                # A moment's wait fills the batch: one script call then carries the writes of
                # many invocations, which costs far less than a call for each.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_LINGER):
                        await self._hurry.wait()
            self._hurry.clear()
            batch = {first_id: first}  # under load, one invocation's transitions share a batch
            taken = 1
            while len(batch) < _BATCH and not self._pending.empty():
                inv_id, write = self._pending.get_nowait()
                taken += 1
                if inv_id in batch:
                    batch[inv_id].merge(write)
                else:
                    batch[inv_id] = write
            keys: list[str] = []
            for inv_id in batch:
                key = self._prefix + inv_id
                keys += (key, key + ":attempts")
            packed = orjson.dumps([write.packed() for write in batch.values()])
            try:
                await self._script(keys=keys, args=[self._ttl, packed])
            except aioredis.RedisError as exc:
                log.warning("invocation_state_write_failed", error=str(exc), writes=len(batch))
            async with self._progress:
                self._applied += taken
                self._progress.notify_all()

    async def exists(self, inv_id: str) -> bool:
        try:
            return bool(await self._redis.exists(self._prefix + inv_id))
        except aioredis.RedisError:
            return False  # JetStream's duplicate window still applies

    async def attempts(self, inv_id: str) -> list[dict[str, Any]]:
        """The attempts recorded so far; none when Redis cannot say (a dead letter is then
        stored with the attempts this process knows of, rather than not at all)."""
        try:
            async with asyncio.timeout(5.0):
                await self.flush()
            raw = await self._redis.lrange(self._prefix + inv_id + ":attempts", 0, -1)
        except (aioredis.RedisError, TimeoutError) as exc:
            log.warning("invocation_state_read_failed", invocation_id=inv_id, error=str(exc))
            return []
        return [orjson.loads(item) for item in raw]

    async def get(self, inv_id: str) -> dict[str, Any] | None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await self.flush()
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
