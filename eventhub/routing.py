"""Routing: which functions an event goes to.

The :class:`Router` keeps every Function and Binding in memory as an immutable :class:`Routes`
snapshot, swapped whole on change (PostgreSQL ``NOTIFY``, plus a reload when the listening
connection comes back), so matching an event costs no database query. Filters are compiled once
per snapshot.

Matching does not try every binding of a source: a binding whose filter requires an event type
(``exact: {type: ...}`` at its top level, or ``type == '...'`` and'ed at the top of a ``cel``
expression) is indexed under that type, so an event is tried only
against the bindings of its own type and those that name no type. A hub with 10,000 bindings,
each filtered by type, routes an event about as fast as one with ten.

A stored resource that no longer validates is left out of the snapshot and kept in
:attr:`Router.invalid` (shown by ``/readyz``, counted by ``eventhub_invalid_resources``); every
other resource keeps routing.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import structlog

from eventhub.combos import Combination, compile_combination
from eventhub.events import Event
from eventhub.expressions import Scope
from eventhub.filters import Predicate, canonical_string, compile_filter, required_value
from eventhub.flows.spec import FlowSpec
from eventhub.invocations import Invocation
from eventhub.metrics import Metrics
from eventhub.resources import BindingSpec, FunctionSpec, Kind, Resource
from eventhub.store import InvalidResource, ResourceStore
from eventhub.versions import (
    LATEST,
    Choice,
    Overrides,
    Target,
    Weights,
    alias_weights,
    choose,
    version_spec,
)

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Route:
    binding: str
    function: str
    matches: Predicate
    selector: str | None = None  # the version or alias named after the function, if any
    paused: bool = False  # a paused binding's invocations are held, not dispatched
    ordered: bool = False  # same partitionkey: one after another
    event_type: str | None = None  # the only event type the filter can match, if it says so
    scoped: bool = False  # the filter has a CEL expression: it is given the event's Scope
    flow: str | None = None  # a binding that starts runs of a Flow (``function`` is then "")
    combo: str | None = None  # a combination's dependency: its events are collected first


_BY_NAME = attrgetter("binding")


@dataclass(frozen=True)
class _SourceIndex:
    """One source's routes: by the event type they require, each type's list merged with the
    routes that require none (in binding name order), and those others alone."""

    by_type: dict[str, tuple[Route, ...]]
    any_type: tuple[Route, ...]
    scoped: bool = False  # some route has a CEL expression: events get a Scope

    @classmethod
    def of(cls, routes: tuple[Route, ...]) -> _SourceIndex:
        by_type: dict[str, list[Route]] = {}
        for route in routes:
            if route.event_type is not None:
                by_type.setdefault(route.event_type, []).append(route)
        any_type = tuple(r for r in routes if r.event_type is None)
        merged = {k: tuple(sorted((*v, *any_type), key=_BY_NAME)) for k, v in by_type.items()}
        return cls(merged, any_type, any(route.scoped for route in routes))

    def candidates(self, event_type: object) -> Sequence[Route]:
        """The routes an event of this type can match, in binding name order."""
        key = event_type if type(event_type) is str else canonical_string(event_type)
        return self.by_type.get(key, self.any_type) if key is not None else self.any_type


@dataclass(frozen=True)
class Routes:
    functions: dict[str, FunctionSpec] = field(default_factory=dict)
    sources: dict[str, Resource] = field(default_factory=dict)
    by_source: dict[str, tuple[Route, ...]] = field(default_factory=dict)
    # Per function, each alias's weights in force (declared, or set by a running rollout).
    weights: dict[str, dict[str, Weights]] = field(default_factory=dict)
    paused_functions: frozenset[str] = frozenset()  # held in JetStream, not dispatched
    overrides: Overrides = field(default_factory=Overrides)
    # Each binding's route with the spec and pause it was built from, for the next build.
    built: dict[str, tuple[Mapping[str, Any], bool, Route]] = field(
        default_factory=dict, repr=False, compare=False
    )
    flows: dict[str, FlowSpec] = field(default_factory=dict)
    combos: dict[str, Combination] = field(default_factory=dict)  # by binding
    _index: dict[str, _SourceIndex] = field(init=False, repr=False, compare=False)
    # Sources with a CEL expression among their bindings' filters, apart: see match().
    _scoped: dict[str, _SourceIndex] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {source: _SourceIndex.of(routes) for source, routes in self.by_source.items()}
        object.__setattr__(self, "_index", {k: v for k, v in index.items() if not v.scoped})
        object.__setattr__(self, "_scoped", {k: v for k, v in index.items() if v.scoped})

    @classmethod
    def build(
        cls,
        resources: list[Resource],
        previous: Routes | None = None,
        overrides: Overrides | None = None,
    ) -> Routes:
        """The routes of ``resources``. A binding whose spec and pause are those it had in
        ``previous`` keeps its route, filter compiled: the periodic reload of a hub with
        10,000 bindings then compiles none. ``overrides``: alias weights set by rollouts."""
        known = previous.built if previous is not None else {}
        overrides = overrides or Overrides()
        built: dict[str, tuple[Mapping[str, Any], bool, Route]] = {}
        functions: dict[str, FunctionSpec] = {}
        weights: dict[str, dict[str, Weights]] = {}
        paused: set[str] = set()
        sources: dict[str, Resource] = {}
        flows: dict[str, FlowSpec] = {}
        by_source: dict[str, list[Route]] = {}
        for r in resources:
            if r.kind is Kind.FUNCTION:
                functions[r.name] = r.model
                if r.model.aliases:
                    weights[r.name] = alias_weights(r.model) | overrides.of(r.name, r.model)
                if r.paused:
                    paused.add(r.name)
            elif r.kind is Kind.SOURCE:
                sources[r.name] = r
            elif r.kind is Kind.FLOW:
                flows[r.name] = r.model
        combos: dict[str, Combination] = {}
        for r in sorted(resources, key=lambda r: r.name):
            if r.kind is Kind.BINDING and r.model.dependencies is not None:
                combos[r.name] = compile_combination(r.name, r.model)
                for source, route in _dependency_routes(r):
                    by_source.setdefault(source, []).append(route)
            elif r.kind is Kind.BINDING:
                spec: BindingSpec = r.model
                old = known.get(r.name)
                if old is not None and old[1] == r.paused and old[0] == r.spec:
                    route = old[2]
                else:
                    target = Target.parse(spec.function or "")
                    compiled = compile_filter(spec.filter)
                    route = Route(
                        r.name,
                        target.function,
                        compiled.matches,
                        target.selector,
                        r.paused,
                        spec.ordering == "ordered",
                        required_value(spec.filter, "type"),
                        compiled.scoped,
                        flow=spec.flow,
                    )
                built[r.name] = (r.spec, r.paused, route)
                by_source.setdefault(spec.source, []).append(route)
        return cls(
            functions,
            sources,
            {k: tuple(v) for k, v in by_source.items()},
            weights,
            frozenset(paused),
            overrides,
            built,
            flows=flows,
            combos=combos,
        )

    def aim(self, invocation: Invocation) -> Invocation:
        """``invocation`` with its ``function`` field read as a target (``f``, ``f:v4``,
        ``f:prod``): the function alone, the version chosen from the invocation's id. A target
        no longer declared keeps the version it names (its worker dead-letters it)."""
        target = Target.parse(invocation.function)
        try:
            choice = self.choose(target.function, target.selector, invocation.id)
        except KeyError:
            choice = Choice(target.selector or LATEST)
        return dataclasses.replace(
            invocation, function=target.function, version=choice.version, alias=choice.alias
        )

    def call_url(self, function: str | None, version: str) -> str:
        """The URL a version of a function is called at ("" when it is gone)."""
        spec = self.functions.get(function or "")
        call = version_spec(spec, version) if spec is not None else None
        return call.url if call is not None else ""

    def choose(self, function: str, selector: str | None, key: str) -> Choice:
        """The version an invocation of ``function:selector`` goes to (see
        :mod:`eventhub.versions`); KeyError for a function, version or alias not known."""
        return choose(self.functions[function], selector, key, self.weights.get(function, {}))

    @property
    def ordered_functions(self) -> set[str]:
        """Functions that at least one ordered binding targets."""
        return {r.function for rs in self.by_source.values() for r in rs if r.ordered}

    def bindings_of(self, source: str) -> tuple[Route, ...]:
        return self.by_source.get(source, ())

    def match(self, source: str, event: Event) -> list[Route]:
        """The routes of ``source`` whose function exists and whose filter matches, in binding
        name order."""
        index = self._index.get(source)
        if index is None:  # this path stays as it was for sources without CEL expressions
            return self._match_scoped(source, event)
        attributes, functions = event.attributes, self.functions
        return [
            route
            for route in index.candidates(attributes.get("type"))
            if (route.function in functions or route.flow in self.flows)
            and route.matches(attributes)
        ]

    def _match_scoped(self, source: str, event: Event) -> list[Route]:
        """:meth:`match` for a source with CEL expressions: a filter that has one gets the
        event's one Scope, so however many read ``data``, the payload is parsed once, and only
        if one of them is evaluated."""
        index = self._scoped.get(source)
        if index is None:
            return []
        attributes, functions = event.attributes, self.functions
        scope = Scope(attributes, event.data)
        return [
            route
            for route in index.candidates(attributes.get("type"))
            if (route.function in functions or route.flow in self.flows)
            and route.matches(scope if route.scoped else attributes)
        ]


def _dependency_routes(r: Resource) -> list[tuple[str, Route]]:
    """A combination binding's routes: one per dependency, under the dependency's source."""
    spec: BindingSpec = r.model
    target = Target.parse(spec.function or "")
    routes: list[tuple[str, Route]] = []
    for dependency in spec.dependencies or ():
        compiled = compile_filter(dependency.filter)
        route = Route(
            r.name,
            target.function,
            compiled.matches,
            target.selector,
            r.paused,
            event_type=required_value(dependency.filter, "type"),
            scoped=compiled.scoped,
            flow=spec.flow,
            combo=dependency.name,
        )
        routes.append((dependency.source, route))
    return routes


Listener = Callable[[Routes], Awaitable[None]]
OverridesLoader = Callable[[], Awaitable[Overrides]]


class Router:
    def __init__(
        self,
        store: ResourceStore,
        metrics: Metrics | None = None,
        overrides: OverridesLoader | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._overrides = overrides  # the rollouts' alias weights, read with the resources
        self.routes = Routes()
        self.invalid: tuple[InvalidResource, ...] = ()  # stored, but skipped: they do not validate
        self._listeners: list[Listener] = []
        self._reloading = asyncio.Lock()  # serialised, so an older snapshot never wins

    def on_change(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def reload(self) -> None:
        async with self._reloading:
            loaded = await self._store.load()
            overrides = await self._overrides() if self._overrides is not None else None
            routes = Routes.build(loaded.valid, self.routes, overrides)
            self.routes, self.invalid = routes, tuple(loaded.invalid)
            if self._metrics is not None:
                for kind in Kind:
                    count = sum(1 for r in loaded.invalid if r.kind is kind)
                    self._metrics.invalid_resources.labels(kind.value).set(count)
            log.debug("routes_reloaded", functions=len(routes.functions))
            for listener in self._listeners:
                try:
                    await listener(routes)
                except Exception as exc:  # the next reload (at most 30 s away) tries again
                    log.error("routes_listener_failed", error=str(exc) or repr(exc))

    async def run(self, dsn: str) -> None:
        """Follow changes until cancelled."""
        await self._store.listen(self.reload, dsn)
