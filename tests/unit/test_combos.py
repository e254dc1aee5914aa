"""The condition of a combination binding: its grammar, its errors and its truth table."""

from __future__ import annotations

import pytest

from eventhub.combiner import combination_id
from eventhub.combos import ConditionError, parse_condition
from eventhub.errors import ResourceInvalid
from eventhub.resources import parse_resource

NAMES = ["a", "b", "c"]


@pytest.mark.parametrize(
    ("text", "true_for", "false_for"),
    [
        ("a && (b || c)", [{"a", "b"}, {"a", "c"}, {"a", "b", "c"}], [{"a"}, {"b", "c"}, set()]),
        ("a || b && c", [{"a"}, {"b", "c"}], [{"b"}, {"c"}, set()]),  # && binds tighter
        ("(a || b) && c", [{"a", "c"}, {"b", "c"}], [{"a"}, {"a", "b"}]),
        ("a", [{"a"}], [{"b"}]),
        ("((a))&&b", [{"a", "b"}], [{"a"}]),
    ],
)
def test_conditions_are_true_exactly_when_their_dependencies_are_seen(
    text: str, true_for: list[set[str]], false_for: list[set[str]]
) -> None:
    condition = parse_condition(text, NAMES)
    assert all(condition(frozenset(seen)) for seen in true_for)
    assert not any(condition(frozenset(seen)) for seen in false_for)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "must not be empty"),
        ("a &&", "ends too early"),
        ("a && (b", "ends too early"),
        ("a b", "at column 3: unexpected 'b'"),
        ("a && x", "at column 6: 'x' is not a dependency (declared: a, b, c)"),
        ("a & b", "at column 3: '&' is not allowed"),
        ("!a", "at column 1: '!' is not allowed"),
        ("a && ()", "at column 7: expected a dependency, got ')'"),
        ("(a || b))", "at column 9: unexpected ')'"),
    ],
)
def test_bad_conditions_are_refused_with_the_column(text: str, words: str) -> None:
    with pytest.raises(ConditionError, match=None) as caught:
        parse_condition(text, NAMES)
    assert words in str(caught.value)


def _binding(**spec: object) -> dict[str, object]:
    return {
        "apiVersion": "eventhub/v1",
        "kind": "Binding",
        "metadata": {"name": "b"},
        "spec": {"function": "f", **spec},
    }


def test_a_combination_binding_validates_and_defaults_to_all_dependencies() -> None:
    deps = [{"name": "a", "source": "api"}, {"name": "b", "source": "orders"}]
    resource = parse_resource(_binding(dependencies=deps, window="2s"))
    assert resource.model.window == 2.0 and resource.model.source == ""


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({}, "spec.source"),
        ({"dependencies": []}, "spec.dependencies"),
        ({"dependencies": [{"name": "a-b", "source": "api"}]}, "spec.dependencies[0].name"),
        ({"dependencies": [{"name": "a", "source": "function:g"}]}, "spec.dependencies[0].source"),
        ({"dependencies": [{"name": "a", "source": "api"}], "window": "30h"}, "spec.window"),
        (
            {"dependencies": [{"name": "a", "source": "api"}], "ordering": "ordered"},
            "spec.ordering",
        ),
        ({"source": "api", "correlate": "data.id"}, "spec.correlate"),
    ],
)
def test_bad_combination_bindings_name_the_field(spec: dict[str, object], field: str) -> None:
    with pytest.raises(ResourceInvalid) as caught:
        parse_resource(_binding(**spec))
    assert [p.field for p in caught.value.problems] == [field]


def test_a_combination_id_depends_on_its_events_not_their_order() -> None:
    one = combination_id("b", "k", [("a", "/s", "1"), ("b", "/s", "2")])
    assert one == combination_id("b", "k", [("b", "/s", "2"), ("a", "/s", "1")])
    assert one != combination_id("b", "k", [("a", "/s", "1"), ("b", "/s", "3")])
    assert one != combination_id("b", "k2", [("a", "/s", "1"), ("b", "/s", "2")])
