"""The Flow resource is validated when declared: each problem at its field, with the file and
the resource; a valid flow compiles into a plan."""

from __future__ import annotations

from typing import Any

import pytest

from eventhub.errors import ResourceInvalid
from eventhub.flows.spec import FlowSpec
from eventhub.resources import Kind, parse_resource, parse_text


def flow(*steps: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "eventhub/v1",
        "kind": "Flow",
        "metadata": {"name": "uploads"},
        "spec": {"steps": list(steps)},
    }


def problems(doc: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ResourceInvalid) as caught:
        parse_resource(doc, "flows.yaml")
    return [(p.field, p.message) for p in caught.value.problems]


def fields(doc: dict[str, Any]) -> list[str]:
    return [field for field, _ in problems(doc)]


F = {"name": "a", "function": "f"}


def test_the_design_example_is_valid_and_compiles() -> None:
    resource = parse_resource(
        flow(
            {"name": "scan", "function": "scanner", "input": "data.object"},
            {
                "name": "route",
                "choice": [{"when": "data.infected == true", "next": "quarantine"}],
                "default": "thumbs",
            },
            {
                "name": "thumbs",
                "parallel": [
                    {"function": "thumb-small"},
                    {"function": "thumb-large:v2", "input": "data"},
                ],
                "timeout": "30s",
                "onBranchFailure": "fail",
                "next": "store",
            },
            {"name": "quarantine", "function": "quarantine", "end": True},
            {"name": "store", "function": "store"},
        )
    )
    assert resource.kind is Kind.FLOW
    spec: FlowSpec = resource.model
    plan = spec.plan
    assert plan.first == "scan"
    assert [plan.after(s) for s in ("scan", "thumbs", "quarantine", "store")] == [
        "route",
        "store",
        None,
        None,
    ]
    assert spec.steps[2].timeout == 30.0


def test_cycles_are_allowed() -> None:
    parse_resource(
        flow(
            {"name": "work", "function": "f"},
            {"name": "again", "choice": [{"when": "data.more", "next": "work"}]},
        )
    )


def test_a_step_needs_exactly_one_kind() -> None:
    assert problems(flow({"name": "a"})) == [
        ("spec.steps[0]", "has none: give exactly one of function, choice or parallel")
    ]
    both = flow({"name": "a", "function": "f", "parallel": [{"function": "g"}]})
    [(field, message)] = problems(both)
    assert field == "spec.steps[0]"
    assert message == "has function and parallel: give exactly one of function, choice or parallel"


def test_names_declared_twice() -> None:
    assert problems(flow(F, {"name": "b", "function": "f"}, F)) == [
        ("spec.steps[2].name", "'a' is declared twice (spec.steps[0] too)")
    ]


@pytest.mark.parametrize(
    ("step", "field"),
    [
        ({"name": "a", "function": "f", "next": "nope"}, "spec.steps[0].next"),
        (
            {"name": "a", "choice": [{"when": "true", "next": "nope"}], "default": "a"},
            "spec.steps[0].choice[0].next",
        ),
        (
            {"name": "a", "choice": [{"when": "true", "next": "a"}], "default": "gone"},
            "spec.steps[0].default",
        ),
    ],
)
def test_unknown_step_names(step: dict[str, Any], field: str) -> None:
    found = problems(flow(step))
    assert found[0][0] == field
    assert "no step is named" in found[0][1]


def test_an_unreachable_step_is_refused() -> None:
    doc = flow({"name": "a", "function": "f", "end": True}, {"name": "b", "function": "f"})
    assert problems(doc) == [
        ("spec.steps[1]", "step 'b' cannot be reached from the first step 'a'")
    ]
    after_choice = flow(
        {"name": "a", "choice": [{"when": "true", "next": "c"}]},
        {"name": "b", "function": "f"},
        {"name": "c", "function": "f"},
    )
    assert fields(after_choice) == ["spec.steps[1]"]


@pytest.mark.parametrize(
    ("step", "field", "words"),
    [
        (
            {"name": "a", "choice": [{"when": "data.x >", "next": "a"}]},
            "spec.steps[0].choice[0].when",
            "syntax error at column",
        ),
        (
            {"name": "a", "choice": [{"when": "data.x + 1", "next": "a"}]},
            "spec.steps[0].choice[0].when",
            "not a bool",
        ),
        ({"name": "a", "function": "f", "input": "data.("}, "spec.steps[0].input", "column"),
        ({"name": "a", "function": "f", "input": "nosuch(1)"}, "spec.steps[0].input", "column 1"),
        ({"name": "a", "function": "f", "input": "Data.x"}, "spec.steps[0].input", "unknown name"),
        (
            {"name": "a", "parallel": [{"function": "f"}, {"function": "g", "input": "{"}]},
            "spec.steps[0].parallel[1].input",
            "syntax error",
        ),
        ({"name": "a", "function": "f", "input": "  "}, "spec.steps[0].input", "empty"),
    ],
)
def test_bad_expressions_are_refused_with_their_position(
    step: dict[str, Any], field: str, words: str
) -> None:
    [(got, message)] = problems(flow(step))
    assert got == field
    assert words in message, message


def test_a_mapping_may_yield_any_value() -> None:
    parse_resource(flow({"name": "a", "function": "f", "input": "{'k': [data.a, 1]}"}))
    parse_resource(flow({"name": "a", "function": "f", "input": "size(data.items) + 1"}))


@pytest.mark.parametrize(
    ("step", "field"),
    [
        ({"name": "a", "function": "f", "default": "a"}, "spec.steps[0].default"),
        ({"name": "a", "function": "f", "timeout": "5s"}, "spec.steps[0].timeout"),
        ({"name": "a", "function": "f", "onBranchFailure": "fail"},
         "spec.steps[0].onBranchFailure"),
        ({"name": "a", "choice": [{"when": "true", "next": "a"}], "next": "a"},
         "spec.steps[0].next"),
        ({"name": "a", "choice": [{"when": "true", "next": "a"}], "input": "data"},
         "spec.steps[0].input"),
        ({"name": "a", "parallel": [{"function": "f"}], "input": "data"}, "spec.steps[0].input"),
        ({"name": "a", "function": "f", "next": "a", "end": True}, "spec.steps[0].end"),
    ],
)  # fmt: skip
def test_fields_of_another_kind_of_step(step: dict[str, Any], field: str) -> None:
    assert fields(flow(step)) == [field]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"steps": []}, "spec.steps"),
        ({"steps": [{"name": "Bad_Name", "function": "f"}]}, "spec.steps[0].name"),
        ({"steps": [{"name": "a", "function": "not a target"}]}, "spec.steps[0].function"),
        ({"steps": [{"name": "a", "parallel": []}]}, "spec.steps[0].parallel"),
        ({"steps": [{"name": "a", "parallel": [{"function": "f"}], "timeout": 0}]},
         "spec.steps[0].timeout"),
        ({"steps": [{"name": "a", "parallel": [{"function": "f"}], "onBranchFailure": "skip"}]},
         "spec.steps[0].onBranchFailure"),
        ({"steps": [{"name": "a", "function": "f", "retry": 3}]}, "spec.steps[0].retry"),
    ],
)  # fmt: skip
def test_field_shapes(spec: dict[str, Any], field: str) -> None:
    doc = flow()
    doc["spec"] = spec
    assert fields(doc)[0] == field


def test_apply_errors_name_the_file_document_resource_and_field() -> None:
    text = (
        "apiVersion: eventhub/v1\nkind: Flow\nmetadata: {name: x}\n"
        "spec: {steps: [{name: a, function: f, next: b}]}\n"
    )
    with pytest.raises(ResourceInvalid) as caught:
        parse_text(text, "flows.yaml")
    assert str(caught.value) == "flows.yaml: Flow 'x': spec.steps[0].next: no step is named 'b'"


def test_a_binding_names_a_function_or_a_flow() -> None:
    def binding(**spec: Any) -> dict[str, Any]:
        return {
            "apiVersion": "eventhub/v1",
            "kind": "Binding",
            "metadata": {"name": "b"},
            "spec": {"source": "api", **spec},
        }

    assert parse_resource(binding(flow="uploads")).model.flow == "uploads"
    assert problems(binding()) == [("spec.function", "Field required (or give flow)")]
    assert problems(binding(function="f", flow="g")) == [("spec", "give either function or flow")]
    assert fields(binding(flow="g", ordering="ordered")) == ["spec"]
    assert fields(binding(flow="Not_A_Name")) == ["spec.flow"]
