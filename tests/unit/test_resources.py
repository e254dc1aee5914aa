"""Unit tests for eventhub.resources: declared resources are validated, naming file and field."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventhub.errors import InvalidInput, ResourceInvalid
from eventhub.resources import (
    API_VERSION,
    BindingSpec,
    FunctionSpec,
    Kind,
    Resource,
    RetrySpec,
    load_path,
    parse_resource,
    parse_text,
)
from eventhub.store import InvalidResource, parse_row
from eventhub.units import Rate

ORIGIN = "config/resize.yaml"


def document(kind: str, spec: Any, name: str = "resize-image", **top: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
        **top,
    }


def function(**spec: Any) -> dict[str, Any]:
    return document("Function", {"url": "http://resize:8080/", **spec})


def binding(**spec: Any) -> dict[str, Any]:
    return document("Binding", {"source": "orders", "function": "resize-image", **spec})


def invalid(doc: object, origin: str = ORIGIN, **kw: Any) -> ResourceInvalid:
    with pytest.raises(ResourceInvalid) as exc:
        parse_resource(doc, origin, **kw)
    return exc.value


def fields(error: ResourceInvalid) -> list[str]:
    return [p.field for p in error.problems]


# ---------------------------------------------------------------- valid documents


def test_function_defaults() -> None:
    resource = parse_resource(function(), ORIGIN)
    assert resource.kind is Kind.FUNCTION
    assert resource.name == "resize-image"
    assert resource.labels == {}
    model = resource.model
    assert isinstance(model, FunctionSpec)
    assert model.url == "http://resize:8080/"
    assert model.timeout == 30.0
    assert model.max_concurrency == 10
    assert model.rate_limit is None
    assert model.retry == RetrySpec()
    assert model.retry.max_attempts == 3
    assert model.retry.initial_delay == 1.0
    assert model.retry.max_delay == 300.0
    assert model.retry.multiplier == 2.0
    assert model.retry.jitter == 0.2
    assert model.max_event_age == 6 * 3600.0
    assert model.dead_letter is None
    assert model.event_format == "binary"
    assert model.headers == {}


def test_function_with_every_field() -> None:
    doc = function(
        url="https://fn.example.com/resize?x=1",
        timeout="1m30s",
        maxConcurrency=50,
        rateLimit="600/m",
        retry={
            "maxAttempts": 7,
            "initialDelay": "250ms",
            "maxDelay": "5m",
            "multiplier": 3,
            "jitter": 0.5,
        },
        maxEventAge="1d",
        deadLetter={"function": "dlq-handler"},
        eventFormat="structured",
        headers={"X-Api-Key": "k"},
    )
    model = parse_resource(doc, ORIGIN).model
    assert model.timeout == 90.0
    assert model.max_concurrency == 50
    assert model.rate_limit == Rate(count=600.0, period=60.0)
    assert model.retry == RetrySpec(
        max_attempts=7, initial_delay=0.25, max_delay=300.0, multiplier=3.0, jitter=0.5
    )
    assert model.max_event_age == 86400.0
    assert model.dead_letter.function == "dlq-handler"
    assert model.event_format == "structured"
    assert model.headers == {"X-Api-Key": "k"}


def test_spec_is_kept_as_written_and_document_round_trips() -> None:
    doc = function(timeout="45s", retry={"maxAttempts": 5})
    doc["metadata"]["labels"] = {"team": "media"}
    resource = parse_resource(doc, ORIGIN)
    assert resource.spec == {
        "url": "http://resize:8080/",
        "timeout": "45s",
        "retry": {"maxAttempts": 5},
    }
    assert resource.labels == {"team": "media"}
    assert resource.document() == {**doc, "status": {"paused": False}}
    assert parse_resource(resource.document()) == resource


def test_document_omits_empty_labels() -> None:
    assert "labels" not in parse_resource(function()).document()["metadata"]


def test_snake_case_field_names_are_accepted_too() -> None:
    model = parse_resource(function(max_concurrency=3, retry={"max_attempts": 2})).model
    assert model.max_concurrency == 3
    assert model.retry.max_attempts == 2


SOURCES = {
    "kafka": {"bootstrapServers": ["127.0.0.1:9092"], "topics": ["orders"]},
    "rabbitmq": {"queue": "orders"},
    "mqtt": {"topics": ["sensors/#"]},
    "minio": {"mode": "webhook", "authToken": "s3cret"},
    "cron": {"schedule": "*/5 * * * *"},
}


@pytest.mark.parametrize("source_type", sorted(SOURCES))
def test_source_accepts_every_type(source_type: str) -> None:
    spec = {"type": source_type, **SOURCES[source_type]}
    resource = parse_resource(document("Source", spec), ORIGIN)
    assert resource.kind is Kind.SOURCE
    assert resource.model.type == source_type
    assert resource.spec == spec


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"type": "nope"}, "spec.type"),
        ({"type": "kafka", "bootstrapServers": ["b"], "topics": ["t"], "colour": 1}, "spec.colour"),
        ({"type": "cron", "schedule": "61 * * * *"}, "spec.schedule"),
        ({"type": "cron", "schedule": "@every 30s", "timezone": "Mars/Base"}, "spec.timezone"),
        ({"type": "mqtt", "topics": ["a/#/b"]}, "spec.topics"),
        ({"type": "rabbitmq"}, "spec.queue"),
        ({"type": "minio", "mode": "webhook"}, "spec"),  # a webhook needs its authToken
    ],
)
def test_source_options_are_validated_when_declared(spec: dict[str, object], field: str) -> None:
    with pytest.raises(ResourceInvalid) as info:
        parse_resource(document("Source", spec), ORIGIN)
    assert info.value.problems[0].field == field


def test_binding_defaults_to_no_filter() -> None:
    resource = parse_resource(binding(), ORIGIN)
    assert resource.kind is Kind.BINDING
    assert isinstance(resource.model, BindingSpec)
    assert resource.model.source == "orders"
    assert resource.model.function == "resize-image"
    assert resource.model.filter == []


def test_binding_with_valid_filter() -> None:
    spec_filter = [
        {"exact": {"type": "com.example.created"}},
        {"any": [{"prefix": {"subject": "eu/"}}, {"suffix": {"subject": ".json"}}]},
        {"not": {"exact": {"tenant": "test"}}},
    ]
    assert parse_resource(binding(filter=spec_filter)).model.filter == spec_filter


@pytest.mark.parametrize(
    "name", ["a", "0", "resize-image", "a1-b2", "x" * 63, "a" + "-" * 61 + "b"]
)
def test_valid_names(name: str) -> None:
    assert parse_resource(document("Function", {"url": "http://f/"}, name=name)).name == name


def test_kind_plural() -> None:
    assert [k.plural for k in Kind] == ["functions", "sources", "bindings", "flows"]


def test_expected_kind_accepted() -> None:
    assert parse_resource(binding(), kind=Kind.BINDING).kind is Kind.BINDING


# ---------------------------------------------------------------- rejections: envelope


@pytest.mark.parametrize("version", ["eventhub/v2", "v1", "", None, 1])
def test_wrong_api_version(version: Any) -> None:
    error = invalid({**function(), "apiVersion": version})
    assert fields(error) == ["apiVersion"]
    assert API_VERSION in str(error)


def test_missing_api_version() -> None:
    doc = function()
    del doc["apiVersion"]
    assert fields(invalid(doc)) == ["apiVersion"]


@pytest.mark.parametrize("kind", ["Gadget", "function", "FUNCTION", "", None, 3])
def test_unknown_kind(kind: Any) -> None:
    assert fields(invalid({**function(), "kind": kind})) == ["kind"]


def test_unexpected_kind() -> None:
    error = invalid(function(), kind=Kind.BINDING)
    assert fields(error) == ["kind"]
    assert "Binding" in error.problems[0].message


@pytest.mark.parametrize(
    "name",
    [
        "Resize",
        "resize_image",
        "-resize",
        "resize-",
        "",
        "x" * 64,
        "a.b",
        "résumé",
        "a b",
        42,
        None,
    ],
)
def test_bad_metadata_name(name: Any) -> None:
    error = invalid(document("Function", {"url": "http://f/"}, name=name))
    assert fields(error) == ["metadata.name"]


def test_missing_metadata() -> None:
    doc = function()
    del doc["metadata"]
    assert fields(invalid(doc)) == ["metadata"]


@pytest.mark.parametrize("labels", [{"team": 1}, {1: "x"}, ["team"], "team"])
def test_bad_labels(labels: Any) -> None:
    doc = function()
    doc["metadata"]["labels"] = labels
    assert fields(invalid(doc)) == ["metadata.labels"]


@pytest.mark.parametrize("spec", [None, "url: x", ["url"], 1])
def test_spec_must_be_a_mapping(spec: Any) -> None:
    assert fields(invalid(document("Function", spec))) == ["spec"]


def test_missing_spec() -> None:
    doc = function()
    del doc["spec"]
    assert fields(invalid(doc)) == ["spec"]


@pytest.mark.parametrize("doc", [None, [], "Function", 1])
def test_document_must_be_a_mapping(doc: object) -> None:
    error = invalid(doc)
    assert error.kind == "resource"
    assert ORIGIN in str(error)


# ---------------------------------------------------------------- rejections: spec fields


@pytest.mark.parametrize(
    "url",
    ["ftp://host/x", "/relative/path", "resize:8080", "http://", "", "mailto:a@b.c", "file:///x"],
)
def test_function_bad_url(url: str) -> None:
    error = invalid(function(url=url))
    assert fields(error) == ["spec.url"]
    assert "http" in error.problems[0].message


def test_function_missing_url() -> None:
    assert fields(invalid(document("Function", {}))) == ["spec.url"]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"retry": {"maxAttempts": 0}}, "spec.retry.maxAttempts"),
        ({"retry": {"maxAttempts": 101}}, "spec.retry.maxAttempts"),
        ({"retry": {"maxAttempts": "many"}}, "spec.retry.maxAttempts"),
        ({"retry": {"multiplier": 0.5}}, "spec.retry.multiplier"),
        ({"retry": {"jitter": 1.5}}, "spec.retry.jitter"),
        ({"retry": {"jitter": -0.1}}, "spec.retry.jitter"),
        ({"retry": {"initialDelay": "soon"}}, "spec.retry.initialDelay"),
        ({"retry": {"maxDelay": "-5"}}, "spec.retry.maxDelay"),
        ({"retry": "3"}, "spec.retry"),
        ({"timeout": "0s"}, "spec.timeout"),
        ({"timeout": "later"}, "spec.timeout"),
        ({"timeout": -1}, "spec.timeout"),
        ({"maxConcurrency": 0}, "spec.maxConcurrency"),
        ({"maxConcurrency": 10_001}, "spec.maxConcurrency"),
        ({"maxEventAge": "forever"}, "spec.maxEventAge"),
        ({"eventFormat": "xml"}, "spec.eventFormat"),
        ({"deadLetter": {"function": "Bad_Name"}}, "spec.deadLetter.function"),
        ({"deadLetter": {}}, "spec.deadLetter.function"),
        ({"headers": {"X-Count": 1}}, "spec.headers.X-Count"),
    ],
)
def test_function_field_problems_are_named(spec: dict[str, Any], field: str) -> None:
    error = invalid(function(**spec))
    assert fields(error) == [field]


@pytest.mark.parametrize("rate", ["fast", "50", "0/s", "50/x", 5, ["50/s"]])
def test_function_bad_rate_limit(rate: Any) -> None:
    assert fields(invalid(function(rateLimit=rate))) == ["spec.rateLimit"]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"timeOut": "5s"}, "spec.timeOut"),
        ({"retry": {"maxAtempts": 2}}, "spec.retry.maxAtempts"),
        ({"deadLetter": {"function": "dlq", "stream": "x"}}, "spec.deadLetter.stream"),
    ],
)
def test_function_unknown_field_is_named(spec: dict[str, Any], field: str) -> None:
    error = invalid(function(**spec))
    assert fields(error) == [field]
    assert "Extra inputs" in error.problems[0].message


def test_every_problem_is_reported() -> None:
    error = invalid(function(maxConcurrency=0, retry={"jitter": 2, "multiplier": 0}))
    assert sorted(fields(error)) == [
        "spec.maxConcurrency",
        "spec.retry.jitter",
        "spec.retry.multiplier",
    ]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({}, "spec.type"),
        ({"type": "sqs"}, "spec.type"),
    ],
)
def test_source_problems(spec: dict[str, Any], field: str) -> None:
    assert fields(invalid(document("Source", spec))) == [field]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"source": "Orders"}, "spec.source"),
        ({"function": "fn_1"}, "spec.function"),
        ({"when": "always"}, "spec.when"),
        ({"filter": {"exact": {"type": "x"}}}, "spec.filter"),
    ],
)
def test_binding_field_problems(spec: dict[str, Any], field: str) -> None:
    assert fields(invalid(binding(**spec))) == [field]


def test_binding_missing_fields() -> None:
    error = invalid(document("Binding", {}))
    assert sorted(fields(error)) == ["spec.function", "spec.source"]


@pytest.mark.parametrize(
    ("spec_filter", "field"),
    [
        ([{"exact": {"type": 1}}], "spec.filter[0].exact.type"),
        ([{"bogus": {"type": "x"}}], "spec.filter[0].bogus"),
        ([{"exact": {"type": "a"}}, {"prefix": {}}], "spec.filter[1].prefix"),
        ([{"exact": {"type": "a"}}, {"all": [{"prefix": {}}]}], "spec.filter[1].all[0].prefix"),
    ],
)
def test_binding_invalid_filter_names_the_path(spec_filter: list[Any], field: str) -> None:
    error = invalid(binding(filter=spec_filter))
    assert error.kind == "Binding"
    assert error.name == "resize-image"
    assert fields(error) == [field]
    assert field in str(error)


def test_function_nan_timeout_is_rejected() -> None:
    assert fields(invalid(function(timeout=math.nan))) == ["spec.timeout"]


# ---------------------------------------------------------------- the error message


def test_message_names_origin_kind_name_and_field() -> None:
    error = invalid(function(retry={"maxAttempts": 0}))
    assert isinstance(error, InvalidInput)
    assert error.status == 400
    assert error.origin == ORIGIN
    assert error.kind == "Function"
    assert error.name == "resize-image"
    message = str(error)
    assert message.startswith(f"{ORIGIN}: Function 'resize-image': spec.retry.maxAttempts: ")
    assert error.detail == message


def test_message_without_origin() -> None:
    error = invalid(function(url="ftp://x"), origin="")
    assert str(error).startswith("Function 'resize-image': spec.url: ")


def test_message_shows_the_bad_name_and_kind() -> None:
    error = invalid({**document("Gadget", {}, name="Thing")})
    assert str(error).startswith(f"{ORIGIN}: Gadget 'Thing': kind: ")


def test_message_with_unknown_name() -> None:
    doc = function()
    del doc["metadata"]
    assert str(invalid(doc)).startswith(f"{ORIGIN}: Function '?': metadata: ")


# ---------------------------------------------------------------- load_path

FUNCTION_YAML = """\
apiVersion: eventhub/v1
kind: Function
metadata: {name: resize-image}
spec:
  url: http://resize:8080/
  retry: {maxAttempts: 5}
"""

MULTI_YAML = """\
apiVersion: eventhub/v1
kind: Source
metadata: {name: orders}
spec: {type: kafka, bootstrapServers: ["127.0.0.1:9092"], topics: [orders]}
---
apiVersion: eventhub/v1
kind: Binding
metadata: {name: orders-to-resize}
spec:
  source: orders
  function: resize-image
  filter:
    - exact: {type: com.example.created}
---
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_load_path_folder_reads_yaml_files_sorted(tmp_path: Path) -> None:
    write(tmp_path / "b-multi.yml", MULTI_YAML)
    write(tmp_path / "a-function.yaml", FUNCTION_YAML)
    write(tmp_path / "nested" / "c.yaml", FUNCTION_YAML.replace("resize-image", "thumbnail"))
    write(tmp_path / "notes.txt", "not: a resource")
    write(tmp_path / "README.md", "# nothing")
    resources = load_path(tmp_path)
    assert [(r.kind, r.name) for r in resources] == [
        (Kind.FUNCTION, "resize-image"),
        (Kind.SOURCE, "orders"),
        (Kind.BINDING, "orders-to-resize"),
        (Kind.FUNCTION, "thumbnail"),
    ]
    assert resources[0].model.retry.max_attempts == 5
    assert resources[2].model.filter == [{"exact": {"type": "com.example.created"}}]


def test_load_path_single_file(tmp_path: Path) -> None:
    resources = load_path(write(tmp_path / "multi.yaml", MULTI_YAML))
    assert [r.name for r in resources] == ["orders", "orders-to-resize"]
    assert all(isinstance(r, Resource) for r in resources)


def test_load_path_empty_folder_and_empty_file(tmp_path: Path) -> None:
    assert load_path(tmp_path) == []
    assert load_path(write(tmp_path / "empty.yaml", "---\n# nothing here\n")) == []


def test_load_path_invalid_resource_names_the_file(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", FUNCTION_YAML.replace("maxAttempts: 5", "maxAttempts: 0"))
    with pytest.raises(ResourceInvalid) as exc:
        load_path(tmp_path)
    assert exc.value.origin == str(bad)
    assert fields(exc.value) == ["spec.retry.maxAttempts"]
    assert str(exc.value).startswith(f"{bad}: Function 'resize-image': spec.retry.maxAttempts")


def test_load_path_invalid_second_document_names_the_document(tmp_path: Path) -> None:
    file = write(tmp_path / "multi.yaml", MULTI_YAML.replace("source: orders", "source: Orders"))
    with pytest.raises(ResourceInvalid) as exc:
        load_path(file)
    assert exc.value.origin == f"{file} (document 2)"
    assert exc.value.kind == "Binding"
    assert exc.value.name == "orders-to-resize"
    assert fields(exc.value) == ["spec.source"]


def test_load_path_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", FUNCTION_YAML)
    bad = write(
        tmp_path / "broken.yaml", "apiVersion: eventhub/v1\nkind: Function\nspec: [unclosed\n"
    )
    with pytest.raises(ResourceInvalid) as exc:
        load_path(tmp_path)
    message = str(exc.value)
    assert exc.value.origin == str(bad)
    assert str(bad) in message
    assert "not valid YAML" in message
    assert "line 4" in message  # the parser notices the unclosed flow sequence at the end


def test_load_path_invalid_yaml_line_of_bad_indentation(tmp_path: Path) -> None:
    bad = write(tmp_path / "indent.yaml", "kind: Function\nspec:\n  url: x\n bad: y\n")
    with pytest.raises(ResourceInvalid) as exc:
        load_path(bad)
    assert "line 4" in str(exc.value)


def test_load_path_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ResourceInvalid) as exc:
        load_path(missing)
    assert exc.value.origin == str(missing)


def test_load_path_non_mapping_document(tmp_path: Path) -> None:
    file = write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(ResourceInvalid) as exc:
        load_path(file)
    assert exc.value.origin == str(file)


def test_load_path_refuses_a_key_set_twice_naming_file_document_resource_and_key(
    tmp_path: Path,
) -> None:
    twice = MULTI_YAML.replace("  function: resize-image\n", "  function: a\n  function: b\n")
    file = write(tmp_path / "multi.yaml", twice)
    with pytest.raises(ResourceInvalid) as exc:
        load_path(tmp_path)
    assert str(exc.value) == (
        f"{file} (document 2): Binding 'orders-to-resize':"
        " spec.function: duplicate key (set at lines 11 and 12)"
    )
    assert fields(exc.value) == ["spec.function"]


def test_a_key_set_twice_where_kind_and_name_are_unknown(tmp_path: Path) -> None:
    file = write(tmp_path / "f.yaml", "apiVersion: eventhub/v1\napiVersion: eventhub/v1\n")
    with pytest.raises(ResourceInvalid) as exc:
        load_path(file)
    assert str(exc.value) == (
        f"{file} (document 1): resource '?': apiVersion: duplicate key (set at lines 1 and 2)"
    )


def test_parse_text_numbers_documents_by_their_place(tmp_path: Path) -> None:
    text = "---\n# nothing yet\n---\n" + FUNCTION_YAML.replace("maxAttempts: 5", "maxAttempts: 0")
    with pytest.raises(ResourceInvalid) as exc:
        parse_text(text, "inline.yaml")
    assert exc.value.origin == "inline.yaml (document 2)"
    assert [r.name for r in parse_text(FUNCTION_YAML, "inline.yaml")] == ["resize-image"]


# ---------------------------------------------------------------- stored rows


def row(kind: str, spec: object, name: str = "r1", paused: bool = False) -> dict[str, Any]:
    return {
        "kind": kind,
        "name": name,
        "spec": orjson.dumps(spec).decode(),
        "labels": "{}",
        "paused": paused,
    }


def test_a_stored_row_that_validates_is_a_resource() -> None:
    parsed = parse_row(row("Binding", {"source": "api", "function": "f"}, paused=True))
    assert isinstance(parsed, Resource) and parsed.paused and parsed.model.function == "f"


@pytest.mark.parametrize(
    ("kind", "spec", "error"),
    [
        (
            "Source",
            {"type": "cron", "schedule": "@hourly", "timezone": "Mars/Olympus"},
            "spec.timezone: ",
        ),
        ("Binding", {"source": "api", "function": "f", "colour": "red"}, "spec.colour: "),
        ("Binding", {"source": "api", "function": 7}, "spec.function: "),
        ("Function", ["not", "a", "mapping"], "spec: is required and must be a mapping"),
    ],
)
def test_a_stored_row_that_does_not_validate_is_kept_apart_with_its_error(
    kind: str, spec: object, error: str
) -> None:
    parsed = parse_row(row(kind, spec, paused=True))
    assert isinstance(parsed, InvalidResource)
    assert (parsed.kind.value, parsed.name, parsed.spec) == (kind, "r1", spec)
    assert parsed.error.startswith(error)
    doc = parsed.document()
    assert doc["spec"] == spec and doc["metadata"] == {"name": "r1"}
    assert doc["status"]["invalid"] is True and doc["status"]["error"] == parsed.error
    assert ("paused" in doc["status"]) is (kind != "Function")
