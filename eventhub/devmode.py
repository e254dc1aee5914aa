"""``eventhub dev``: the hub on embedded services, with the examples applied and a sample function.

NATS, PostgreSQL and Redis start as child processes from their wheels, unless
``EVENTHUB_NATS_URL``, ``EVENTHUB_DATABASE_URL`` or ``EVENTHUB_REDIS_URL`` name real ones.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import click
from aiohttp import web
from pydantic import SecretStr

from eventhub import db, samplefn
from eventhub.app import Hub, Role, connect
from eventhub.embedded import EmbeddedServices
from eventhub.logs import configure as configure_logs
from eventhub.resources import load_path
from eventhub.settings import Scope, Settings
from eventhub.store import ResourceStore


async def run_dev(
    *, port: int, function_port: int, examples: Path, data_dir: Path | None, stop: asyncio.Event
) -> None:
    base = Settings()
    explicit = base.model_fields_set
    configure_logs(base.log_level if "log_level" in explicit else "warning", "console")
    token = base.dev_token.get_secret_value() if base.dev_token else secrets.token_urlsafe(18)
    click.echo("starting embedded services ...")
    async with EmbeddedServices(
        data_dir,
        nats="nats_url" not in explicit,
        postgres="database_url" not in explicit,
        redis="redis_url" not in explicit,
    ) as urls:
        update: dict[str, object] = {
            "port": port,
            "tokens": {SecretStr(token): list(Scope)},
        }
        for field, url in (
            ("nats_url", urls.nats_url),
            ("database_url", urls.database_url),
            ("redis_url", urls.redis_url),
        ):
            if url:
                update[field] = SecretStr(url)
        settings = base.model_copy(update=update)
        runner = web.AppRunner(samplefn.build(click.echo), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", function_port).start()
        try:
            await _apply_examples(settings, examples)
            async with connect(settings) as services:
                hub = Hub(settings, set(Role), services)
                await hub.start()
                try:
                    _banner(settings, token, function_port)  # once the API listens
                    await stop.wait()
                finally:
                    await hub.stop()
        finally:
            await runner.cleanup()


async def _apply_examples(settings: Settings, examples: Path) -> None:
    if not await asyncio.to_thread(examples.exists):
        click.echo(f"no examples at {examples}: nothing applied")
        return
    resources = await asyncio.to_thread(load_path, examples)
    async with db.migrated(settings.database_url.get_secret_value(), settings.namespace) as pool:
        plan = await ResourceStore(pool, settings.namespace).apply(resources, apply_set="examples")
    changed = len(plan.created) + len(plan.updated)
    click.echo(f"applied {len(resources)} example resources from {examples} ({changed} changed)")


def _banner(settings: Settings, token: str, function_port: int) -> None:
    api = f"http://127.0.0.1:{settings.port}"
    click.echo(
        f"\neventhub dev is running\n"
        f"  API:              {api}\n"
        f"  token:            {token}\n"
        f"  sample function:  http://127.0.0.1:{function_port}/{{hello,fail,dead-letters}}\n"
        f"\n  export TOKEN={token}\n"
        f"  curl -i -X POST {api}/v1/functions/hello/invocations"
        f" -H \"Authorization: Bearer $TOKEN\" -d 'hi'\n"
        f"\nCtrl-C stops.\n"
    )
