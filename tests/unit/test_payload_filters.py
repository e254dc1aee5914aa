"""The ``cel`` filter dialect: in a binding's filter, in routing, in resource validation."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventhub import expressions
from eventhub.errors import ResourceInvalid
from eventhub.events import Event
from eventhub.filters import FilterError, compile_filter, compile_filters, required_value
from eventhub.resources import Resource, parse_resource
from eventhub.routing import Routes


def resource(kind: str, name: str, spec: dict[str, Any]) -> Resource:
    doc = {"apiVersion": "eventhub/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}
    return parse_resource(doc, "bindings.yaml")


def order(amount: int, type_: str = "com.example.order", **attributes: str) -> Event:
    body = orjson.dumps({"amount": amount, "currency": "EUR"})
    base = {"specversion": "1.0", "id": f"e{amount}", "source": "/s", "type": type_}
    return Event({**base, "datacontenttype": "application/json", **attributes}, body)


# ---------------------------------------------------------------- the dialect


def test_cel_combines_with_the_attribute_dialects() -> None:
    spec = [
        {"exact": {"type": "com.example.order"}},
        {"any": [{"cel": "data.amount > 100"}, {"prefix": {"subject": "vip/"}}]},
        {"not": {"cel": "data.currency == 'USD'"}},
    ]
    compiled = compile_filter(spec)
    assert compiled.scoped
    scope = expressions.Scope.of
    assert compiled.matches(scope(order(150)))
    assert not compiled.matches(scope(order(50)))
    assert compiled.matches(scope(order(50, subject="vip/1")))
    assert not compiled.matches(scope(order(150, type_="com.example.other")))


def test_only_a_filter_with_cel_is_scoped() -> None:
    assert not compile_filter([{"exact": {"type": "a"}}]).scoped
    assert not compile_filter(None).scoped
    assert compile_filter([{"all": [{"not": {"cel": "type == 'a'"}}]}]).scoped


def test_bare_attributes_give_data_null() -> None:
    predicate = compile_filters([{"cel": "type == 'a' && data == null"}])
    assert predicate({"type": "a", "priority": 5})


@pytest.mark.parametrize(
    ("spec", "path", "message"),
    [
        ([{"cel": "data.amount > "}], "filter[0].cel", "syntax error at column 14"),
        (
            [{"exact": {"type": "a"}}, {"cel": "data.amount >> 3"}],
            "filter[1].cel",
            "syntax error at column 14: unexpected '>'",
        ),
        ([{"all": [{"cel": "nope(1)"}]}], "filter[0].all[0].cel", "unknown function 'nope'"),
        ([{"cel": 5}], "filter[0].cel", "must be a CEL expression string, got int"),
        ([{"cel": ""}], "filter[0].cel", "must not be empty"),
        ([{"cesql": "type = 'a'"}], "filter[0].cesql", "write the condition in cel"),
    ],
)
def test_a_bad_expression_names_its_path(spec: Any, path: str, message: str) -> None:
    with pytest.raises(FilterError) as info:
        compile_filters(spec)
    assert info.value.path == path
    assert message in info.value.message


def test_required_value_reads_a_top_level_cel_conjunction() -> None:
    assert required_value([{"cel": "type == 'a' && data.x > 1"}], "type") == "a"
    assert required_value([{"all": [{"cel": "data.x > 1 && 'b' == type"}]}], "type") == "b"
    assert required_value([{"cel": "type == 'a' || data.x > 1"}], "type") is None
    assert required_value([{"not": {"cel": "type == 'a'"}}], "type") is None


# ---------------------------------------------------------------- routing


def routes(filters: dict[str, list[dict[str, Any]]]) -> Routes:
    resources = [resource("Function", "f", {"url": "http://f"})]
    for name, spec_filter in filters.items():
        resources.append(
            resource("Binding", name, {"source": "api", "function": "f", "filter": spec_filter})
        )
    return Routes.build(resources)


def test_only_bindings_whose_payload_filter_matches_are_routed() -> None:
    r = routes(
        {
            "big": [{"cel": "data.amount > 100"}],
            "small": [{"cel": "data.amount <= 100"}],
            "typed-big": [{"cel": "type == 'com.example.order' && data.amount > 1000"}],
            "plain": [{"exact": {"type": "com.example.order"}}],
        }
    )
    found = lambda event: [route.binding for route in r.match("api", event)]  # noqa: E731
    assert found(order(150)) == ["big", "plain"]
    assert found(order(50)) == ["plain", "small"]
    assert found(order(5000)) == ["big", "plain", "typed-big"]
    assert found(order(5000, type_="other")) == ["big"]
    not_json = Event({**order(1).attributes, "datacontenttype": "text/plain"}, b"amount=5000")
    assert found(not_json) == ["plain"]


def test_a_cel_type_condition_is_indexed_by_type() -> None:
    r = routes({"typed": [{"cel": "type == 'com.example.order' && data.amount > 1"}]})
    assert r.by_source["api"][0].event_type == "com.example.order"
    assert r.by_source["api"][0].scoped


def test_the_payload_is_parsed_once_per_event_and_only_when_needed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsed: list[bytes] = []
    real = expressions.parse_data

    def counting(ctype: str | None, body: bytes) -> object:
        parsed.append(body)
        return real(ctype, body)

    monkeypatch.setattr(expressions, "parse_data", counting)
    five = {f"b{i}": [{"cel": f"data.amount > {i}"}] for i in range(5)}
    others = {"other-type": [{"cel": "type == 'other' && data.amount > 1"}]}
    r = routes(five | others | {"attrs": [{"exact": {"type": "com.example.order"}}]})
    assert len(r.match("api", order(150))) == 6
    assert len(parsed) == 1  # five bindings read data: one parse
    typed = routes(others | {"attrs": [{"exact": {"type": "com.example.order"}}]})
    parsed.clear()
    assert typed.match("api", order(150, type_="nothing-bound")) == []
    assert [x.binding for x in typed.match("api", order(150))] == ["attrs"]
    assert parsed == []  # no candidate reads data
    attributes_only = routes({"a": [{"exact": {"type": "com.example.order"}}]})
    parsed.clear()
    assert len(attributes_only.match("api", order(150))) == 1
    assert parsed == []


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=64)
    | st.builds(
        orjson.dumps,
        st.dictionaries(
            st.text(max_size=6), st.integers(-(2**63), 2**63 - 1) | st.text(max_size=4)
        ),
    )
)
def test_routing_never_raises_on_generated_payloads(body: bytes) -> None:
    r = routes({"b": [{"cel": "data.amount > 1 && data.currency.startsWith('E')"}]})
    event = Event({**order(1).attributes}, body)
    assert [route.binding for route in r.match("api", event)] in ([], ["b"])


# ---------------------------------------------------------------- resources


def test_apply_refuses_a_bad_expression_naming_file_resource_field_and_column() -> None:
    spec = {
        "source": "api",
        "function": "f",
        "filter": [{"exact": {"type": "a"}}, {"cel": "data.amount >> 100"}],
    }
    with pytest.raises(ResourceInvalid) as info:
        resource("Binding", "big-orders", spec)
    error = info.value
    assert [p.field for p in error.problems] == ["spec.filter[1].cel"]
    assert str(error) == (
        "bindings.yaml: Binding 'big-orders': spec.filter[1].cel: "
        "syntax error at column 14: unexpected '>'"
    )


def test_not_of_a_failing_expression_matches_and_negating_inside_does_not() -> None:
    no_amount = expressions.Scope.of(Event({"id": "1", "source": "/s", "type": "t"}, b"{}"))
    assert compile_filters([{"not": {"cel": "data.amount > 100"}}])(no_amount)
    assert not compile_filters([{"cel": "!(data.amount > 100)"}])(no_amount)
