"""Outages of a dependency: Redis or PostgreSQL killed with -9 for a while under load never
spend an attempt or make an early dead letter, and NATS coming back without its data gets its
stream and consumers again, without a restart of the hub.

Each test starts its own server of the kind it kills (the embedded one) and uses the shared
services for the rest.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from pydantic import SecretStr

from eventhub.embedded import EmbeddedServices
from eventhub.settings import Settings
from tests.conftest import TOKEN
from tests.killable import Server, recorded_launches
from tests.support import Call, FunctionServer, RunningHub, start_hub

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

DOWN = 25.0  # seconds the dependency stays down: several times ack_wait (5 s in tests)
RATE = 6.0  # events a second posted while the test runs
BUDGET = 5  # maxAttempts of every function
FAILURES = 2  # each event fails this many times at "paced" and "flaky" before it succeeds


@contextlib.asynccontextmanager
async def own(service: str) -> AsyncIterator[tuple[str, Server]]:
    """One embedded server of ``service`` (nats, postgres or redis): its URL and process."""
    embedded = EmbeddedServices(
        nats=service == "nats", postgres=service == "postgres", redis=service == "redis"
    )
    with recorded_launches() as servers:
        urls = await embedded.start()
    server = servers[service]
    url = getattr(urls, f"{service}_url" if service != "postgres" else "database_url")
    try:
        yield url, server
    finally:
        await server.stop()
        await embedded.stop()


async def until(check: Callable[[], Awaitable[bool] | bool], wait: float, message: str) -> None:
    deadline = time.monotonic() + wait
    while True:
        done = check()
        if done if isinstance(done, bool) else await done:
            return
        assert time.monotonic() < deadline, message
        await asyncio.sleep(0.2)


class Load:
    """Posts events at a steady rate; remembers those answered 202."""

    def __init__(self, hub: RunningHub) -> None:
        self.hub = hub
        self.accepted: list[str] = []
        self.refused = 0

    async def run(self, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            event_id = f"e{n}"
            n += 1
            try:
                response = await self.hub.post_event(event_id, type_="com.example.outage")
            except Exception:  # refused during the outage: not accepted, go on
                self.refused += 1
            else:
                if response.status == 202:
                    self.accepted.append(event_id)
                else:
                    self.refused += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1 / RATE)


def _transient(function: FunctionServer, path: str) -> Callable[[Call], int | None]:
    def rule(call: Call) -> int | None:
        earlier = sum(1 for c in function.calls_to(path) if c.ce["id"] == call.ce["id"])
        return 503 if earlier <= FAILURES else None  # this call is already in the list

    return rule


async def declare(hub: RunningHub, function: FunctionServer, doomed: bool = False) -> None:
    retry = {"maxAttempts": BUDGET, "initialDelay": "200ms", "maxDelay": "1s", "jitter": 0}
    function.rules["paced"] = _transient(function, "paced")
    function.rules["flaky"] = _transient(function, "flaky")
    await hub.function("paced", function.url("paced"), rateLimit="40/s", retry=retry)
    await hub.function("flaky", function.url("flaky"), retry=retry)
    await hub.bind("to-paced", "paced")
    await hub.bind("to-flaky", "flaky")
    if doomed:
        function.rules["doomed"] = lambda call: 500
        await hub.function("doomed", function.url("doomed"), retry={**retry, "maxAttempts": 2})
        await hub.bind("to-doomed", "doomed")
    for name in ("paced", "flaky", "doomed" if doomed else "paced"):
        await hub.wait_routed(name)


def calls_per_event(function: FunctionServer, path: str) -> collections.Counter[str]:
    return collections.Counter(c.ce["id"] for c in function.calls_to(path))


def all_served(function: FunctionServer, accepted: list[str]) -> bool:
    paced, flaky = calls_per_event(function, "paced"), calls_per_event(function, "flaky")
    return all(min(paced[e], flaky[e]) >= FAILURES + 1 for e in accepted)


async def outage_under_load(hub: RunningHub, server: Server) -> Load:
    """Load before, during and after ``server`` is down for DOWN seconds."""
    load = Load(hub)
    stop = asyncio.Event()
    task = asyncio.create_task(load.run(stop))
    try:
        await asyncio.sleep(3.0)
        await server.kill()
        await asyncio.sleep(DOWN)
        server.start()
        await asyncio.sleep(3.0)
    finally:
        stop.set()
        await task
    return load


async def check_budget(hub: RunningHub, function: FunctionServer, load: Load) -> None:
    assert len(load.accepted) > RATE * 10, f"only {len(load.accepted)} events were accepted"
    await until(
        lambda: all_served(function, load.accepted),
        60.0,
        "not every accepted event reached its functions after the outage",
    )
    assert await hub.dead_letters(function="paced") == []
    assert await hub.dead_letters(function="flaky") == []
    for path in ("paced", "flaky"):
        counts = calls_per_event(function, path)
        worst = max(counts.values())
        assert worst <= BUDGET, f"{path}: an invocation was called {worst} times"
    # Each was called the times it failed and once more (at least once, a call repeated after
    # a crash would be allowed; nothing crashed here).
    assert set(calls_per_event(function, "paced").values()) == {FAILURES + 1}
    assert set(calls_per_event(function, "flaky").values()) == {FAILURES + 1}


def _with(settings: Settings, **urls: str) -> Settings:
    return settings.model_copy(update={k: SecretStr(v) for k, v in urls.items()})


async def test_redis_outage_spends_no_attempts(
    settings: Settings, function: FunctionServer
) -> None:
    async with (
        own("redis") as (url, server),
        start_hub(_with(settings, redis_url=url), TOKEN) as hub,
    ):
        await declare(hub, function)
        load = await outage_under_load(hub, server)
        await check_budget(hub, function, load)


async def test_postgres_outage_spends_no_attempts(
    settings: Settings, function: FunctionServer
) -> None:
    async with (
        own("postgres") as (url, server),
        start_hub(_with(settings, database_url=url), TOKEN) as hub,
    ):
        await declare(hub, function, doomed=True)
        load = await outage_under_load(hub, server)
        await check_budget(hub, function, load)
        # What failed for good became a dead letter once PostgreSQL was back, after exactly
        # its budget of calls, with the error of its last call.
        doomed = calls_per_event(function, "doomed")
        assert set(doomed) == set(load.accepted)
        assert set(doomed.values()) == {2}
        items = await hub.wait_dead_letters(
            len(load.accepted), wait=30.0, function="doomed", limit="500"
        )
        assert len(items) == len(load.accepted)
        assert {(i["reason"], i["errorCode"]) for i in items} == {
            ("attempts-exhausted", "http-500")
        }
        assert {tuple(a["attempt"] for a in i["attempts"]) for i in items} == {(1, 2)}


async def _readyz(hub: RunningHub) -> tuple[int, dict[str, Any]]:
    async with hub.http.get(f"{hub.base_url}/readyz") as response:
        return response.status, await response.json()


async def test_nats_without_its_data_gets_stream_and_consumers_again(
    settings: Settings, function: FunctionServer
) -> None:
    async with own("nats") as (url, server):
        settings = _with(settings, nats_url=url)
        async with start_hub(settings, TOKEN) as hub:
            await hub.function("hello", function.url("hello"))
            await hub.bind("to-hello", "hello")
            await hub.wait_routed("hello")
            assert (await hub.post_event("before")).status == 202
            await function.wait_for(1, "hello")

            # The stream deleted: /readyz is red until it and its consumers are back.
            nc = await nats.connect(url)
            try:
                await nc.jetstream().delete_stream(settings.stream_name)
            finally:
                await nc.close()
            status, body = await _readyz(hub)
            assert status == 503, body
            assert body["checks"]["jetstream"].startswith("failed")
            await until(lambda: _ready(hub), 30.0, "/readyz never became green again")
            assert (await hub.post_event("after-delete")).status == 202
            await function.wait_for(2, "hello", wait=30.0)

            # NATS killed and started again with an empty store.
            await server.kill()
            store = Path(server.argv[server.argv.index("-sd") + 1])
            shutil.rmtree(store, ignore_errors=True)
            server.start()
            await until(lambda: _ready(hub), 45.0, "/readyz never became green after NATS")
            await until(lambda: _accepted(hub, "after-restart"), 30.0, "events refused")
            calls = await function.wait_for(3, "hello", wait=45.0)
            assert [c.ce["id"] for c in calls] == ["before", "after-delete", "after-restart"]


async def _ready(hub: RunningHub) -> bool:
    with contextlib.suppress(Exception):
        status, _ = await _readyz(hub)
        return status == 200
    return False


async def _accepted(hub: RunningHub, event_id: str) -> bool:
    with contextlib.suppress(Exception):
        return (await hub.post_event(event_id)).status == 202
    return False
