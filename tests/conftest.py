"""Shared fixtures: the services (real ones when reachable, else embedded), an isolated
namespace per test, a hub running in-process or as a child process, and a scriptable function.

``EVENTHUB_REQUIRE_SERVICES=1`` (set by CI) turns a missing service into a failure instead of
starting an embedded one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import nats
import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from eventhub.embedded import EmbeddedServices
from eventhub.settings import Scope, Settings
from tests.support import FunctionServer, HubProcess, RunningHub, start_hub

REAL = {
    "database_url": ("127.0.0.1", 5432, "postgresql://postgres@127.0.0.1:5432/test"),
    "nats_url": ("127.0.0.1", 4222, "nats://127.0.0.1:4222"),
    "redis_url": ("127.0.0.1", 6379, "redis://127.0.0.1:6379/0"),
}
# Brokers no wheel can embed: their tests are skipped when the broker is away, unless the
# services are required (EVENTHUB_REQUIRE_SERVICES=1), where that is a failure.
BROKERS = {"rabbitmq": ("RabbitMQ", 5672), "mqtt": ("Mosquitto", 1883)}
TOKEN = "test-admin-token"
ALL_SCOPES = list(Scope)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs(broker): the test talks to rabbitmq or mqtt")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("needs"):
        name, port = BROKERS[marker.args[0]]
        if not _reachable("127.0.0.1", port):
            message = f"{name} is not reachable on 127.0.0.1:{port}"
            if os.environ.get("EVENTHUB_REQUIRE_SERVICES") == "1":
                pytest.fail(message)
            pytest.skip(message + " (and cannot be embedded)")


@pytest.fixture(scope="session")
def service_urls() -> Iterator[dict[str, str]]:
    urls: dict[str, str] = {}
    missing = []
    for field, (host, port, url) in REAL.items():
        if _reachable(host, port):
            urls[field] = url
        else:
            missing.append(field)
    if missing and os.environ.get("EVENTHUB_REQUIRE_SERVICES") == "1":
        pytest.fail(f"required services unreachable: {', '.join(missing)}")
    if not missing:
        yield urls
        return
    embedded = EmbeddedServices(
        nats="nats_url" in missing,
        postgres="database_url" in missing,
        redis="redis_url" in missing,
    )
    loop = asyncio.new_event_loop()
    started = loop.run_until_complete(embedded.start())
    for field in missing:
        urls[field] = getattr(started, field)
    try:
        yield urls
    finally:
        loop.run_until_complete(embedded.stop())
        loop.close()


@pytest.fixture
async def settings(service_urls: dict[str, str]) -> AsyncIterator[Settings]:
    namespace = f"t{uuid.uuid4().hex[:12]}"
    s = Settings(
        database_url=SecretStr(service_urls["database_url"]),
        nats_url=SecretStr(service_urls["nats_url"]),
        redis_url=SecretStr(service_urls["redis_url"]),
        namespace=namespace,
        port=0,
        tokens={
            SecretStr(TOKEN): ALL_SCOPES,
            SecretStr("events-only"): [Scope.EVENTS],
        },
        ack_wait=5.0,
        shutdown_timeout=5.0,
        log_level="warning",
        log_format="console",
    )
    yield s
    await _cleanup(s)


async def _cleanup(s: Settings) -> None:
    conn = await asyncpg.connect(s.database_url.get_secret_value())
    try:
        await conn.execute(f'drop schema if exists "{s.namespace}" cascade')
    finally:
        await conn.close()
    nc = await nats.connect(s.nats_url.get_secret_value())
    try:
        js = nc.jetstream()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(s.stream_name)
    finally:
        await nc.close()
    client = aioredis.from_url(s.redis_url.get_secret_value())
    try:
        keys = [k async for k in client.scan_iter(match=f"{s.namespace}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def function() -> AsyncIterator[FunctionServer]:
    server = FunctionServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def hub(settings: Settings) -> AsyncIterator[RunningHub]:
    async with start_hub(settings, TOKEN) as running:
        yield running


@pytest.fixture
def hub_process(settings: Settings) -> Iterator[HubProcess]:
    processes: list[HubProcess] = []

    def factory() -> HubProcess:
        process = HubProcess(settings, TOKEN)
        processes.append(process)
        return process

    yield factory  # type: ignore[misc]
    for process in processes:
        process.kill()


@pytest.fixture
def settings_factory(settings: Settings) -> Iterator[object]:
    """Hub processes with chosen roles: ``settings_factory("api")``."""
    processes: list[HubProcess] = []

    def factory(*roles: str) -> HubProcess:
        process = HubProcess(settings, TOKEN, *roles)
        processes.append(process)
        return process

    yield factory
    for process in processes:
        process.kill()
