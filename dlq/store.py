"""The dead-letter store in PostgreSQL (table ``dead_letters``).

``store`` is idempotent by dead-letter id: a final attempt redelivered after a crash stores the
same row once. Rows keep the original CloudEvent (attributes and data, byte for byte), every
attempt, and the state of the delivery to the dead-letter function.

PostgreSQL takes no NUL in ``text`` nor ``\u0000`` in ``jsonb``, and no text that is not
UTF-8, yet a source can hand over both. So nothing is refused here:

- the event's data is ``bytea``, any bytes;
- an attribute value holding NUL or unencodable characters is stored in ``attributes`` as
  ``{"base64": <its UTF-8 bytes, surrogates passed through>}`` instead of a string, and read back
  as the original string (so a replay sends exactly what came in);
- every other text (the ``event_*`` search columns, error messages, attempts' excerpts) is a
  diagnostic: NUL and unencodable characters become U+FFFD there.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, overload

import asyncpg
import orjson

from eventhub.errors import InvalidInput, NotFound
from eventhub.events import Event
from eventhub.ports import DeadLetterRecord

STATUSES = ("dead", "replaying", "resolved")
_COLUMNS = (
    "id, invocation_id, function, binding, event_source, event_id, event_type, attributes, data,"
    " reason, error_code, error_message, attempts, enqueued_at, failed_at, created_at,"
    " updated_at, status, replay_count, dead_letter_function, dlf_status, dlf_error, source_name,"
    " replay_job, version, flow_context"
)


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters: every field set must match."""

    function: str | None = None
    version: str | None = None
    binding: str | None = None
    source: str | None = None
    status: str | None = None
    error_code: str | None = None
    reason: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    ids: tuple[str, ...] | None = None

    def where(self, args: list[object]) -> str:
        """The SQL condition, its parameters appended to ``args``."""
        clauses: list[str] = []
        for column, value in (
            ("function", self.function),
            ("version", self.version),
            ("binding", self.binding),
            ("source_name", self.source),
            ("status", self.status),
            ("error_code", self.error_code),
            ("reason", self.reason),
        ):
            if value is not None:
                args.append(value)
                clauses.append(f"{column} = ${len(args)}")
        if self.since is not None:
            args.append(self.since)
            clauses.append(f"failed_at >= ${len(args)}")
        if self.until is not None:
            args.append(self.until)
            clauses.append(f"failed_at < ${len(args)}")
        if self.ids is not None:
            args.append(list(self.ids))
            clauses.append(f"id = any(${len(args)}::uuid[])")
        return " and ".join(clauses) or "true"


@dataclass(frozen=True)
class DeadLetterQuery:
    filter: DeadLetterFilter = DeadLetterFilter()
    limit: int = 50
    # Keyset pagination: the (failed_at, id) of the last row of the previous page.
    after: tuple[datetime, str] | None = None


class DeadLetterStore:
    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def store(self, record: DeadLetterRecord) -> None:
        event = record.event
        status = "pending" if record.dead_letter_function else "none"
        await self._pool.execute(
            "insert into dead_letters (id, invocation_id, function, binding, event_source,"
            " event_id, event_type, attributes, data, reason, error_code, error_message,"
            " attempts, enqueued_at, failed_at, dead_letter_function, dlf_status, source_name,"
            " version, flow_context)"
            " values ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11, $12, $13::jsonb,"
            " $14, $15, $16, $17, $18, $19, $20::jsonb)"
            " on conflict (id) do nothing",
            record.id,
            _text(record.invocation_id),
            _text(record.function),
            _text(record.binding),
            _text(event.attributes.get("source", "")),
            _text(event.attributes.get("id", "")),
            _text(event.attributes.get("type", "")),
            attributes_json(event.attributes),
            event.data,
            _text(record.reason),
            _text(record.error_code),
            _text(record.error_message),
            _json(record.attempts),
            record.enqueued_at,
            record.failed_at,
            _text(record.dead_letter_function),
            status,
            _text(record.source_name),
            _text(record.version),
            _json(record.flow) if record.flow is not None else None,
        )

    async def dead_letter_function_done(self, dl_id: str, ok: bool, error: str | None) -> None:
        await self._pool.execute(
            "update dead_letters set dlf_status = $2, dlf_error = $3, updated_at = now()"
            " where id = $1",
            dl_id,
            "delivered" if ok else "failed",
            _text(error),
        )

    async def get(self, dl_id: str) -> dict[str, Any]:
        return to_document(await self.row(dl_id))

    async def page(self, query: DeadLetterQuery) -> list[dict[str, Any]]:
        if query.filter.status is not None and query.filter.status not in STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(STATUSES)}")
        args: list[object] = []
        where = query.filter.where(args)
        if query.after is not None:
            args.extend(query.after)
            where += f" and (failed_at, id) < (${len(args) - 1}, ${len(args)}::uuid)"
        args.append(query.limit)
        rows = await self._pool.fetch(
            f"select {_COLUMNS} from dead_letters where {where}"  # noqa: S608 - constants
            f" order by failed_at desc, id desc limit ${len(args)}",
            *args,
        )
        return [to_document(r) for r in rows]

    async def count(self, which: DeadLetterFilter) -> int:
        args: list[object] = []
        where = which.where(args)
        sql = f"select count(*) from dead_letters where {where}"  # noqa: S608 - constants
        return int(await self._pool.fetchval(sql, *args))

    async def purge(self, which: DeadLetterFilter) -> int:
        """Delete the matching dead letters, except those being replayed right now."""
        args: list[object] = []
        where = which.where(args)
        status = await self._pool.execute(
            f"delete from dead_letters where {where} and status <> 'replaying'",  # noqa: S608
            *args,
        )
        return int(status.split()[-1])

    async def stats(self, now: datetime) -> dict[str, Any]:
        async with self._pool.acquire() as conn:
            total = await conn.fetchrow(
                "select count(*) as n, min(failed_at) as oldest, max(failed_at) as newest"
                " from dead_letters where status <> 'resolved'"
            )
            by_function = await conn.fetch(
                "select coalesce(function, '') as function, count(*) as n from dead_letters"
                " where status <> 'resolved' group by 1 order by 2 desc"
            )
            by_error = await conn.fetch(
                "select coalesce(function, '') as function, error_code, reason, count(*) as n"
                " from dead_letters where status <> 'resolved'"
                " group by 1, 2, 3 order by 4 desc limit 200"
            )
            hourly = await conn.fetch(
                "select coalesce(function, '') as function,"
                " date_trunc('hour', failed_at) as hour, count(*) as n from dead_letters"
                " where failed_at >= $1 group by 1, 2 order by 2",
                now - timedelta(hours=24),
            )
        return {
            "total": total["n"],
            "oldest": _iso(total["oldest"]) if total["oldest"] else None,
            "newest": _iso(total["newest"]) if total["newest"] else None,
            "byFunction": [{"function": r["function"], "count": r["n"]} for r in by_function],
            "byError": [
                {
                    "function": r["function"],
                    "errorCode": r["error_code"],
                    "reason": r["reason"],
                    "count": r["n"],
                }
                for r in by_error
            ],
            "hourly": [
                {"function": r["function"], "hour": _iso(r["hour"]), "count": r["n"]}
                for r in hourly
            ],
        }

    async def taken_by(self, dl_id: str, job_id: str) -> Any:
        """The dead letter's row if ``job_id`` took it for replay (its status tells whether
        that replay is still under way), else None."""
        return await self._pool.fetchrow(
            f"select {_COLUMNS} from dead_letters"  # noqa: S608 - constant columns
            " where id = $1 and replay_job = $2",
            dl_id,
            job_id,
        )

    async def abandon_replay(self, dl_id: str, job_id: str) -> None:
        """The dead letter could not be replayed (no function to send it to): as it was."""
        await self._pool.execute(
            "update dead_letters set status = 'dead', replay_count = replay_count - 1,"
            " updated_at = now() where id = $1 and status = 'replaying' and replay_job = $2",
            dl_id,
            job_id,
        )

    async def replay_finished(
        self, dl_id: str, ok: bool, attempts: list[dict[str, Any]], error: tuple[str, str] | None
    ) -> str | None:
        """Resolve the dead letter, or append the replay's attempts to it, and count the
        outcome on its replay job; returns the job."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await self._finish_replay(conn, dl_id, ok, attempts, error)
            # None when it was finished already (a redelivered outcome): counted once.
            job = str(row["replay_job"]) if row and row["replay_job"] else None
            if job is not None:
                column = "succeeded" if ok else "failed"
                await conn.execute(
                    f"update replay_jobs set {column} = {column} + 1, updated_at = now()"  # noqa: S608
                    " where id = $1",
                    job,
                )
        return job

    @staticmethod
    async def _finish_replay(
        conn: Any,
        dl_id: str,
        ok: bool,
        attempts: list[dict[str, Any]],
        error: tuple[str, str] | None,
    ) -> Any:
        if ok:
            return await conn.fetchrow(
                "update dead_letters set status = 'resolved', updated_at = now(),"
                " attempts = attempts || $2::jsonb where id = $1 and status = 'replaying'"
                " returning replay_job",
                dl_id,
                _json(attempts),
            )
        code, message = error or ("error", "")
        return await conn.fetchrow(
            "update dead_letters set status = 'dead', updated_at = now(), failed_at = now(),"
            " attempts = attempts || $2::jsonb, error_code = $3, error_message = $4"
            " where id = $1 and status = 'replaying' returning replay_job",
            dl_id,
            _json(attempts),
            _text(code),
            _text(message),
        )

    async def apply_retention(self, max_age: float, max_count: int) -> int:
        """Delete dead letters older than ``max_age`` seconds, then beyond the newest
        ``max_count`` (0: no limit); never those being replayed."""
        removed = 0
        if max_age > 0:
            status = await self._pool.execute(
                "delete from dead_letters where failed_at < now() - make_interval(secs => $1)"
                " and status <> 'replaying'",
                max_age,
            )
            removed += int(status.split()[-1])
        if max_count > 0:
            status = await self._pool.execute(
                "delete from dead_letters where status <> 'replaying' and id in ("
                " select id from dead_letters order by failed_at desc, id desc offset $1)",
                max_count,
            )
            removed += int(status.split()[-1])
        return removed

    async def find(self, dl_id: str) -> tuple[DeadLetterRecord, str] | None:
        row = await self._pool.fetchrow(
            f"select {_COLUMNS} from dead_letters where id = $1",  # noqa: S608 - constant
            dl_id,
        )
        return None if row is None else (record_of(row), str(row["dlf_status"]))

    async def mark_dead_letter_function_pending(self, dl_id: str) -> None:
        await self._pool.execute(
            "update dead_letters set dlf_status = 'pending', dlf_error = null, updated_at = now()"
            " where id = $1",
            dl_id,
        )

    async def row(self, dl_id: str) -> Any:
        try:
            row = await self._pool.fetchrow(
                f"select {_COLUMNS} from dead_letters where id = $1::uuid",  # noqa: S608
                dl_id,
            )
        except (ValueError, asyncpg.DataError):
            row = None
        if row is None:
            raise NotFound(f"dead letter '{dl_id}' does not exist")
        return row


_BASE64 = "base64"


def attributes_json(attributes: Mapping[str, str]) -> str:
    """The ``attributes`` column: a JSON object of strings, except a value PostgreSQL cannot
    hold as jsonb text, which becomes ``{"base64": ...}`` (see :func:`attributes_of`)."""
    doc: dict[str, Any] = {}
    for name, value in attributes.items():
        if _storable(value):
            doc[_text(name)] = value
        else:
            raw = value.encode("utf-8", "surrogatepass")
            doc[_text(name)] = {_BASE64: base64.b64encode(raw).decode("ascii")}
    return orjson.dumps(doc).decode()


def attributes_of(text: str) -> dict[str, str]:
    """The inverse of :func:`attributes_json`: the original strings."""
    doc = orjson.loads(text)
    return {
        name: value
        if isinstance(value, str)
        else base64.b64decode(value[_BASE64]).decode("utf-8", "surrogatepass")
        for name, value in doc.items()
    }


def _storable(value: str) -> bool:
    if "\x00" in value:
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@overload
def _text(value: str) -> str: ...
@overload
def _text(value: None) -> None: ...
@overload
def _text(value: str | None) -> str | None: ...
def _text(value: str | None) -> str | None:
    """A diagnostic string as PostgreSQL text can take it (NUL, lone surrogates: U+FFFD)."""
    if value is None or _storable(value):
        return value
    cleaned = value.replace("\x00", "\ufffd")
    return cleaned.encode("utf-8", "replace").decode("utf-8")


def _clean(doc: Any) -> Any:
    if isinstance(doc, str):
        return _text(doc)
    if isinstance(doc, dict):
        return {_text(str(k)): _clean(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [_clean(v) for v in doc]
    return doc


def _json(doc: Any) -> str:
    """JSON for a ``jsonb`` column, its strings made storable (see :func:`_text`)."""
    return orjson.dumps(_clean(doc)).decode()


def event_of(row: Any) -> Event:
    return Event(attributes_of(row["attributes"]), bytes(row["data"]))


def record_of(row: Any) -> DeadLetterRecord:
    return DeadLetterRecord(
        id=str(row["id"]),
        invocation_id=row["invocation_id"],
        function=row["function"],
        binding=row["binding"],
        event=event_of(row),
        reason=row["reason"],
        error_code=row["error_code"],
        error_message=row["error_message"],
        attempts=orjson.loads(row["attempts"]),
        enqueued_at=row["enqueued_at"],
        failed_at=row["failed_at"],
        dead_letter_function=row["dead_letter_function"],
        source_name=row["source_name"],
        version=row["version"],
        flow=flow_context_of(row),
    )


def flow_context_of(row: Any) -> dict[str, Any] | None:
    raw = row["flow_context"]
    return None if raw is None else dict(orjson.loads(raw))


def to_document(row: Any) -> dict[str, Any]:
    event = event_of(row)
    doc = {
        "id": str(row["id"]),
        "invocationId": row["invocation_id"],
        "function": row["function"],
        "version": row["version"],
        "binding": row["binding"],
        "source": row["source_name"],
        "status": row["status"],
        "reason": row["reason"],
        "errorCode": row["error_code"],
        "errorMessage": row["error_message"],
        "attempts": orjson.loads(row["attempts"]),
        "enqueuedAt": _iso(row["enqueued_at"]),
        "failedAt": _iso(row["failed_at"]),
        "createdAt": _iso(row["created_at"]),
        "updatedAt": _iso(row["updated_at"]),
        "replayCount": row["replay_count"],
        "replayJob": str(row["replay_job"]) if row["replay_job"] else None,
        "deadLetterFunction": {
            "name": row["dead_letter_function"],
            "status": row["dlf_status"],
            "error": row["dlf_error"],
        },
        "event": _event_json(event),
        # A step of a flow run: {flow, run, step, seq, branch}; a replay goes on with the run.
        "flow": flow_context_of(row),
    }
    return doc


def _event_json(event: Event) -> dict[str, Any]:
    try:
        text = event.structured_bytes()
    except orjson.JSONEncodeError:  # a lone surrogate: shown as U+FFFD (the row keeps it)
        shown = Event({_text(k): _text(v) for k, v in event.attributes.items()}, event.data)
        text = shown.structured_bytes()
    doc = orjson.loads(text)
    if isinstance(doc, dict):
        return doc
    return {"data_base64": base64.b64encode(event.data).decode()}


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")
