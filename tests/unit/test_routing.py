"""Routing: the type index finds exactly the bindings that trying every predicate finds."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

from eventhub.events import Event
from eventhub.filters import required_value
from eventhub.resources import Resource, parse_resource
from eventhub.routing import Routes


def resource(kind: str, name: str, spec: dict[str, Any]) -> Resource:
    doc = {"apiVersion": "eventhub/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}
    return parse_resource(doc)


FILTERS: list[list[dict[str, Any]]] = [
    [],
    [{"exact": {"type": "a"}}],
    [{"exact": {"type": "b", "subject": "x"}}],
    [{"all": [{"exact": {"type": "a"}}]}, {"prefix": {"subject": "x"}}],
    [{"any": [{"exact": {"type": "a"}}, {"exact": {"type": "b"}}]}],
    [{"not": {"exact": {"type": "a"}}}],
    [{"prefix": {"type": "a"}}],
    [{"exact": {"type": "a"}}, {"exact": {"type": "b"}}],
]


def routes() -> Routes:
    resources = [resource("Function", f"f{i}", {"url": "http://f"}) for i in range(3)]
    for i, filters in enumerate(FILTERS):
        spec = {"source": "api", "function": f"f{i % 4}", "filter": filters}  # f3: none
        resources.append(resource("Binding", f"b{len(FILTERS) - i}", spec))
    return Routes.build(resources)


def brute_force(r: Routes, event: Event) -> list[str]:
    return [
        route.binding
        for route in r.by_source["api"]
        if route.function in r.functions and route.matches(event.attributes)
    ]


def test_the_index_matches_what_every_predicate_matches() -> None:
    r = routes()
    for type_, subject in itertools.product(["a", "b", "ab", "c"], ["x", "y"]):
        event = Event({"id": "1", "source": "/s", "type": type_, "subject": subject})
        found = [route.binding for route in r.match("api", event)]
        assert found == brute_force(r, event)
        assert found == sorted(found)


def test_an_unknown_source_matches_nothing() -> None:
    event = Event({"id": "1", "source": "/s", "type": "a"})
    assert routes().match("kafka", event) == []


def test_required_value_reads_top_level_exact_and_all() -> None:
    assert required_value(None, "type") is None
    assert required_value([{"exact": {"subject": "x"}}], "type") is None
    assert required_value([{"prefix": {"subject": "x"}}, {"exact": {"type": "t"}}], "type") == "t"
    assert required_value([{"all": [{"all": [{"exact": {"type": "t"}}]}]}], "type") == "t"
    assert required_value([{"any": [{"exact": {"type": "t"}}]}], "type") is None
    assert required_value([{"not": {"exact": {"type": "t"}}}], "type") is None


def test_a_rebuild_keeps_the_routes_of_unchanged_bindings() -> None:
    fn = resource("Function", "f0", {"url": "http://f"})
    typed = {"source": "api", "function": "f0", "filter": [{"exact": {"type": "a"}}]}
    first = Routes.build([fn, resource("Binding", "b1", typed), resource("Binding", "b2", typed)])
    changed = {"source": "api", "function": "f0"}
    again = Routes.build(
        [fn, resource("Binding", "b1", typed), resource("Binding", "b2", changed)], first
    )
    assert again.by_source["api"][0] is first.by_source["api"][0]
    assert again.by_source["api"][1].event_type is None
    paused = replace(resource("Binding", "b1", typed), paused=True)
    assert Routes.build([fn, paused], again).by_source["api"][0].paused
