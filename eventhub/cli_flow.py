"""``eventhub flow runs NAME`` and ``eventhub flow show RUN``: a flow's runs, read from
PostgreSQL with the hub's settings (as ``eventhub apply`` does). A run may be named by the start
of its id, when no other run's id starts the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import click
import orjson

from eventhub import db
from eventhub.cli_common import handled, load_settings
from eventhub.errors import NotFound
from eventhub.flows.runs import RUN_STATUSES, FlowRuns
from eventhub.resources import Kind
from eventhub.settings import Settings

T = TypeVar("T")
_INDENT = orjson.OPT_INDENT_2


def _run(settings: Settings, use: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    async def go() -> T:
        async with db.migrated(
            settings.database_url.get_secret_value(), settings.namespace
        ) as pool:
            return await use(pool)

    return asyncio.run(go())


@click.group()
def flow() -> None:
    """Flows: their runs, and each step a run went through."""


@flow.command()
@click.argument("name")
@click.option("--status", type=click.Choice(RUN_STATUSES), help="Only the runs in this status.")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@handled
def runs(name: str, status: str | None, limit: int, output: str) -> None:
    """A flow's runs, newest first."""
    settings = load_settings()

    async def fetch(pool: Any) -> list[dict[str, Any]]:
        found = FlowRuns(pool)
        items = await found.listing(name, status, limit)
        if not items and not await found.exists(name):
            from eventhub.store import ResourceStore

            await ResourceStore(pool, settings.namespace).lookup(Kind.FLOW, name)
        return items

    try:
        items = _run(settings, fetch)
    except NotFound:
        raise NotFound(f"Flow '{name}' does not exist") from None
    if output == "json":
        click.echo(orjson.dumps({"items": items}, option=_INDENT))
        return
    rows = [("RUN", "STATUS", "TRIGGER", "STARTED", "ENDED", "ERROR")]
    rows += [
        (
            r["id"],
            r["status"],
            r["triggerEventId"],
            r["startedAt"],
            r["endedAt"] or "-",
            _line(r["error"] or ""),
        )
        for r in items
    ]
    _echo_rows(rows)


@flow.command()
@click.argument("run_id", metavar="RUN")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@handled
def show(run_id: str, output: str) -> None:
    """One run: its trigger, its status and every step it entered."""
    doc = _run(load_settings(), lambda pool: FlowRuns(pool).get(run_id))
    if output == "json":
        click.echo(orjson.dumps(doc, option=_INDENT))
        return
    for line in render(doc):
        click.echo(line)


def render(doc: dict[str, Any]) -> list[str]:
    """A run as lines: what started it and how it stands, then one row per step."""
    trigger = doc["triggerEvent"]
    lines = [
        f"Run {doc['id']}",
        f"  flow={doc['flow']}  status={doc['status']}  binding={doc['binding'] or '-'}",
        f"  trigger: id={trigger['id']} source={trigger['source']} type={trigger['type']}",
        f"  started={doc['startedAt']}  ended={doc['endedAt'] or '-'}",
    ]
    if doc["error"]:
        lines.append(f"  error: {_line(doc['error'])}")
    if doc["output"]:
        lines.append(f"  output: {_line(doc['output'])}")
    rows = [("SEQ", "STEP", "KIND", "STATUS", "FUNCTION", "VERSION", "TRIES", "MS", "RESULT")]
    for s in doc["steps"]:
        name = s["name"] if s["branch"] is None else f"{s['name']}[{s['branch']}]"
        result = s["error"] if s["status"] == "failed" else s["output"]
        rows.append(
            (
                str(s["seq"]),
                name,
                s["kind"],
                s["status"],
                s["function"] or "-",
                s["version"] or "-",
                str(s["attempts"]),
                f"{s['durationMs']:.0f}" if s["durationMs"] is not None else "-",
                _line(result or "", 60),
            )
        )
    lines.append("")
    lines += _rows(rows)
    return lines


def _line(text: str, width: int = 120) -> str:
    """One line of at most ``width`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _rows(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _echo_rows(rows: Sequence[tuple[str, ...]]) -> None:
    for line in _rows(rows):
        click.echo(line)
