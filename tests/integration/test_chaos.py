"""Chaos: two hub processes on their own NATS, PostgreSQL and Redis, under a steady load. NATS
(its JetStream store kept), Redis, PostgreSQL, one hub process and the function are each killed
with -9 and started again, in turn. Then:
- every invocation answered 202 reached the function;
- none was dead-lettered (the function always succeeds in the end, and its budget is ample);
- under 0.5 % of them reached it more than once;
- both hub processes are alive, and each takes and delivers new work.

Requests refused during an outage (503, connection errors, timeouts) were not accepted: the load
counts them and goes on. The function runs in a child process that appends each call to a file,
so that it too can be killed.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from eventhub.embedded import EmbeddedServices, EmbeddedUrls
from eventhub.settings import Scope, Settings
from tests.killable import Server, recorded_launches
from tests.support import HubProcess, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes in /proc"),
]

TOKEN = "chaos-token"
RATE = 45.0  # requests a second; each event makes 2 invocations, each direct invocation 1
STEADY = 4.0  # seconds of load before each kill
DOWN = 3.0  # seconds each component stays down
RECOVER = 60.0  # at most this long for both hubs to be ready again
DRAIN = 60.0  # at most this long for the backlog to reach the function at the end
# Ample: a call refused while the function is down is retried about 7 times before it is back,
# and each kill of NATS or of a hub may count one delivery more; a budget burnt by an outage of
# Redis or PostgreSQL would still show as dead letters.
RETRY = {"maxAttempts": 25, "initialDelay": "200ms", "maxDelay": "2s"}
ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ the function, a child process


def serve_function(port: int, calls: str) -> None:
    """Answers 200 to every POST, after appending ``path invocation-id attempt`` to ``calls``
    (one write per call, unbuffered: a kill -9 loses no line that was answered)."""
    fd = os.open(calls, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        headers = request.headers
        line = f"{request.match_info['path']} {headers['Eventhub-Invocation-Id']}"
        os.write(fd, f"{line} {headers['Eventhub-Attempt']}\n".encode())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/{path}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


class FunctionProcess:
    def __init__(self, calls: Path) -> None:
        self.port = free_port()
        self.calls = calls
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def launch(self) -> None:
        args = [sys.executable, "-m", "tests.integration.test_chaos", str(self.port)]
        self.process = subprocess.Popen(
            [*args, str(self.calls)], cwd=ROOT, stdin=subprocess.DEVNULL, start_new_session=True
        )

    async def start(self) -> None:
        self.launch()
        await _until(lambda: _port_open(self.port), 30, "the function never listened")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def counts(self) -> collections.Counter[str]:
        """Calls so far by invocation id (a torn last line is not counted yet)."""
        text = self.calls.read_text() if self.calls.exists() else ""
        return collections.Counter(
            line.split()[1] for line in text.split("\n")[:-1] if len(line.split()) == 3
        )


async def _port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def _until(check: Callable[[], Awaitable[bool]], wait: float, message: str) -> None:
    deadline = time.monotonic() + wait
    while not await check():
        assert time.monotonic() < deadline, message
        await asyncio.sleep(0.1)


# ------------------------------------------------------------------ the load


@dataclass
class Load:
    """Posts events (to ``plain`` and ``paced``) and direct invocations (of ``plain``) to the
    hubs in turn, at a steady rate; keeps the id of every invocation answered 202."""

    hubs: list[HubProcess]
    accepted: dict[str, str] = field(default_factory=dict)  # invocation id -> function
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    _numbers: Iterator[int] = field(default_factory=itertools.count)

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(64)
        tasks: set[asyncio.Task[bool]] = set()

        def done(task: asyncio.Task[bool]) -> None:
            tasks.discard(task)
            slots.release()

        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            next_at = loop.time()
            while not stop.is_set():
                await slots.acquire()
                task = asyncio.create_task(self.post(http, next(self._numbers)))
                tasks.add(task)
                task.add_done_callback(done)
                next_at = max(next_at + 1 / RATE, loop.time() - 1)
                await asyncio.sleep(max(0.0, next_at - loop.time()))
            await asyncio.gather(*tasks)

    async def post(
        self, http: aiohttp.ClientSession, n: int, hub: HubProcess | None = None
    ) -> bool:
        """One request; True if it was answered 202 (its invocations are then kept)."""
        base = (hub or self.hubs[n % len(self.hubs)]).base_url
        auth = {"Authorization": f"Bearer {TOKEN}"}
        if n % 3 == 0:
            url, headers = f"{base}/v1/functions/plain/invocations", auth
        else:
            url = f"{base}/v1/events"
            headers = {
                **auth,
                "ce-specversion": "1.0",
                "ce-id": f"load-{n}",
                "ce-source": "/chaos",
                "ce-type": "com.example.chaos",
                "content-type": "application/json",
            }
        try:
            async with http.post(url, data=b'{"n": %d}' % n, headers=headers) as response:
                body = await response.json(content_type=None)
                if response.status != 202:
                    self.refused[str(response.status)] += 1
                    return False
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.refused[type(exc).__name__] += 1
            return False
        for inv in body.get("invocations", [body]):
            self.accepted[inv["id"]] = inv["function"]
        return True


# ------------------------------------------------------------------ the test


@dataclass(frozen=True)
class Services:
    urls: EmbeddedUrls
    servers: dict[str, Server]  # by name: nats, postgres, redis


@pytest.fixture
async def services() -> AsyncIterator[Services]:
    """The embedded servers, each as a :class:`Server` that can be killed and started again."""
    embedded = EmbeddedServices()
    with recorded_launches() as servers:
        urls = await embedded.start()
    try:
        yield Services(urls, servers)
    finally:
        for server in servers.values():
            await server.stop()
        await embedded.stop()


async def test_nothing_accepted_is_lost_when_each_component_is_killed(
    services: Services, tmp_path: Path
) -> None:
    urls, servers = services.urls, services.servers
    settings = Settings(
        database_url=SecretStr(urls.database_url),
        nats_url=SecretStr(urls.nats_url),
        redis_url=SecretStr(urls.redis_url),
        namespace=f"chaos{uuid.uuid4().hex[:8]}",
        tokens={SecretStr(TOKEN): list(Scope)},
        ack_wait=5.0,
        shutdown_timeout=5.0,
    )
    function = FunctionProcess(tmp_path / "calls.txt")
    hubs = [HubProcess(settings, TOKEN), HubProcess(settings, TOKEN)]
    load = Load(hubs)
    try:
        await function.start()
        await asyncio.gather(*(hub.ready(wait=60) for hub in hubs))
        await declare(hubs[0], function)
        await _until(lambda: routed(hubs), 30, "the bindings never reached both hubs")

        stop = asyncio.Event()
        running = asyncio.create_task(load.run(stop))
        try:
            for name in ("nats", "redis", "postgres"):
                await outage(hubs, name, servers[name].kill, servers[name].start)
            await outage(hubs, "hub", hubs[0].kill, lambda: replace_hub(hubs, settings))
            await outage(hubs, "function", function.kill, function.start)  # same port
            await asyncio.sleep(STEADY)
        finally:
            stop.set()
            await running

        await each_hub_delivers(hubs, load, function)
        await all_delivered(load, function, hubs)
        counts = function.counts()
        duplicates = sum(counts[i] - 1 for i in load.accepted if counts[i] > 1)
        print(f"accepted {len(load.accepted)}, refused {dict(load.refused)}, dup {duplicates}")
        assert duplicates < 0.005 * len(load.accepted), (duplicates, len(load.accepted))
        for hub in hubs:
            letters = await get(hub, "/v1/dead-letters")
            assert letters["items"] == [], letters["items"][:3]
            assert hub.process.poll() is None, hub.output()
    finally:
        for hub in hubs:
            hub.kill()
        function.kill()


async def declare(hub: HubProcess, function: FunctionProcess) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        resources: list[tuple[str, str, dict[str, Any]]] = [
            ("functions", "plain", {"url": function.url("plain"), "retry": RETRY}),
            ("functions", "paced", {"url": function.url("paced"), "retry": RETRY}),
            ("bindings", "to-plain", {"source": "api", "function": "plain"}),
            ("bindings", "to-paced", {"source": "api", "function": "paced"}),
        ]
        for kind, name, spec in resources:
            if name == "paced":
                spec["rateLimit"] = "200/s"
            url = f"{hub.base_url}/v1/{kind}/{name}"
            async with http.put(url, json={"spec": spec}) as response:
                assert response.status in (200, 201), await response.text()


async def routed(hubs: list[HubProcess]) -> bool:
    """Each hub routes an event to both functions (a probe, delivered like any other)."""
    async with aiohttp.ClientSession() as http:
        for hub in hubs:
            probe = Load(hubs)
            if not await probe.post(http, 20_000_000 + 3 * hubs.index(hub), hub):
                return False
            if sorted(probe.accepted.values()) != ["paced", "plain"]:
                return False
    return True


async def outage(
    hubs: list[HubProcess],
    name: str,
    kill: Callable[[], Awaitable[None] | None],
    start: Callable[[], Awaitable[None] | None],
) -> None:
    await asyncio.sleep(STEADY)
    killed = kill()
    if killed is not None:
        await killed
    await asyncio.sleep(DOWN)
    started = start()
    if started is not None:
        await started
    await _until(lambda: all_ready(hubs), RECOVER, f"hubs not ready after {name} came back")


async def replace_hub(hubs: list[HubProcess], settings: Settings) -> None:
    hubs[0] = HubProcess(settings, TOKEN)
    await hubs[0].ready(wait=RECOVER)


async def all_ready(hubs: list[HubProcess]) -> bool:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        for hub in hubs:
            assert hub.process.poll() is None, hub.output()
            try:
                async with http.get(f"{hub.base_url}/readyz") as response:
                    if response.status != 200:
                        return False
            except (aiohttp.ClientError, TimeoutError):
                return False
    return True


async def each_hub_delivers(hubs: list[HubProcess], load: Load, function: FunctionProcess) -> None:
    """New work posted to each hub is accepted and delivered, and each hub's dispatcher
    delivers some of it (both pull from the same consumers)."""
    before = [await succeeded(hub) for hub in hubs]
    deadline = time.monotonic() + DRAIN
    final: list[str] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for n in itertools.count(10_000_000, 3):  # n % 3 != 0: events, to both functions
            for hub in hubs:
                ids = set(load.accepted)
                if await load.post(http, n + hubs.index(hub), hub):
                    final += set(load.accepted) - ids
            counts = function.counts()
            grown = [await succeeded(hub) > b for hub, b in zip(hubs, before, strict=True)]
            # The first ones accepted must arrive; those just posted are still on their way.
            first = final[: 8 * len(hubs)]
            if all(grown) and len(first) == 8 * len(hubs) and all(counts[i] for i in first):
                return
            assert time.monotonic() < deadline, (grown, len(final), [h.output() for h in hubs])
            await asyncio.sleep(0.2)


async def all_delivered(load: Load, function: FunctionProcess, hubs: list[HubProcess]) -> None:
    deadline = time.monotonic() + DRAIN
    while missing := _missing(load.accepted, function.counts()):
        if time.monotonic() > deadline:
            functions = collections.Counter(load.accepted[i] for i in missing)
            raise AssertionError(
                f"{len(missing)} of {len(load.accepted)} accepted invocations never reached"
                f" the function ({dict(functions)}), e.g. {missing[:3]};"
                f" hub logs: {[h.output()[-1500:] for h in hubs]}"
            )
        await asyncio.sleep(0.5)


def _missing(accepted: dict[str, str], counts: collections.Counter[str]) -> list[str]:
    return [i for i in accepted if not counts[i]]


async def succeeded(hub: HubProcess) -> float:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{hub.base_url}/metrics") as response,
    ):
        text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("eventhub_invocations_total{") and 'outcome="succeeded"' in line
    )


async def get(hub: HubProcess, path: str) -> Any:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.get(hub.base_url + path) as response,
    ):
        assert response.status == 200, await response.text()
        return await response.json()


if __name__ == "__main__":  # the function's child process: see FunctionProcess
    serve_function(int(sys.argv[1]), sys.argv[2])
