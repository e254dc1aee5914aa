"""``eventhub dev``: the hub on embedded services, with the examples applied and a sample function.

NATS, PostgreSQL and Redis start as child processes from the wheels of the ``dev`` extra, unless
``EVENTHUB_NATS_URL``, ``EVENTHUB_DATABASE_URL`` or ``EVENTHUB_REDIS_URL`` name real ones.

The examples are the package's ``eventhub/examples`` (``config/examples`` in a checkout) unless
``--examples`` names others. Their Functions call the sample function at
``http://127.0.0.1:8090/``; with ``--function-port N`` they call ``http://127.0.0.1:N/`` instead.
A port that is taken fails the command before anything starts, naming the port and its flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib.resources
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import click
from aiohttp import web
from pydantic import SecretStr

from eventhub import db, samplefn
from eventhub.app import Hub, Role, connect
from eventhub.embedded import (
    DEV_EXTRA_HINT,
    EmbeddedServiceError,
    EmbeddedServices,
    EmbeddedUrls,
    missing_packages,
)
from eventhub.errors import EventhubError
from eventhub.logs import configure as configure_logs
from eventhub.resources import Kind, Resource, load_path, parse_resource
from eventhub.settings import Scope, Settings
from eventhub.store import ResourceStore

# Where the examples' Functions expect the sample function (see config/examples/functions.yaml).
SAMPLE_FUNCTION_BASE = "http://127.0.0.1:8090/"


class DevSetupError(EventhubError):
    """``eventhub dev`` cannot start as asked: the message says what to change."""


async def run_dev(
    *,
    port: int,
    function_port: int,
    examples: Path | None,
    data_dir: Path | None,
    stop: asyncio.Event,
) -> None:
    base = Settings()
    explicit = base.model_fields_set
    configure_logs(base.log_level if "log_level" in explicit else "warning", "console")
    wanted = {
        "nats": "nats_url" not in explicit,
        "postgres": "database_url" not in explicit,
        "redis": "redis_url" not in explicit,
    }
    _check_setup(base.host, port, function_port, wanted)
    resources = await asyncio.to_thread(_load_examples, examples, function_port)
    token = base.dev_token.get_secret_value() if base.dev_token else secrets.token_urlsafe(18)
    click.echo("starting embedded services ...")
    async with _embedded(data_dir, wanted) as urls:
        update: dict[str, object] = {
            "port": port,
            "tokens": {**base.tokens, SecretStr(token): list(Scope)},
        }
        if "callback_allow" not in explicit:  # everything runs on this machine
            update["callback_allow"] = ("127.0.0.0/8", "::1")
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
        try:
            site = web.TCPSite(runner, "127.0.0.1", function_port)
            await _bind(site.start(), function_port, "--function-port")
            await _apply_examples(settings, resources)
            async with connect(settings) as services:
                hub = Hub(settings, set(Role), services)
                await _bind(hub.start(), port, "--port")
                try:
                    _banner(settings, token, function_port)  # once the API listens
                    await stop.wait()
                finally:
                    await hub.stop()
        finally:
            await runner.cleanup()


@contextlib.asynccontextmanager
async def _embedded(data_dir: Path | None, wanted: dict[str, bool]) -> AsyncIterator[EmbeddedUrls]:
    services = EmbeddedServices(data_dir, **wanted)
    try:
        urls = await services.start()
    except EmbeddedServiceError as exc:
        raise DevSetupError(exc.summary) from exc
    try:
        yield urls
    finally:
        await services.stop()


def _check_setup(host: str, port: int, function_port: int, wanted: dict[str, bool]) -> None:
    """Fail in one line, before anything starts, on what the user can fix."""
    missing = missing_packages(**wanted)
    if missing:
        raise DevSetupError(
            f"eventhub dev runs its servers from the dev extra, and {', '.join(missing)}"
            f" {'is' if len(missing) == 1 else 'are'} not installed: {DEV_EXTRA_HINT}"
        )
    if port and port == function_port:
        raise DevSetupError(
            f"--port and --function-port are both {port}: give them different ports"
        )
    for bind_host, number, flag in (
        (host, port, "--port"),
        ("127.0.0.1", function_port, "--function-port"),
    ):
        if number and not _port_free(bind_host, number):
            raise _busy(number, flag)


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def _busy(port: int, flag: str) -> DevSetupError:
    return DevSetupError(f"port {port} is already in use: choose another one with {flag}")


async def _bind(starting: Awaitable[None], port: int, flag: str) -> None:
    """The port was free when checked; another process may have taken it since."""
    try:
        await starting
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise _busy(port, flag) from exc
        raise


def _load_examples(examples: Path | None, function_port: int) -> tuple[Path, list[Resource]]:
    path = examples if examples is not None else _packaged_examples()
    if not path.exists():
        raise DevSetupError(f"--examples {path}: no such file or folder")
    resources = [_follow_function_port(r, function_port) for r in load_path(path)]
    return path, resources


def _packaged_examples() -> Path:
    # A regular (or editable) install keeps package data as files: the traversable is a path.
    return Path(str(importlib.resources.files("eventhub") / "examples"))


def _follow_function_port(resource: Resource, function_port: int) -> Resource:
    """A Function calling the sample function's default address calls the chosen port."""
    url = str(resource.spec.get("url", ""))
    if resource.kind is not Kind.FUNCTION or not url.startswith(SAMPLE_FUNCTION_BASE):
        return resource
    moved = f"http://127.0.0.1:{function_port}/{url.removeprefix(SAMPLE_FUNCTION_BASE)}"
    document = resource.document()
    document["spec"]["url"] = moved
    return parse_resource(document, f"Function {resource.name}")


async def _apply_examples(settings: Settings, loaded: tuple[Path, list[Resource]]) -> None:
    path, resources = loaded
    async with db.migrated(settings.database_url.get_secret_value(), settings.namespace) as pool:
        plan = await ResourceStore(pool, settings.namespace).apply(resources, apply_set="examples")
    changed = len(plan.created) + len(plan.updated)
    click.echo(f"applied {len(resources)} example resources from {path} ({changed} changed)")


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
        f"\n  # for the CLI in another shell (eventhub get, stats, rollout, dlq ...):\n"
        f"  export EVENTHUB_DATABASE_URL={settings.database_url.get_secret_value()}\n"
        f"  export EVENTHUB_NATS_URL={settings.nats_url.get_secret_value()}\n"
        f"  export EVENTHUB_REDIS_URL={settings.redis_url.get_secret_value()}\n"
        f"\nCtrl-C stops.\n"
    )
