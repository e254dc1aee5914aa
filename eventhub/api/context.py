"""What the HTTP handlers need, handed over by the composition root."""

from __future__ import annotations

import functools
import hashlib
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


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: a stable id of its token (never the token itself) and its scopes.

    The id is the same in every hub process and changes when the token does; idempotency keys
    and invocation status are scoped to it."""

    id: str
    scopes: frozenset[Scope]


@functools.lru_cache(maxsize=1024)
def caller_id(token: str) -> str:
    """Computed once per token (only known tokens reach here: the auth middleware asks
    after the token was found)."""
    return hashlib.sha256(b"eventhub-token\x00" + token.encode()).hexdigest()[:32]


CONTEXT = web.AppKey("context", ApiContext)
CALLER = web.RequestKey("caller", Caller)  # set by the auth middleware on scoped routes
SCOPE_ATTR = "_eventhub_scope"
ALSO_ATTR = "_eventhub_also"  # scopes that serve instead of SCOPE_ATTR's


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[web.StreamResponse]])


def requires(scope: Scope, *instead: Scope) -> Callable[[Handler], Handler]:
    """Mark a handler with the token scope it needs (or any of ``instead``)."""

    def mark(handler: Handler) -> Handler:
        setattr(handler, SCOPE_ATTR, scope)
        if instead:
            setattr(handler, ALSO_ATTR, frozenset(instead))
        return handler

    return mark
