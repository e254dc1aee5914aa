"""Test helpers: a scriptable HTTP function, and hubs run in-process or as child processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from eventhub.app import Hub, Role, connect
from eventhub.settings import Settings


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def ce(self) -> dict[str, str]:
        return {k[3:]: v for k, v in self.headers.items() if k.startswith("ce-")}


@dataclass
class FunctionServer:
    """Answers POST /{path}: the statuses queued with ``respond`` first, then 200."""

    calls: list[Call] = field(default_factory=list)
    script: dict[str, list[int]] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)
    # Per path: a status chosen from the call itself (None: the script, then 200, decide).
    rules: dict[str, Callable[[Call], int | None]] = field(default_factory=dict)
    # Per path: calls are held (unanswered) until the event is set.
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    port: int = 0

    def __post_init__(self) -> None:
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def respond(self, path: str, *statuses: int) -> None:
        self.script.setdefault(path, []).extend(statuses)

    def calls_to(self, path: str) -> list[Call]:
        return [c for c in self.calls if c.path == path]

    async def wait_for(self, count: int, path: str | None = None, wait: float = 20.0) -> list[Call]:
        def enough() -> bool:
            return len(self.calls_to(path) if path else self.calls) >= count

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(enough), wait)
            except TimeoutError:
                got = len(self.calls_to(path) if path else self.calls)
                raise AssertionError(
                    f"expected {count} calls to {path or 'any'}, got {got}"
                ) from None
        return self.calls_to(path) if path else list(self.calls)

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{path}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        body = await request.read()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            call = Call(
                path, {k.lower(): v for k, v in request.headers.items()}, body, time.monotonic()
            )
            async with self._changed:
                self.calls.append(call)
                self._changed.notify_all()
            if self.delays.get(path):
                await asyncio.sleep(self.delays[path])
            if path in self.gates:
                await self.gates[path].wait()
            status = self.rules[path](call) if path in self.rules else None
            if status is None:
                queue = self.script.get(path) or []
                status = queue.pop(0) if queue else 200
            return web.Response(
                status=status, text=f"status {status}", headers=self.headers.get(path)
            )
        finally:
            self.in_flight -= 1


@dataclass
class RunningHub:
    hub: Hub | None
    base_url: str
    token: str
    http: aiohttp.ClientSession

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    async def put(self, kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        async with self.http.put(
            f"{self.base_url}/v1/{kind}/{name}", json={"spec": spec}, headers=self.auth()
        ) as response:
            body = await response.json()
            assert response.status in (200, 201), body
            return body  # type: ignore[no-any-return]

    async def function(self, name: str, url: str, **spec: Any) -> None:
        await self.put("functions", name, {"url": url, **spec})

    async def bind(self, name: str, function: str, source: str = "api", **spec: Any) -> None:
        await self.put("bindings", name, {"source": source, "function": function, **spec})

    async def wait_routed(self, function: str, wait: float = 5.0) -> None:
        """Resource changes reach the router by NOTIFY: wait until this one has."""
        if self.hub is None:
            return
        deadline = time.monotonic() + wait
        while function not in self.hub.router.routes.functions:
            assert time.monotonic() < deadline, f"{function} never reached the router"
            await asyncio.sleep(0.02)

    async def post_event(
        self, event_id: str, type_: str = "com.example.test", source: str = "/test", **extra: str
    ) -> aiohttp.ClientResponse:
        headers = {
            "ce-specversion": "1.0",
            "ce-id": event_id,
            "ce-source": source,
            "ce-type": type_,
            "content-type": "application/json",
            **{f"ce-{k}": v for k, v in extra.items()},
            **self.auth(),
        }
        async with self.http.post(
            f"{self.base_url}/v1/events", data=json.dumps({"n": event_id}), headers=headers
        ) as response:
            await response.read()
            return response

    async def invocation(self, inv_id: str) -> dict[str, Any]:
        async with self.http.get(
            f"{self.base_url}/v1/invocations/{inv_id}", headers=self.auth()
        ) as response:
            return await response.json()  # type: ignore[no-any-return]

    async def wait_status(self, inv_id: str, status: str, wait: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + wait
        doc: dict[str, Any] = {}
        while time.monotonic() < deadline:
            doc = await self.invocation(inv_id)
            if doc.get("status") == status:
                return doc
            await asyncio.sleep(0.05)
        raise AssertionError(f"invocation {inv_id} never became {status}: {doc}")

    async def dead_letters(self, **query: str) -> list[dict[str, Any]]:
        async with self.http.get(
            f"{self.base_url}/v1/dead-letters", params=query, headers=self.auth()
        ) as response:
            assert response.status == 200, await response.text()
            return (await response.json())["items"]  # type: ignore[no-any-return]

    async def wait_dead_letters(
        self, count: int, wait: float = 20.0, **query: str
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + wait
        items: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            items = await self.dead_letters(**query)
            if len(items) >= count:
                return items
            await asyncio.sleep(0.1)
        raise AssertionError(f"expected {count} dead letters, got {len(items)}")


@contextlib.asynccontextmanager
async def start_hub(
    settings: Settings, token: str, roles: set[Role] | None = None
) -> AsyncIterator[RunningHub]:
    async with connect(settings) as services:
        hub = Hub(settings, roles or set(Role), services)
        await hub.start()
        try:
            async with aiohttp.ClientSession() as http:
                yield RunningHub(hub, f"http://127.0.0.1:{hub.port}", token, http)
        finally:
            await hub.stop()


@contextlib.asynccontextmanager
async def client(process: HubProcess) -> AsyncIterator[RunningHub]:
    """The API of a hub child process, as a RunningHub (no in-process hub)."""
    async with aiohttp.ClientSession() as http:
        yield RunningHub(None, process.base_url, process.token, http)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings_env(settings: Settings, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTHUB_")}
    env.update(
        EVENTHUB_DATABASE_URL=settings.database_url.get_secret_value(),
        EVENTHUB_NATS_URL=settings.nats_url.get_secret_value(),
        EVENTHUB_REDIS_URL=settings.redis_url.get_secret_value(),
        EVENTHUB_NAMESPACE=settings.namespace,
        EVENTHUB_PORT=str(port),
        EVENTHUB_TOKENS=json.dumps(
            {k.get_secret_value(): [s.value for s in v] for k, v in settings.tokens.items()}
        ),
        EVENTHUB_ACK_WAIT=str(settings.ack_wait),
        EVENTHUB_SHUTDOWN_TIMEOUT=str(settings.shutdown_timeout),
        EVENTHUB_LOG_LEVEL="info",
        EVENTHUB_LOG_FORMAT="json",
    )
    return env


def run_eventhub(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m eventhub *args`` with the environment of ``settings`` (and ``env`` on top),
    to completion; its exit code is for the caller to check."""
    return subprocess.run(
        [sys.executable, "-m", "eventhub", *args],
        env={**settings_env(settings, 0), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class HubProcess:
    """``python -m eventhub run`` as a child process, to kill -9 and to run several at once."""

    def __init__(self, settings: Settings, token: str, *roles: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.token = token
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - the child writes it until killed
            prefix="eventhub-hub-", suffix=".log", delete=False
        )
        args = [sys.executable, "-m", "eventhub", "run"]
        for role in roles:
            args += ["--role", role]
        self.process = subprocess.Popen(
            args, env=settings_env(settings, self.port), stdout=self.log, stderr=subprocess.STDOUT
        )

    async def ready(self, wait: float = 20.0) -> None:
        deadline = time.monotonic() + wait
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(
                        f"hub exited with {self.process.returncode}: {self.output()}"
                    )
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{self.base_url}/readyz") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise AssertionError(f"hub not ready: {self.output()}")

    def output(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()[-4000:]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def terminate(self, wait: float = 30.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(wait)

    def running(self) -> Callable[[], bool]:
        return lambda: self.process.poll() is None
