"""``eventhub dlq``: dead letters from the command line (list, show, stats, replay, purge,
resend, jobs, cancel). Like ``apply``, it talks to PostgreSQL (and, to publish, to NATS)
directly with the hub's settings; replays run in the hub's dispatch processes."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
import orjson

from dlq.replay import ReplayJobs, ReplayPlan, check_target
from dlq.store import DeadLetterFilter, DeadLetterQuery, DeadLetterStore, record_of
from eventhub import db
from eventhub.cli_common import connect_nats, handled, load_settings
from eventhub.errors import Conflict, InvalidInput
from eventhub.invocations import to_dead_letter_function
from eventhub.queue import InvocationQueue
from eventhub.resources import Kind
from eventhub.routing import Routes
from eventhub.settings import Settings
from eventhub.store import ResourceStore
from eventhub.units import parse_rate, parse_time

T = TypeVar("T")


@dataclass
class _Tools:
    store: DeadLetterStore
    jobs: ReplayJobs
    resources: ResourceStore


def _run(settings: Settings, use: Callable[[_Tools], Coroutine[Any, Any, T]]) -> T:
    async def go() -> T:
        dsn = settings.database_url.get_secret_value()
        async with db.migrated(dsn, settings.namespace) as pool:
            store = DeadLetterStore(pool)
            tools = _Tools(store, ReplayJobs(pool, store), ResourceStore(pool, settings.namespace))
            return await use(tools)

    return asyncio.run(go())


def _time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError:
        raise InvalidInput(
            f"--{name}: '{value}' is not a time such as 2024-05-01T12:00:00Z"
        ) from None


def _filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option("--function", help="Only this function's."),
            click.option("--version", help="Only those that called this version (e.g. v4)."),
            click.option("--binding", help="Only this binding's."),
            click.option("--source", help="Only this source's (messages it could not take)."),
            click.option(
                "--status", type=click.Choice(["dead", "replaying", "resolved"]), help="Status."
            ),
            click.option("--error-code", help="e.g. http-500, timeout, connection."),
            click.option("--reason", help="non-retryable, attempts-exhausted, event-expired..."),
            click.option("--since", help="Failed at or after (RFC 3339)."),
            click.option("--until", help="Failed before (RFC 3339)."),
        ]
    ):
        func = option(func)
    return func


def _id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidInput(f"'{value[:60]}' is not a dead-letter or job id") from None


def _filter(ids: tuple[str, ...], **options: Any) -> DeadLetterFilter:
    chosen = {k: v for k, v in options.items() if v is not None}
    if ids and chosen:
        raise InvalidInput("give dead-letter ids or filter options, not both")
    if ids:
        return DeadLetterFilter(ids=tuple(_id(i) for i in ids))
    return DeadLetterFilter(
        function=options.get("function"),
        version=options.get("version"),
        binding=options.get("binding"),
        source=options.get("source"),
        status=options.get("status"),
        error_code=options.get("error_code"),
        reason=options.get("reason"),
        since=_time(options.get("since"), "since"),
        until=_time(options.get("until"), "until"),
    )


def _json(doc: object) -> None:
    click.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@click.group()
def dlq() -> None:
    """Dead letters: inspect, replay, purge."""


@dlq.command("list")
@handled
@_filter_options
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def list_(limit: int, as_json: bool, **options: Any) -> None:
    """List dead letters, newest first."""
    which = _filter((), **options)
    items = _run(
        load_settings(), lambda t: t.store.page(DeadLetterQuery(filter=which, limit=limit))
    )
    if as_json:
        _json({"items": items})
        return
    rows = [("ID", "FAILED AT", "FUNCTION", "ERROR", "REASON", "ATTEMPTS", "STATUS")]
    rows += [
        (
            d["id"],
            d["failedAt"][:19].replace("T", " "),
            d["function"] or f"(source {d['source']})",
            d["errorCode"],
            d["reason"],
            str(len(d["attempts"])),
            d["status"],
        )
        for d in items
    ]
    _table(rows)


@dlq.command()
@handled
@click.argument("dead_letter_id")
@click.option("--json", "as_json", is_flag=True)
def show(dead_letter_id: str, as_json: bool) -> None:
    """One dead letter: the event, every attempt, the dead-letter function's outcome."""
    doc = _run(load_settings(), lambda t: t.store.get(_id(dead_letter_id)))
    if as_json:
        _json(doc)
        return
    dlf = doc["deadLetterFunction"]
    click.echo(f"dead letter {doc['id']}  ({doc['status']}, replayed {doc['replayCount']} times)")
    click.echo(f"  function    {doc['function']}  binding {doc['binding'] or '-'}")
    click.echo(f"  reason      {doc['reason']}: {doc['errorMessage']}")
    click.echo(f"  failed at   {doc['failedAt']}  (enqueued {doc['enqueuedAt']})")
    click.echo(f"  dead-letter function {dlf['name'] or '-'}: {dlf['status']} {dlf['error'] or ''}")
    click.echo("event:")
    click.echo(orjson.dumps(doc["event"], option=orjson.OPT_INDENT_2).decode())
    rows = [("ATTEMPT", "STARTED", "LATENCY", "STATUS", "ERROR", "RESPONSE")]
    for a in doc["attempts"]:
        rows.append(
            (
                str(a.get("attempt")),
                str(a.get("startedAt", ""))[:23],
                f"{a.get('latencyMs', 0):.1f} ms",
                str(a.get("status") or "-"),
                str(a.get("error") or "-"),
                str(a.get("response") or "")[:60].replace("\n", " "),
            )
        )
    click.echo("attempts:")
    _table(rows)


@dlq.command()
@handled
@click.option("--json", "as_json", is_flag=True)
def stats(as_json: bool) -> None:
    """Counts by function and error, oldest and newest."""
    doc = _run(load_settings(), lambda t: t.store.stats(datetime.now(UTC)))
    if as_json:
        _json(doc)
        return
    click.echo(f"{doc['total']} dead letters (not resolved)")
    click.echo(f"  oldest {doc['oldest'] or '-'}  newest {doc['newest'] or '-'}")
    rows = [("FUNCTION", "ERROR", "REASON", "COUNT")]
    rows += [
        (e["function"] or "-", e["errorCode"], e["reason"], str(e["count"])) for e in doc["byError"]
    ]
    _table(rows)


@dlq.command()
@handled
@click.argument("ids", nargs=-1)
@_filter_options
@click.option(
    "--to", "to", help="Send them to this target instead: f, f:version or f:alias (e.g. f:v3)."
)
@click.option("--rate", default="50/s", show_default=True, help="At most this many per period.")
@click.option("--dry-run", is_flag=True, help="Show how many would be replayed, and a sample.")
@click.option("--follow", is_flag=True, help="Show the job's progress until it ends.")
def replay(
    ids: tuple[str, ...], to: str | None, rate: str, dry_run: bool, follow: bool, **options: Any
) -> None:
    """Replay dead letters, by ids or by filter (status dead unless --status), as a job run
    by the hub."""
    which = _filter(ids, **options)
    if which.ids is None and which.status is None:
        which = replace(which, status="dead")  # not what a replay already resolved
    try:
        per_second = parse_rate(rate).per_second
    except ValueError as exc:
        raise InvalidInput(f"--rate: {exc}") from None
    settings = load_settings()
    if dry_run:

        async def preview_of(t: _Tools) -> dict[str, Any]:
            if to is not None:
                functions = {r.name: r.model for r in await t.resources.of_kind(Kind.FUNCTION)}
                check_target(to, functions)
            return await t.jobs.preview(which)

        preview = _run(settings, preview_of)
        click.echo(f"{preview['count']} dead letters would be replayed (dry run); a sample:")
        for d in preview["sample"]:
            click.echo(f"  {d['id']}  {d['function']}  {d['errorCode']}  {d['event']['id']}")
        return

    async def create(t: _Tools) -> dict[str, Any]:
        functions = {r.name: r.model for r in await t.resources.of_kind(Kind.FUNCTION)}
        return await t.jobs.create(ReplayPlan(which, to, per_second), functions)

    job = _run(settings, create)
    click.echo(f"replay job {job['id']}: {job['total']} dead letters at {rate}")
    if follow:
        _follow(settings, job["id"])


def _follow(settings: Settings, job_id: str) -> None:
    async def watch(t: _Tools) -> dict[str, Any]:
        with click.progressbar(length=1, label="replaying", file=sys.stderr) as bar:
            done = 0
            while True:
                job = await t.jobs.get(job_id)
                bar.length = max(1, job["total"])
                bar.update(job["processed"] - done)
                done = job["processed"]
                if job["status"] in ("done", "cancelled", "failed"):
                    return job
                await asyncio.sleep(0.5)

    job = _run(settings, watch)
    click.echo(
        f"{job['status']}: {job['published']} replayed, {job['skipped']} skipped,"
        f" {job['succeeded']} succeeded, {job['failed']} failed so far"
    )


@dlq.command()
@handled
@click.argument("ids", nargs=-1)
@_filter_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--dry-run", is_flag=True, help="Only count.")
def purge(ids: tuple[str, ...], yes: bool, dry_run: bool, **options: Any) -> None:
    """Delete dead letters, by ids or by filter (not those being replayed)."""
    which = _filter(ids, **options)
    settings = load_settings()
    count = _run(settings, lambda t: t.store.count(which))
    if dry_run:
        click.echo(f"{count} dead letters would be purged (dry run)")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise InvalidInput(f"this would purge {count} dead letters: confirm with --yes")
        click.confirm(f"Purge {count} dead letters?", abort=True)
    purged = _run(settings, lambda t: t.store.purge(which))
    click.echo(f"purged {purged} dead letters")


@dlq.command()
@handled
def jobs() -> None:
    """Recent replay jobs and their progress."""
    items = _run(load_settings(), lambda t: t.jobs.recent())
    rows = [("JOB", "STATUS", "DONE", "TOTAL", "SKIPPED", "SUCCEEDED", "FAILED", "TO", "CREATED")]
    rows += [
        (
            j["id"],
            j["status"],
            str(j["processed"]),
            str(j["total"]),
            str(j["skipped"]),
            str(j["succeeded"]),
            str(j["failed"]),
            j["to"] or "-",
            j["createdAt"][:19],
        )
        for j in items
    ]
    _table(rows)


@dlq.command()
@handled
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Stop a replay job (what it already replayed stays replayed)."""
    job = _run(load_settings(), lambda t: t.jobs.cancel(_id(job_id)))
    click.echo(f"replay job {job['id']}: {job['status']}")


@dlq.command()
@handled
@click.argument("dead_letter_id")
def resend(dead_letter_id: str) -> None:
    """Send a dead letter to its dead-letter function again."""
    settings = load_settings()

    async def go(t: _Tools) -> None:
        record = record_of(await t.store.row(_id(dead_letter_id)))
        if not record.dead_letter_function:
            raise Conflict(f"dead letter '{record.id}' has no dead-letter function")
        routes = Routes.build(await t.resources.of_kind(Kind.FUNCTION))
        url = routes.call_url(record.function, record.version)
        invocation = routes.aim(to_dead_letter_function(record, url, str(uuid.uuid4())))
        async with _queue(settings) as queue:
            await t.store.mark_dead_letter_function_pending(record.id)
            await queue.publish(invocation)

    _run(settings, go)
    click.echo(f"dead letter {dead_letter_id} sent to its dead-letter function again")


@contextlib.asynccontextmanager
async def _queue(settings: Settings) -> AsyncIterator[InvocationQueue]:
    nc = await connect_nats(settings)
    try:
        yield InvocationQueue(nc, settings)
    finally:
        await nc.drain()
