"""The embedded servers (``eventhub.embedded``: NATS, PostgreSQL, Redis) as processes a test can
kill with -9 and start again exactly as they first ran."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from eventhub import embedded as embedded_module


@dataclass
class Server:
    """A server started again exactly as it first ran (command, user, folder, log): its first
    run is the embedded one."""

    name: str
    pid: int
    argv: list[str]
    cwd: Path
    owner: tuple[int, int] | None  # (uid, gid) it runs as, when not ours
    log: Path
    process: subprocess.Popen[bytes] | None = None

    async def kill(self) -> None:
        """kill -9 of the server and every process it started (PostgreSQL's backends too)."""
        victims = [self.pid, *_descendants(self.pid)]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.process is not None:
            await asyncio.to_thread(self.process.wait, 10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in victims):
            assert time.monotonic() < deadline, f"{self.name} survived kill -9"
            await asyncio.sleep(0.05)

    def start(self) -> None:
        uid, gid = self.owner or (None, None)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                user=uid,
                group=gid,
                extra_groups=None if self.owner is None else [],
                start_new_session=True,
            )
        self.pid = self.process.pid

    async def stop(self) -> None:
        """Kills the server if this test started it again (the embedded run is stopped by
        ``EmbeddedServices.stop``)."""
        if self.process is not None and self.process.poll() is None:
            await self.kill()


@contextlib.contextmanager
def recorded_launches() -> Iterator[dict[str, Server]]:
    """While inside, how ``eventhub.embedded`` launches each server is recorded, by name: the
    last launch of a name is the server (PostgreSQL's initdb comes first)."""
    launched = embedded_module._launch
    servers: dict[str, Server] = {}

    async def launch(
        name: str, argv: list[str], log: Path, owner: tuple[int, int] | None = None, **more: Any
    ) -> Any:
        child = await launched(name, argv, log, owner, **more)
        servers[name] = Server(name, child.process.pid, argv, log.parent, owner, log)
        return child

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(embedded_module, "_launch", launch)
        yield servers


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = entry.joinpath("stat").read_text()
                children[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    """Running, that is: a zombie holds no port, socket or shared memory any more."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
