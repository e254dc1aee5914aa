"""Routing: which functions an event goes to.

The :class:`Router` keeps every Function and Binding in memory as an immutable :class:`Routes`
snapshot, swapped whole on change (PostgreSQL ``NOTIFY``, plus a reload when the listening
connection comes back), so matching an event costs no database query. Filters are compiled once
per snapshot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from eventhub.events import Event
from eventhub.filters import Predicate, compile_filters
from eventhub.resources import BindingSpec, FunctionSpec, Kind, Resource
from eventhub.store import ResourceStore

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Route:
    binding: str
    function: str
    matches: Predicate
    paused: bool = False  # a paused binding's invocations are held, not dispatched
    ordered: bool = False  # same partitionkey: one after another


@dataclass(frozen=True)
class Routes:
    functions: dict[str, FunctionSpec] = field(default_factory=dict)
    sources: dict[str, Resource] = field(default_factory=dict)
    by_source: dict[str, tuple[Route, ...]] = field(default_factory=dict)

    @classmethod
    def build(cls, resources: list[Resource]) -> Routes:
        functions: dict[str, FunctionSpec] = {}
        sources: dict[str, Resource] = {}
        by_source: dict[str, list[Route]] = {}
        for r in resources:
            if r.kind is Kind.FUNCTION:
                functions[r.name] = r.model
            elif r.kind is Kind.SOURCE:
                sources[r.name] = r
        for r in sorted(resources, key=lambda r: r.name):
            if r.kind is Kind.BINDING:
                spec: BindingSpec = r.model
                route = Route(
                    r.name,
                    spec.function,
                    compile_filters(spec.filter),
                    r.paused,
                    spec.ordering == "ordered",
                )
                by_source.setdefault(spec.source, []).append(route)
        return cls(functions, sources, {k: tuple(v) for k, v in by_source.items()})

    @property
    def ordered_functions(self) -> set[str]:
        """Functions that at least one ordered binding targets."""
        return {r.function for rs in self.by_source.values() for r in rs if r.ordered}

    def bindings_of(self, source: str) -> tuple[Route, ...]:
        return self.by_source.get(source, ())

    def match(self, source: str, event: Event) -> list[Route]:
        attributes = event.attributes
        return [
            route
            for route in self.by_source.get(source, ())
            if route.function in self.functions and route.matches(attributes)
        ]


Listener = Callable[[Routes], Awaitable[None]]


class Router:
    def __init__(self, store: ResourceStore) -> None:
        self._store = store
        self.routes = Routes()
        self._listeners: list[Listener] = []
        self._reloading = asyncio.Lock()  # serialised, so an older snapshot never wins

    def on_change(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def reload(self) -> None:
        async with self._reloading:
            routes = Routes.build(await self._store.all())
            self.routes = routes
            log.debug("routes_reloaded", functions=len(routes.functions))
            for listener in self._listeners:
                try:
                    await listener(routes)
                except Exception as exc:  # the next reload (at most 30 s away) tries again
                    log.error("routes_listener_failed", error=str(exc) or repr(exc))

    async def run(self, dsn: str) -> None:
        """Follow changes until cancelled."""
        await self._store.listen(self.reload, dsn)
