"""``eventhub rollout``: canary rollouts from the command line (start, list, get, pause, resume,
abort). Like ``apply``, it talks to PostgreSQL directly with the hub's settings (and to Redis for
the figures of a step it ends); the hub's dispatch processes drive the rollouts. A rollout may be
named by the start of its id, when no other id starts the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import click
import orjson

from eventhub import db
from eventhub.cli_common import handled, load_settings
from eventhub.errors import InvalidInput
from eventhub.rollout import Rollout, Rollouts, parse_request
from eventhub.rollout.store import STATES
from eventhub.settings import Settings

T = TypeVar("T")
# A request's field, as the option that sets it.
_OPTIONS = {
    "steps": "--steps",
    "interval": "--interval",
    "analysis.maxErrorRate": "--max-error-rate",
    "analysis.maxLatencyRatio": "--max-latency-ratio",
    "analysis.minCalls": "--min-calls",
    "alias": "--alias",
    "to": "--to",
}


def _run(settings: Settings, use: Callable[[Rollouts], Coroutine[Any, Any, T]]) -> T:
    import redis.asyncio as aioredis

    from eventhub.stats import Stats
    from eventhub.store import ResourceStore

    async def go() -> T:
        dsn = settings.database_url.get_secret_value()
        client = aioredis.from_url(settings.redis_url.get_secret_value())
        try:
            async with db.migrated(dsn, settings.namespace) as pool:
                stats = Stats(client, settings.namespace)
                return await use(Rollouts(pool, ResourceStore(pool, settings.namespace), stats))
        finally:
            await client.aclose()

    return asyncio.run(go())


@click.group()
def rollout() -> None:
    """Canary rollouts on a function's alias: the canary's weight grows step by step while its
    error rate and latency hold against the stable version; then the alias is promoted."""


@rollout.command()
@click.argument("function")
@click.option("--alias", required=True, help="The alias (pointing at the stable version).")
@click.option("--to", "to", required=True, help="The canary: another version of FUNCTION.")
@click.option("--steps", default="10,25,50,100", show_default=True, help="Canary weights.")
@click.option("--interval", default="1m", show_default=True, help="Each step lasts at least.")
@click.option("--max-error-rate", type=float, default=0.05, show_default=True)
@click.option(
    "--max-latency-ratio",
    type=float,
    default=1.5,
    show_default=True,
    help="The canary's p95 may be at most this times the stable version's.",
)
@click.option(
    "--min-calls",
    type=int,
    default=20,
    show_default=True,
    help="Canary calls a step needs before it is judged.",
)
@click.option(
    "--on-rollback",
    type=click.Choice(["stable", "dead-letter"]),
    default="stable",
    show_default=True,
    help="What becomes of invocations still queued for the canary if it is rolled back.",
)
@handled
def start(
    function: str,
    alias: str,
    to: str,
    steps: str,
    interval: str,
    max_error_rate: float,
    max_latency_ratio: float,
    min_calls: int,
    on_rollback: str,
) -> None:
    """Start a canary rollout of FUNCTION's alias to version --to."""
    body = {
        "alias": alias,
        "to": to,
        "steps": _steps(steps),
        "interval": interval,
        "analysis": {
            "maxErrorRate": max_error_rate,
            "maxLatencyRatio": max_latency_ratio,
            "minCalls": min_calls,
        },
        "onRollback": on_rollback,
    }
    try:
        request = parse_request(body)
    except InvalidInput as exc:
        raise _as_option(exc) from None
    found = _run(load_settings(), lambda r: r.start(function, request))
    click.echo(
        f"rollout {found.id} started: {function}:{alias} {found.stable} -> {found.canary}"
        f" at {found.weight}%"
    )


@rollout.command(name="list")
@click.option("--function", help="Only this function's.")
@click.option("--state", type=click.Choice(STATES), help="Only those in this state.")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@handled
def list_(function: str | None, state: str | None, limit: int, output: str) -> None:
    """Rollouts, newest first."""
    found = _run(load_settings(), lambda r: r.listing(function, state, limit))
    if output == "json":
        click.echo(orjson.dumps({"items": [r.document() for r in found]}, option=_INDENT))
        return
    rows = [("ID", "FUNCTION", "ALIAS", "STABLE", "CANARY", "STATE", "STEP", "WEIGHT", "CREATED")]
    for r in found:
        doc = r.document()
        rows.append(
            (
                r.id,
                r.function,
                r.alias,
                r.stable,
                r.canary,
                r.state,
                f"{r.step + 1}/{len(r.steps)}",
                f"{r.weight}%",
                doc["createdAt"],
            )
        )
    _echo_rows(rows)


@rollout.command()
@click.argument("rollout_id", metavar="ID")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@handled
def get(rollout_id: str, output: str) -> None:
    """One rollout: where it is, and the figures of each step ended."""
    found = _run(load_settings(), lambda r: r.resolve(rollout_id))
    if output == "json":
        click.echo(orjson.dumps(found.document(), option=_INDENT))
    else:
        for line in render(found):
            click.echo(line)


@rollout.command()
@click.argument("rollout_id", metavar="ID")
@handled
def pause(rollout_id: str) -> None:
    """Hold the canary's weight where it is; nothing is judged until resumed."""
    found = _run(load_settings(), lambda r: _then(r, rollout_id, r.pause))
    click.echo(f"rollout {found.id} paused at {found.weight}%")


@rollout.command()
@click.argument("rollout_id", metavar="ID")
@handled
def resume(rollout_id: str) -> None:
    """Resume a paused rollout; its current step starts over."""
    found = _run(load_settings(), lambda r: _then(r, rollout_id, r.resume))
    click.echo(f"rollout {found.id} resumed at {found.weight}%")


@rollout.command()
@click.argument("rollout_id", metavar="ID")
@click.option("--reason", help="Why (kept with the rollout).")
@handled
def abort(rollout_id: str, reason: str | None) -> None:
    """Abort a rollout: the alias goes back to the stable version alone."""
    found = _run(
        load_settings(), lambda r: _then(r, rollout_id, lambda i: r.abort(i, reason or None))
    )
    click.echo(f"rollout {found.id} aborted: {found.function}:{found.alias} is {found.stable}")


async def _then(
    rollouts: Rollouts, text: str, change: Callable[[str], Coroutine[Any, Any, Rollout]]
) -> Rollout:
    return await change((await rollouts.resolve(text)).id)


def render(r: Rollout) -> list[str]:
    """A rollout as lines: what it does, where it is, then one row per step ended."""
    doc = r.document()
    a = r.analysis
    lines = [
        f"Rollout {r.id}",
        f"  {r.function}:{r.alias}  {r.stable} -> {r.canary}  state={r.state}"
        f"  step={r.step + 1}/{len(r.steps)}  weight={r.weight}%",
        f"  steps={','.join(map(str, r.steps))}  interval={r.interval:g}s"
        f"  maxErrorRate={a.max_error_rate:g}  maxLatencyRatio={a.max_latency_ratio:g}"
        f"  minCalls={a.min_calls}  onRollback={r.on_rollback}",
        f"  created={doc['createdAt']}  stepStarted={doc['stepStartedAt']}",
    ]
    if r.reason:
        lines.append(f"  reason: {r.reason}")
    if not r.history:
        return lines
    rows = [("STEP", "WEIGHT", "VERDICT", "CANARY", "STABLE", "ENDED", "REASON")]
    for item in r.history:
        rows.append(
            (
                str(item["step"] + 1),
                f"{item['weight']}%",
                item["verdict"],
                _figures(item.get("canary")),
                _figures(item.get("stable")),
                item["endedAt"],
                item.get("reason") or "",
            )
        )
    lines.append("")
    lines += _rows(rows)
    return lines


def _figures(f: dict[str, Any] | None) -> str:
    if f is None:
        return "-"
    p95 = "-" if f["p95Ms"] is None else f"{f['p95Ms']:.1f}ms"
    return f"{f['calls']} calls {f['errorRate'] * 100:.1f}% err p95 {p95}"


def _steps(text: str) -> list[Any]:
    out: list[Any] = []
    for part in text.split(","):
        try:
            out.append(int(part.strip()))
        except ValueError:
            raise InvalidInput(
                f"--steps: '{text}' is not a list of whole percentages such as 10,25,50,100"
            ) from None
    return out


def _as_option(exc: InvalidInput) -> InvalidInput:
    """The same error, naming the option rather than the request's field."""
    if not exc.problems:
        return exc
    problem = exc.problems[0]
    name = problem.field.split("[", 1)[0]
    return InvalidInput(f"{_OPTIONS.get(name, problem.field)}: {problem.message}")


_INDENT = orjson.OPT_INDENT_2


def _rows(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _echo_rows(rows: Sequence[tuple[str, ...]]) -> None:
    for line in _rows(rows):
        click.echo(line)
