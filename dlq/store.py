"""The dead-letter store in PostgreSQL (table ``dead_letters``).

``store`` is idempotent by dead-letter id: a final attempt redelivered after a crash stores the
same row once. Rows keep the original CloudEvent (attributes and data, byte for byte), every
attempt, and the state of the delivery to the dead-letter function.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from eventhub.errors import InvalidInput, NotFound
from eventhub.events import Event
from eventhub.ports import DeadLetterRecord

STATUSES = ("dead", "replaying", "resolved")
_COLUMNS = (
    "id, invocation_id, function, binding, event_source, event_id, event_type, attributes, data,"
    " reason, error_code, error_message, attempts, enqueued_at, failed_at, created_at,"
    " updated_at, status, replay_count, dead_letter_function, dlf_status, dlf_error, source_name"
)


@dataclass(frozen=True)
class DeadLetterQuery:
    function: str | None = None
    binding: str | None = None
    source: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None
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
            " attempts, enqueued_at, failed_at, dead_letter_function, dlf_status, source_name)"
            " values ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11, $12, $13::jsonb,"
            " $14, $15, $16, $17, $18)"
            " on conflict (id) do nothing",
            record.id,
            record.invocation_id,
            record.function,
            record.binding,
            event.source,
            event.id,
            event.type,
            orjson.dumps(dict(event.attributes)).decode(),
            event.data,
            record.reason,
            record.error_code,
            record.error_message,
            orjson.dumps(record.attempts).decode(),
            record.enqueued_at,
            record.failed_at,
            record.dead_letter_function,
            status,
            record.source_name,
        )

    async def dead_letter_function_done(self, dl_id: str, ok: bool, error: str | None) -> None:
        await self._pool.execute(
            "update dead_letters set dlf_status = $2, dlf_error = $3, updated_at = now()"
            " where id = $1",
            dl_id,
            "delivered" if ok else "failed",
            error,
        )

    async def get(self, dl_id: str) -> dict[str, Any]:
        try:
            row = await self._pool.fetchrow(
                f"select {_COLUMNS} from dead_letters where id = $1::uuid",  # noqa: S608 - constant
                dl_id,
            )
        except (ValueError, asyncpg.DataError):
            row = None  # not a UUID: no such dead letter
        if row is None:
            raise NotFound(f"dead letter '{dl_id}' does not exist")
        return to_document(row)

    async def list(self, query: DeadLetterQuery) -> list[dict[str, Any]]:
        clauses: list[str] = []
        args: list[object] = []
        for column, value in (
            ("function", query.function),
            ("binding", query.binding),
            ("source_name", query.source),
            ("status", query.status),
        ):
            if value is not None:
                args.append(value)
                clauses.append(f"{column} = ${len(args)}")
        if query.status is not None and query.status not in STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(STATUSES)}")
        if query.since is not None:
            args.append(query.since)
            clauses.append(f"failed_at >= ${len(args)}")
        if query.until is not None:
            args.append(query.until)
            clauses.append(f"failed_at < ${len(args)}")
        if query.after is not None:
            args.extend(query.after)
            clauses.append(f"(failed_at, id) < (${len(args) - 1}, ${len(args)}::uuid)")
        where = f"where {' and '.join(clauses)}" if clauses else ""
        args.append(query.limit)
        rows = await self._pool.fetch(
            f"select {_COLUMNS} from dead_letters {where}"  # noqa: S608 - built from constants
            f" order by failed_at desc, id desc limit ${len(args)}",
            *args,
        )
        return [to_document(r) for r in rows]


def event_of(row: Any) -> Event:
    return Event(orjson.loads(row["attributes"]), bytes(row["data"]))


def to_document(row: Any) -> dict[str, Any]:
    event = event_of(row)
    doc = {
        "id": str(row["id"]),
        "invocationId": row["invocation_id"],
        "function": row["function"],
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
        "deadLetterFunction": {
            "name": row["dead_letter_function"],
            "status": row["dlf_status"],
            "error": row["dlf_error"],
        },
        "event": _event_json(event),
    }
    return doc


def _event_json(event: Event) -> dict[str, Any]:
    doc = orjson.loads(event.structured_bytes())
    if isinstance(doc, dict):
        return doc
    return {"data_base64": base64.b64encode(event.data).decode()}


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")
