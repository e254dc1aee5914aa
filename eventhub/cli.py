"""The ``eventhub`` command.

Every command reads the same settings (``EVENTHUB_*`` or ``EVENTHUB_SETTINGS_FILE``). A failure
prints one line to stderr and exits non-zero; no traceback reaches the user.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import click
import orjson
import yaml

from eventhub import db
from eventhub.cli_common import T, connect_nats, fail, handled, load_settings
from eventhub.cli_dlq import dlq
from eventhub.cli_flow import flow
from eventhub.cli_rollout import rollout
from eventhub.cli_stats import stats
from eventhub.logs import configure as configure_logs
from eventhub.resources import Kind, load_path
from eventhub.settings import Settings


@click.group()
@click.version_option(package_name="eventhub")
def main() -> None:
    """eventhub: CloudEvents in, functions invoked at least once, dead letters kept."""


main.add_command(dlq)
main.add_command(stats)
main.add_command(rollout)
main.add_command(flow)


@main.command()
@click.option(
    "--role",
    "roles",
    multiple=True,
    type=click.Choice(["api", "dispatch", "ingest"]),
    help="Run only these roles (repeatable). Default: all.",
)
@handled
def run(roles: tuple[str, ...]) -> None:
    """Run the hub: HTTP API, dispatcher and connectors, until SIGTERM."""
    from eventhub.app import Role, serve

    settings = load_settings()
    configure_logs(settings.log_level, settings.log_format)
    chosen = {Role(r) for r in roles} or set(Role)
    _run_until_signal(lambda stop: serve(settings, chosen, stop))


def _run_until_signal(main_coro: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = {"count": 0}

        def on_signal() -> None:
            signals["count"] += 1
            if signals["count"] > 1:
                os._exit(130)  # a second signal forces exit
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await main_coro(stop)

    asyncio.run(runner())


@main.command()
@handled
def migrate() -> None:
    """Apply the database migrations not yet applied."""
    settings = load_settings()

    async def go() -> list[str]:
        pool = await db.connect(settings.database_url.get_secret_value(), settings.namespace)
        try:
            return await db.migrate(pool, settings.namespace)
        finally:
            await pool.close()

    applied = asyncio.run(go())
    click.echo(
        f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else "")
    )


@main.command()
@click.option("-f", "--filename", "path", required=True, type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Validate and show the changes; change nothing.")
@click.option("--prune", is_flag=True, help="Delete resources of this set no longer declared.")
@click.option("--set", "apply_set", default="default", show_default=True, help="Name of the set.")
@handled
def apply(path: Path, dry_run: bool, prune: bool, apply_set: str) -> None:
    """Create or update the resources in a YAML file or folder."""
    if not path.exists():
        fail(f"{path}: no such file or folder")
    resources = load_path(path)
    settings = load_settings()
    plan = asyncio.run(
        _with_store(
            settings,
            lambda store: store.apply(resources, apply_set=apply_set, prune=prune, dry_run=dry_run),
        )
    )
    suffix = " (dry run)" if dry_run else ""
    for verb, names in (
        ("created", plan.created),
        ("configured", plan.updated),
        ("unchanged", plan.unchanged),
        ("pruned", plan.pruned),
    ):
        for name in names:
            click.echo(f"{name} {verb}{suffix}")


@main.command()
@click.argument("kind", type=click.Choice(["functions", "sources", "bindings", "flows"]))
@click.argument("name", required=False)
@click.option("-o", "--output", type=click.Choice(["table", "yaml", "json"]), default="table")
@handled
def get(kind: str, name: str | None, output: str) -> None:
    """List resources, or show one. A stored resource that no longer validates is shown too,
    with its error: in the table's INVALID section, in YAML and JSON as ``status.invalid``."""
    settings = load_settings()
    k = {x.plural: x for x in Kind}[kind]

    async def fetch(store: Any) -> list[Any]:
        return [await store.lookup(k, name)] if name else list(await store.listing(k))

    resources = asyncio.run(_with_store(settings, fetch))
    docs = [r.document() for r in resources]
    if output == "json":
        click.echo(orjson.dumps(docs[0] if name else {"items": docs}, option=orjson.OPT_INDENT_2))
    elif output == "yaml":
        click.echo(yaml.safe_dump_all(docs, sort_keys=False), nl=False)
    else:
        _table(k, docs)


def _pausable() -> click.Choice[str]:
    return click.Choice(["function", "source", "binding"])


@main.command()
@click.argument("kind", type=_pausable())
@click.argument("name")
@handled
def pause(kind: str, name: str) -> None:
    """Pause a function (hold all its invocations, from every source, in the queue), a
    source (stop taking from it) or a binding (hold its invocations)."""
    _set_paused(kind, name, paused=True)


@main.command()
@click.argument("kind", type=_pausable())
@click.argument("name")
@handled
def resume(kind: str, name: str) -> None:
    """Resume a paused function, source or binding; what was held is sent on."""
    _set_paused(kind, name, paused=False)


def _set_paused(kind: str, name: str, *, paused: bool) -> None:
    settings = load_settings()
    k = {"function": Kind.FUNCTION, "source": Kind.SOURCE}.get(kind, Kind.BINDING)
    asyncio.run(_with_store(settings, lambda store: store.set_paused(k, name, paused)))
    click.echo(f"{k.value}/{name} {'paused' if paused else 'resumed'}")


@main.command()
@click.argument("words", nargs=-1, required=True, metavar="[source|function] NAME")
@handled
def status(words: tuple[str, ...]) -> None:
    """Show what each ingest process reports about a source, or a function's backlog."""
    if len(words) == 2 and words[0] in ("source", "function"):
        kind, name = words
    elif len(words) == 1:
        kind, name = "source", words[0]
    else:
        fail("usage: eventhub status [source|function] NAME")
    if kind == "function":
        _function_status(name)
    else:
        _source_status(name)


def _function_status(name: str) -> None:
    from eventhub.queue import InvocationQueue

    settings = load_settings()

    async def go() -> tuple[Any, dict[str, int]]:
        resource = await _with_store(settings, lambda store: store.get(Kind.FUNCTION, name))
        nc = await connect_nats(settings)
        try:
            return resource, await InvocationQueue(nc, settings).function_status(name)
        finally:
            await nc.close()

    resource, backlog = asyncio.run(go())
    click.echo(
        f"Function/{name} paused={str(resource.paused).lower()}"
        f" maxConcurrency={resource.model.max_concurrency} queued={backlog['queued']}"
        f" in-flight={backlog['inFlight']}"
        f" retrying={backlog['retrying']}"
    )


def _source_status(name: str) -> None:
    import redis.asyncio as aioredis

    from eventhub.sources import read_status

    settings = load_settings()

    async def go() -> tuple[Any, list[dict[str, Any]]]:
        resource = await _with_store(settings, lambda store: store.get(Kind.SOURCE, name))
        client = aioredis.from_url(settings.redis_url.get_secret_value())
        try:
            return resource, await read_status(client, settings.namespace, name)
        finally:
            await client.aclose()

    resource, processes = asyncio.run(go())
    click.echo(f"Source/{name} type={resource.model.type} paused={str(resource.paused).lower()}")
    if not processes:
        click.echo("  no ingest process has reported it in the last 15 s")
    for p in processes:
        click.echo(
            f"  {p['process']}: {p['state']} events={p['eventsIn']} restarts={p['restarts']}"
            f" throttled={str(p['throttled']).lower()} lag={p['lag']}"
            f" last-error={p['lastError'] or '-'}"
        )


def _table(kind: Kind, all_docs: list[dict[str, Any]]) -> None:
    invalid = [d for d in all_docs if d.get("status", {}).get("invalid")]
    docs = [d for d in all_docs if not d.get("status", {}).get("invalid")]
    if docs or not invalid:
        _valid_table(kind, docs)
    if invalid:
        if docs:
            click.echo("")
        click.echo("INVALID (stored, but skipped by routing until fixed or deleted):")
        _echo_rows(
            [("NAME", "ERROR")] + [(d["metadata"]["name"], d["status"]["error"]) for d in invalid]
        )


def _valid_table(kind: Kind, docs: list[dict[str, Any]]) -> None:
    if kind is Kind.FUNCTION:
        rows = [("NAME", "DEFAULT", "URL", "VERSIONS", "CONCURRENCY", "RATE", "DEAD-LETTER")] + [
            (
                d["metadata"]["name"],
                d["spec"].get("default", "latest"),
                d["spec"].get("url", "-"),
                ",".join(d["spec"].get("versions") or {}) or "-",
                str(d["spec"].get("maxConcurrency", 10)),
                str(d["spec"].get("rateLimit", "-")),
                (d["spec"].get("deadLetter") or {}).get("function", "-"),
            )
            for d in docs
        ]
    elif kind is Kind.BINDING:
        rows = [("NAME", "SOURCE", "FUNCTION", "FILTERS")] + [
            (
                d["metadata"]["name"],
                d["spec"].get("source") or "(dependencies)",
                d["spec"].get("function") or f"flow:{d['spec'].get('flow')}",
                str(len(d["spec"].get("filter") or [])),
            )
            for d in docs
        ]
    elif kind is Kind.FLOW:
        rows = [("NAME", "STEPS", "FIRST")] + [
            (
                d["metadata"]["name"],
                str(len(d["spec"]["steps"])),
                d["spec"]["steps"][0]["name"],
            )
            for d in docs
        ]
    else:
        rows = [("NAME", "TYPE")] + [(d["metadata"]["name"], d["spec"]["type"]) for d in docs]
    _echo_rows(rows)


def _echo_rows(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


async def _with_store(settings: Settings, use: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    from eventhub.store import ResourceStore

    async with db.migrated(settings.database_url.get_secret_value(), settings.namespace) as pool:
        return await use(ResourceStore(pool, settings.namespace))


@main.command()
@click.option("--port", default=8080, show_default=True, help="Port of the HTTP API.")
@click.option(
    "--function-port", default=8090, show_default=True, help="Port of the sample function."
)
@click.option(
    "--examples",
    type=click.Path(path_type=Path),
    default=None,
    help="Resources to apply at start (default: the examples shipped with eventhub).",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Keep the embedded services' data here between runs (default: a temporary folder).",
)
@handled
def dev(port: int, function_port: int, examples: Path | None, data_dir: Path | None) -> None:
    """Run the hub on embedded NATS, PostgreSQL and Redis, with a sample function."""
    from eventhub.devmode import run_dev

    _run_until_signal(
        lambda stop: run_dev(
            port=port,
            function_port=function_port,
            examples=examples,
            data_dir=data_dir,
            stop=stop,
        )
    )
