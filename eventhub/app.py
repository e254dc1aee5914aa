"""The composition root: builds every component from the settings, runs the chosen roles, and
shuts them down in order.

Roles: ``api`` (HTTP ingress and management), ``dispatch`` (JetStream -> functions), ``ingest``
(the connectors of Source resources). ``eventhub run`` runs all of them in one process.

Shutdown order (on SIGTERM): stop intake (the HTTP server stops accepting and finishes the
requests it has), let in-flight invocations finish within ``shutdown_timeout`` and hand the rest
back to JetStream unacked, flush callbacks, invocation state and statistics, stop following
resource changes, drain NATS, close Redis and PostgreSQL last.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp
import asyncpg
import nats
import nats.errors
import nats.js.errors
import redis.asyncio as aioredis
import structlog
from aiohttp import web
from nats.aio.client import Client as NATS

from dlq.replay import ReplayJobs, ReplayRunner
from dlq.store import DeadLetterStore
from eventhub import db
from eventhub.api.app import build as build_api
from eventhub.api.context import ApiContext
from eventhub.callbacks import Callbacks
from eventhub.combiner import Combiner
from eventhub.dispatcher import Dispatcher
from eventhub.errors import DependencyDown
from eventhub.flows.engine import FlowEngine
from eventhub.flows.runs import FlowRuns
from eventhub.ingress import Ingress
from eventhub.invoker import Invoker
from eventhub.metrics import Metrics
from eventhub.queue import InvocationQueue
from eventhub.ratelimit import RateLimiter
from eventhub.rollout import RolloutDriver, Rollouts
from eventhub.routing import Router
from eventhub.settings import Settings
from eventhub.sources import PROCESS_ID, ConnectorFactory, SourceSupervisor
from eventhub.state import InvocationState
from eventhub.stats import Stats
from eventhub.store import ResourceStore

log = structlog.get_logger(__name__)
_DEPTH_INTERVAL = 2.0
_CLOSE_TIMEOUT = 5.0
_RETENTION_EVERY = 300.0
_STREAM_CHECK_INTERVAL = 2.0
_RETENTION_LOCK = 0x6576656E74687562  # "eventhub"


class Role(StrEnum):
    API = "api"
    DISPATCH = "dispatch"
    INGEST = "ingest"


@dataclass
class Services:
    """The connections every role shares."""

    pool: Any
    nc: NATS
    redis: aioredis.Redis
    http: aiohttp.ClientSession


@contextlib.asynccontextmanager
async def connect(settings: Settings) -> AsyncIterator[Services]:
    async with contextlib.AsyncExitStack() as stack:
        pool = await db.connect(settings.database_url.get_secret_value(), settings.namespace)
        stack.push_async_callback(_close_pool, pool)
        try:
            nc = await nats.connect(
                settings.nats_url.get_secret_value(),
                name="eventhub",
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                connect_timeout=5,
                error_cb=_nats_error,
                allow_reconnect=True,
                drain_timeout=_CLOSE_TIMEOUT,
            )
        except Exception as exc:
            raise DependencyDown(f"NATS is unreachable: {type(exc).__name__}") from exc
        stack.push_async_callback(_drain, nc)
        client = aioredis.from_url(settings.redis_url.get_secret_value())
        stack.push_async_callback(client.aclose)
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30),
            auto_decompress=False,
        )
        stack.push_async_callback(http.close)
        yield Services(pool, nc, client, http)


async def _close_pool(pool: Any) -> None:
    """Close gracefully, but never wait forever for a connection someone still holds."""
    try:
        await asyncio.wait_for(pool.close(), timeout=_CLOSE_TIMEOUT)
    except TimeoutError:
        log.warning("postgres_pool_terminated")
        pool.terminate()


async def _nats_error(exc: Exception) -> None:
    log.warning("nats_error", error=str(exc) or repr(exc))


async def _drain(nc: NATS) -> None:
    with contextlib.suppress(nats.errors.Error, TimeoutError):
        await nc.drain()


class Hub:
    def __init__(
        self,
        settings: Settings,
        roles: set[Role],
        services: Services,
        connectors: Mapping[str, ConnectorFactory] | None = None,
    ) -> None:
        if connectors is None:
            from connectors import registry

            connectors = registry()
        self.settings = settings
        self.roles = roles
        self.services = services
        self.metrics = Metrics()
        self.store = ResourceStore(services.pool, settings.namespace)
        self.stats = Stats(services.redis, settings.namespace)
        self.rollouts = Rollouts(services.pool, self.store, self.stats, self.metrics)
        # Alias weights set by rollouts are read with the resources, on every reload.
        self.router = Router(self.store, self.metrics, overrides=self.rollouts.overrides)
        self.queue = InvocationQueue(services.nc, settings)
        self.state = InvocationState(services.redis, settings.namespace, settings.state_ttl)
        self.dead_letters = DeadLetterStore(services.pool)
        self.replays = ReplayJobs(services.pool, self.dead_letters)
        # Flow runs: started by ingress, advanced by the dispatcher as their steps settle.
        self.flows = FlowEngine(services.pool, self.router, self.queue, self.metrics)
        # Combination bindings: their events are collected in PostgreSQL until they fire.
        self.combiner = Combiner(services.pool, self.metrics, settings.duplicate_window)
        self.ingress = Ingress(
            self.router, self.queue, self.state, self.metrics, self.flows, self.combiner
        )
        self.callbacks = Callbacks(settings.callback_allow)
        self.dispatcher = Dispatcher(
            router=self.router,
            queue=self.queue,
            invoker=Invoker(services.http),
            state=self.state,
            limiter=RateLimiter(services.redis, settings.namespace),
            sink=self.dead_letters,
            callbacks=self.callbacks,
            settings=settings,
            metrics=self.metrics,
            stats=self.stats,
            flows=self.flows,
        )
        self.supervisor = SourceSupervisor(
            router=self.router,
            ingress=self.ingress,
            queue=self.queue,
            store=self.store,
            sink=self.dead_letters,
            redis=services.redis,
            namespace=settings.namespace,
            connectors=connectors,
            metrics=self.metrics,
        )
        self._site: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port: int | None = None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()  # whatever did start is stopped again
            raise

    async def _start(self) -> None:
        await db.migrate(self.services.pool, self.settings.namespace)
        await self.queue.ensure_stream()
        await self.router.reload()
        self._own(self.state.run())
        self._own(self.stats.run())
        self._own(self._keep_stream())
        self._own(self.router.run(self.settings.database_url.get_secret_value()))
        self._own(self.combiner.run(lambda: self.router.routes))
        if Role.DISPATCH in self.roles:
            await self.dispatcher.start()
            self._own(self._watch_depths())
            self._own(self._replay_runner().run())
            self._own(self._rollout_driver().run())
            self._own(self._apply_retention())
        if Role.INGEST in self.roles:
            await self.supervisor.start()
            self._own(self.supervisor.watch())
        await self._start_http()
        log.info("hub_started", roles=sorted(r.value for r in self.roles), port=self.port)

    async def stop(self) -> None:
        if self._site is not None:
            await self._site.cleanup()  # stop intake, finish the requests in progress
        if Role.INGEST in self.roles:
            await self.supervisor.stop()  # stop taking from sources first
        if Role.DISPATCH in self.roles:
            await self.dispatcher.stop(self.settings.shutdown_timeout)
        await self.callbacks.close(grace=5.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.state.flush(), timeout=5.0)
        await self.stats.close()  # the last calls' counts (a failure is logged, not raised)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=_CLOSE_TIMEOUT)
            if stuck:
                log.error("tasks_ignored_cancellation", tasks=[t.get_name() for t in stuck])
        log.info("hub_stopped")

    async def _start_http(self) -> None:
        """Every role serves /healthz, /readyz and /metrics; the api role also serves /v1."""
        ctx = ApiContext(
            settings=self.settings,
            metrics=self.metrics,
            store=self.store,
            router=self.router,
            ingress=self.ingress,
            queue=self.queue,
            state=self.state,
            dead_letters=self.dead_letters,
            replays=self.replays,
            redis=self.services.redis,
            checks={
                "postgres": self._check_postgres,
                "nats": self._check_nats,
                "redis": self._check_redis,
                "jetstream": self._check_jetstream,
            },
        )
        runner = web.AppRunner(
            build_api(
                ctx,
                v1=Role.API in self.roles,
                rollout_store=self.rollouts,
                flow_runs=FlowRuns(self.services.pool),
            ),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=min(self.settings.shutdown_timeout, 10.0),
        )
        await runner.setup()
        site = web.TCPSite(runner, self.settings.host, self.settings.port, backlog=1024)
        await site.start()
        self._site = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.settings.port

    def _own(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """These tasks run until stop: one that ends on its own is a fault, said loudly."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background_task_died", task=task.get_name(), error=repr(task.exception()))

    async def _watch_depths(self) -> None:
        """Queue depth metrics, and the release of what resumed bindings held."""
        while True:
            try:
                await self.dispatcher.refresh_depths()
                await self.dispatcher.release_resumed()
            except Exception as exc:  # a full buffer, NATS away...: try again next round
                log.warning("housekeeping_failed", error=str(exc) or repr(exc))
            await asyncio.sleep(_DEPTH_INTERVAL)

    def _replay_runner(self) -> ReplayRunner:
        started = self.metrics.replays.labels("published")
        return ReplayRunner(
            pool=self.services.pool,
            store=self.dead_letters,
            publisher=self.queue,
            routes=lambda: self.router.routes,
            owner=PROCESS_ID,
            on_published=started.inc,
        )

    def _rollout_driver(self) -> RolloutDriver:
        return RolloutDriver(
            rollouts=self.rollouts, store=self.store, stats=self.stats, owner=PROCESS_ID
        )

    async def _apply_retention(self) -> None:
        """Every few minutes, in one process at a time (an advisory lock decides)."""
        while True:
            await asyncio.sleep(_RETENTION_EVERY)
            try:
                async with self.services.pool.acquire() as conn:
                    if await conn.fetchval("select pg_try_advisory_lock($1)", _RETENTION_LOCK):
                        try:
                            removed = await self.dead_letters.apply_retention(
                                self.settings.dlq_retention, self.settings.dlq_max_count
                            )
                        finally:
                            await conn.execute("select pg_advisory_unlock($1)", _RETENTION_LOCK)
                        if removed:
                            log.info("dead_letters_expired", removed=removed)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("retention_failed", error=str(exc) or repr(exc))

    async def _check_postgres(self) -> None:
        await self.services.pool.fetchval("select 1")

    async def _check_nats(self) -> None:
        if not self.services.nc.is_connected:
            raise ConnectionError("not connected")
        await self.queue.js.account_info()

    async def _check_jetstream(self) -> None:
        """Red while the stream, or a consumer this process pulls, is missing."""
        count = await self.queue.consumer_count()
        if Role.DISPATCH in self.roles and count < self.dispatcher.consumers_wanted():
            raise ConnectionError("JetStream consumers are missing")

    async def _keep_stream(self) -> None:
        """NATS may come back without its data: the stream and consumers are created again."""
        while True:
            await asyncio.sleep(_STREAM_CHECK_INTERVAL)
            try:
                if await self.queue.restore_stream():
                    log.warning("stream_recreated", stream=self.queue.stream)
                if Role.DISPATCH in self.roles:
                    count = await self.queue.consumer_count()
                    if count < self.dispatcher.consumers_wanted():
                        await self.dispatcher.restore_consumers()
                        log.warning("consumers_recreated", stream=self.queue.stream)
            except Exception as exc:  # NATS away: the next round tries again
                log.debug("stream_check_failed", error=str(exc) or repr(exc))

    async def _check_redis(self) -> None:
        await self.services.redis.ping()


async def serve(settings: Settings, roles: set[Role], stop: asyncio.Event) -> None:
    """Run the hub until ``stop`` is set, then shut down in order."""
    async with connect(settings) as services:
        hub = Hub(settings, roles, services)
        await hub.start()
        try:
            await stop.wait()
        finally:
            await hub.stop()
