"""``eventhub stats FUNCTION``: what ``GET /v1/functions/{name}/stats`` answers, as a table.

It reads PostgreSQL (does the function exist), NATS (its backlog) and Redis (the counts every
hub process flushes there) directly, like ``eventhub status``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import click
import orjson

from eventhub import db
from eventhub.cli_common import connect_nats, handled, load_settings
from eventhub.resources import Kind
from eventhub.settings import Settings

_COLUMNS = ("VERSION", "WINDOW", "CALLS", "OK", "FAILED", "ERROR%", "RETRIES", "DEAD")
_LATENCIES = ("P50", "P95", "P99")


@click.command()
@click.argument("function")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON document.")
@handled
def stats(function: str, as_json: bool) -> None:
    """A function's calls, failures, retries, dead letters and latency per version over the
    last 5 minutes, hour and 24 hours, summed over every hub process, and its backlog now."""
    doc = asyncio.run(_report(load_settings(), function))
    if as_json:
        click.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    else:
        for line in render(doc):
            click.echo(line)


async def _report(settings: Settings, function: str) -> dict[str, Any]:
    import redis.asyncio as aioredis

    from eventhub.queue import InvocationQueue
    from eventhub.stats import Stats, report
    from eventhub.store import ResourceStore

    async with db.migrated(settings.database_url.get_secret_value(), settings.namespace) as pool:
        await ResourceStore(pool, settings.namespace).lookup(Kind.FUNCTION, function)
    nc = await connect_nats(settings)
    client = aioredis.from_url(settings.redis_url.get_secret_value())
    try:
        stats = Stats(client, settings.namespace)
        return await report(stats, InvocationQueue(nc, settings), function)
    finally:
        await client.aclose()
        await nc.close()


def render(doc: dict[str, Any]) -> list[str]:
    """The document as lines: the backlog, then one row per version and window (``all``: the
    sum of every version)."""
    backlog = doc["backlog"]
    oldest = backlog["oldestWaitingSeconds"]
    lines = [
        f"Function/{doc['name']} backlog: queued={backlog['queued']}"
        f" in-flight={backlog['inFlight']} retrying={backlog['retrying']}"
        f" oldest-waiting={'-' if oldest is None else _duration(oldest)}",
        "",
    ]
    windows: dict[str, Any] = doc["windows"]
    versions = sorted({v for w in windows.values() for v in w["versions"]})
    rows: list[tuple[str, ...]] = [_COLUMNS + _LATENCIES]
    for version in ["all", *versions]:
        for name, window in windows.items():
            figures = window["total"] if version == "all" else window["versions"].get(version)
            if figures is not None:
                rows.append(_row(version, name, figures))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _row(version: str, window: str, f: dict[str, Any]) -> tuple[str, ...]:
    return (
        version,
        window,
        str(f["invocations"]),
        str(f["successes"]),
        str(f["failures"]),
        f"{f['errorRate'] * 100:.1f}%" if f["invocations"] else "-",
        str(f["retries"]),
        str(f["deadLetters"]),
        *(_latency(f[key]) for key in ("p50Ms", "p95Ms", "p99Ms")),
    )


def _latency(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.1f}ms" if ms < 1000 else _duration(ms / 1000)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"
