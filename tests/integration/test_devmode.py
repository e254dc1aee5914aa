"""The README walkthrough on `eventhub dev`: embedded NATS, PostgreSQL and Redis, the examples
applied, the sample function answering."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from tests.support import free_port

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def _read_token(process: subprocess.Popen[str], lines: list[str]) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = await asyncio.to_thread(process.stdout.readline)
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if line.strip().startswith("export TOKEN="):
            return line.strip().split("=", 1)[1]
    raise AssertionError("eventhub dev did not start:\n" + "".join(lines))


async def _drain(process: subprocess.Popen[str], lines: list[str]) -> None:
    assert process.stdout is not None
    while True:
        line = await asyncio.to_thread(process.stdout.readline)
        if not line:
            return
        lines.append(line)


async def _wait_for(predicate: object, what: str, wait: float = 30) -> None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if await predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def test_dev_walkthrough() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTHUB_")}
    process = subprocess.Popen(  # noqa: ASYNC220 - started once, read from a thread
        [sys.executable, "-m", "eventhub", "dev", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        token = await _read_token(process, lines)
        reader = asyncio.create_task(_drain(process, lines))
        api = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(headers=auth) as http:
            async with http.post(f"{api}/v1/functions/hello/invocations", data=b"hi") as r:
                assert r.status == 202
                inv = (await r.json())["id"]

            async def succeeded() -> bool:
                async with http.get(f"{api}/v1/invocations/{inv}") as r:
                    return (await r.json()).get("status") == "succeeded"

            await _wait_for(succeeded, "the hello invocation to succeed")

            headers = {
                "ce-specversion": "1.0",
                "ce-id": "order-1",
                "ce-source": "/shop",
                "ce-type": "com.example.order.created",
                "ce-subject": "orders/failing/1",
                "content-type": "application/json",
            }
            async with http.post(f"{api}/v1/events", data=b'{"total": 42}', headers=headers) as r:
                assert r.status == 202
                assert len((await r.json())["invocations"]) == 2  # hello and flaky

            async def dead_lettered() -> bool:
                async with http.get(f"{api}/v1/dead-letters", params={"function": "flaky"}) as r:
                    items = (await r.json())["items"]
                return bool(items) and items[0]["deadLetterFunction"]["status"] == "delivered"

            await _wait_for(dead_lettered, "the dead letter of flaky")
        assert any("sample function /dead-letters: id=order-1" in line for line in lines)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
        await reader
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
