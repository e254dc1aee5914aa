"""What the HTTP handlers need, handed over by the composition root."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import redis.asyncio as aioredis
from aiohttp import web

from dlq.replay import ReplayJobs
from dlq.store import DeadLetterStore
from eventhub.ingress import Ingress
from eventhub.metrics import Metrics
from eventhub.queue import InvocationQueue
from eventhub.routing import Router
from eventhub.settings import Scope, Settings
from eventhub.state import InvocationState
from eventhub.store import ResourceStore

Check = Callable[[], Awaitable[None]]


@dataclass
class ApiContext:
    settings: Settings
    metrics: Metrics
    store: ResourceStore
    router: Router
    ingress: Ingress
    queue: InvocationQueue
    state: InvocationState
    dead_letters: DeadLetterStore
    replays: ReplayJobs
    redis: aioredis.Redis
    checks: dict[str, Check] = field(default_factory=dict)


CONTEXT = web.AppKey("context", ApiContext)
SCOPE_ATTR = "_eventhub_scope"


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[web.StreamResponse]])


def requires(scope: Scope) -> Callable[[Handler], Handler]:
    """Mark a handler with the token scope it needs."""

    def mark(handler: Handler) -> Handler:
        setattr(handler, SCOPE_ATTR, scope)
        return handler

    return mark
