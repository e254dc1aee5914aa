"""Unit tests for eventhub.filters: CloudEvents Subscriptions API filter dialects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from enum import IntEnum, StrEnum
from typing import Any

import pytest

from eventhub.filters import (
    DIALECTS,
    Attributes,
    FilterError,
    canonical_string,
    compile_filters,
)

EVENT: dict[str, object] = {
    "specversion": "1.0",
    "id": "evt-1",
    "source": "/orders/service",
    "type": "com.example.order.created",
    "subject": "orders/eu/123.json",
    "datacontenttype": "application/json",
    "time": datetime(2024, 5, 1, 12, 30, 0, tzinfo=UTC),
    "priority": 5,
    "urgent": True,
    "archived": False,
    "tenant": "acme",
    "empty": "",
}


def matches(spec: Sequence[Mapping[str, Any]] | None, event: Attributes = EVENT) -> bool:
    return compile_filters(spec)(event)


def one(expr: Mapping[str, Any], event: Attributes = EVENT) -> bool:
    return matches([expr], event)


# ---------------------------------------------------------------- top level


@pytest.mark.parametrize("spec", [None, [], ()])
def test_no_filter_matches_everything(spec: Sequence[Mapping[str, Any]] | None) -> None:
    predicate = compile_filters(spec)
    assert predicate(EVENT)
    assert predicate({})


def test_top_level_list_is_and() -> None:
    both = [{"exact": {"type": "com.example.order.created"}}, {"exact": {"tenant": "acme"}}]
    assert matches(both)
    assert not matches([*both, {"exact": {"tenant": "other"}}])
    assert not matches([{"exact": {"tenant": "other"}}, *both])


def test_top_level_tuple_accepted() -> None:
    assert matches(({"exact": {"tenant": "acme"}}, {"prefix": {"type": "com."}}))


def test_predicate_is_reusable_across_events() -> None:
    predicate = compile_filters([{"prefix": {"type": "com.example."}}])
    assert predicate({"type": "com.example.a"})
    assert not predicate({"type": "org.example.a"})
    assert predicate({"type": "com.example.b"})
    assert not predicate({})


# ---------------------------------------------------------------- exact


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ({"type": "com.example.order.created"}, True),
        ({"type": "com.example.order"}, False),
        ({"type": "com.example.order.created.v2"}, False),
        ({"type": "COM.EXAMPLE.ORDER.CREATED"}, False),
        ({"source": "/orders/service"}, True),
        ({"id": "evt-1"}, True),
        ({"specversion": "1.0"}, True),
        ({"subject": "orders/eu/123.json"}, True),
        ({"datacontenttype": "application/json"}, True),
        ({"tenant": "acme"}, True),
        ({"tenant": "acme "}, False),
        ({"empty": ""}, True),
        ({"empty": "x"}, False),
        ({"type": "com.example.order.created", "source": "/orders/service"}, True),
        ({"type": "com.example.order.created", "source": "/other"}, False),
        ({"type": "other", "source": "/orders/service"}, False),
        ({"type": "com.example.order.created", "tenant": "acme", "id": "evt-1"}, True),
        ({"type": "com.example.order.created", "tenant": "acme", "id": "evt-2"}, False),
    ],
)
def test_exact(attrs: dict[str, str], expected: bool) -> None:
    assert one({"exact": attrs}) is expected


# ---------------------------------------------------------------- prefix


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ({"type": "com.example."}, True),
        ({"type": "com.example.order.created"}, True),
        ({"type": "com.example.order.created."}, False),
        ({"type": "org."}, False),
        ({"type": "Com."}, False),
        ({"type": ""}, True),
        ({"subject": "orders/eu/"}, True),
        ({"subject": "orders/us/"}, False),
        ({"empty": ""}, True),
        ({"empty": "a"}, False),
        ({"type": "com.", "source": "/orders/"}, True),
        ({"type": "com.", "source": "/billing/"}, False),
        ({"type": "org.", "source": "/orders/"}, False),
    ],
)
def test_prefix(attrs: dict[str, str], expected: bool) -> None:
    assert one({"prefix": attrs}) is expected


# ---------------------------------------------------------------- suffix


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ({"subject": ".json"}, True),
        ({"subject": "123.json"}, True),
        ({"subject": ".jpg"}, False),
        ({"subject": ".JSON"}, False),
        ({"subject": "x/orders/eu/123.json"}, False),
        ({"subject": ""}, True),
        ({"type": ".created"}, True),
        ({"empty": ""}, True),
        ({"empty": "a"}, False),
        ({"subject": ".json", "type": ".created"}, True),
        ({"subject": ".json", "type": ".deleted"}, False),
        ({"subject": ".tmp", "type": ".created"}, False),
    ],
)
def test_suffix(attrs: dict[str, str], expected: bool) -> None:
    assert one({"suffix": attrs}) is expected


# ---------------------------------------------------------------- absence


@pytest.mark.parametrize("dialect", ["exact", "prefix", "suffix"])
@pytest.mark.parametrize("value", ["", "x", "dataschema"])
def test_absent_attribute_never_matches(dialect: str, value: str) -> None:
    assert not one({dialect: {"dataschema": value}})
    assert not one({dialect: {"dataschema": value}}, {})
    assert not one({dialect: {"type": value, "dataschema": value}}, {"type": value})
    assert not one({dialect: {"dataschema": value, "type": value}}, {"type": value})


@pytest.mark.parametrize("dialect", ["exact", "prefix", "suffix"])
def test_none_value_is_absent(dialect: str) -> None:
    assert not one({dialect: {"subject": ""}}, {"subject": None})
    assert not one({dialect: {"type": "", "subject": ""}}, {"type": "", "subject": None})
    assert one({"not": {dialect: {"subject": ""}}}, {"subject": None})


@pytest.mark.parametrize("dialect", ["exact", "prefix", "suffix"])
def test_not_matches_absent_attribute(dialect: str) -> None:
    assert one({"not": {dialect: {"dataschema": ""}}})


def test_attribute_names_are_case_sensitive_lookups() -> None:
    assert not one({"exact": {"type": "a"}}, {"Type": "a"})


# ---------------------------------------------------------------- non-string values


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ({"exact": {"urgent": "true"}}, True),
        ({"exact": {"urgent": "True"}}, False),
        ({"exact": {"urgent": "1"}}, False),
        ({"exact": {"archived": "false"}}, True),
        ({"exact": {"archived": "False"}}, False),
        ({"exact": {"archived": "0"}}, False),
        ({"prefix": {"urgent": "tr"}}, True),
        ({"suffix": {"archived": "lse"}}, True),
        ({"exact": {"priority": "5"}}, True),
        ({"exact": {"priority": "5.0"}}, False),
        ({"exact": {"priority": "05"}}, False),
        ({"prefix": {"priority": ""}}, True),
        ({"exact": {"time": "2024-05-01T12:30:00Z"}}, True),
        ({"exact": {"time": "2024-05-01T12:30:00+00:00"}}, False),
        ({"prefix": {"time": "2024-05-01T"}}, True),
        ({"prefix": {"time": "2024-06"}}, False),
        ({"suffix": {"time": "Z"}}, True),
        ({"exact": {"urgent": "true", "priority": "5", "tenant": "acme"}}, True),
        ({"prefix": {"urgent": "t", "priority": "5", "time": "2024"}}, True),
        ({"suffix": {"urgent": "e", "priority": "5", "time": "Z"}}, True),
        ({"exact": {"urgent": "true", "priority": "6"}}, False),
    ],
)
def test_non_string_attribute_values(expr: Mapping[str, Any], expected: bool) -> None:
    assert one(expr) is expected


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("abc", "abc"),
        ("", ""),
        (True, "true"),
        (False, "false"),
        (0, "0"),
        (42, "42"),
        (-7, "-7"),
        (2**40, "1099511627776"),
        (datetime(2024, 5, 1, 12, 30, tzinfo=UTC), "2024-05-01T12:30:00Z"),
        (datetime(2024, 5, 1, 12, 30, 0, 123456, tzinfo=UTC), "2024-05-01T12:30:00.123456Z"),
        (datetime(2024, 5, 1, 12, 30, tzinfo=timezone(timedelta(0))), "2024-05-01T12:30:00Z"),
        (
            datetime(2024, 5, 1, 14, 30, tzinfo=timezone(timedelta(hours=2))),
            "2024-05-01T14:30:00+02:00",
        ),
        (
            datetime(2024, 5, 1, 7, 0, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
            "2024-05-01T07:00:00-05:30",
        ),
        (datetime(2024, 5, 1, 12, 30), "2024-05-01T12:30:00Z"),  # noqa: DTZ001 - naive on purpose
        (b"\x00\x01hi", "AAFoaQ=="),
        (bytearray(b"hi"), "aGk="),
        (None, None),
        (1.5, "1.5"),
    ],
)
def test_canonical_string(value: object, text: str | None) -> None:
    assert canonical_string(value) == text


class Color(StrEnum):
    RED = "red"


class Level(IntEnum):
    HIGH = 3


def test_canonical_string_of_subclasses() -> None:
    assert canonical_string(Color.RED) == "red"
    assert type(canonical_string(Color.RED)) is str
    assert canonical_string(Level.HIGH) == "3"
    assert one({"exact": {"color": "red", "level": "3"}}, {"color": Color.RED, "level": Level.HIGH})


def test_naive_datetime_treated_as_utc() -> None:
    naive = datetime(2024, 1, 2, 3, 4, 5)  # noqa: DTZ001 - naive on purpose
    assert one({"exact": {"time": "2024-01-02T03:04:05Z"}}, {"time": naive})


def test_offset_datetime_compared_in_its_own_offset() -> None:
    when = datetime(2024, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    assert one({"exact": {"time": "2024-01-02T05:04:05+02:00"}}, {"time": when})
    assert not one({"exact": {"time": "2024-01-02T03:04:05Z"}}, {"time": when})


# ---------------------------------------------------------------- all / any / not

T = {"exact": {"tenant": "acme"}}  # true on EVENT
F = {"exact": {"tenant": "other"}}  # false on EVENT


@pytest.mark.parametrize(
    ("items", "expected"),
    [([], True), ([T], True), ([F], False), ([T, T], True), ([T, F], False), ([F, T], False)],
)
def test_all(items: list[Mapping[str, Any]], expected: bool) -> None:
    assert one({"all": items}) is expected


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ([], False),
        ([T], True),
        ([F], False),
        ([F, F], False),
        ([T, F], True),
        ([F, T], True),
        ([F, F, T], True),
    ],
)
def test_any(items: list[Mapping[str, Any]], expected: bool) -> None:
    assert one({"any": items}) is expected


@pytest.mark.parametrize(
    ("inner", "expected"),
    [
        (T, False),
        (F, True),
        ({"all": []}, False),
        ({"any": []}, True),
        ({"not": T}, True),
        ({"not": F}, False),
        ({"not": {"not": T}}, False),
        ({"all": [T, F]}, True),
        ({"any": [T, F]}, False),
    ],
)
def test_not(inner: Mapping[str, Any], expected: bool) -> None:
    assert one({"not": inner}) is expected


def test_any_and_all_short_circuit() -> None:
    calls: list[str] = []

    class Spy(dict[str, object]):
        def get(self, key: str, default: object = None) -> object:
            calls.append(key)
            return super().get(key, default)

    event = Spy(a="1", b="2")
    assert one({"any": [{"exact": {"a": "1"}}, {"exact": {"b": "2"}}]}, event)
    assert calls == ["a"]
    calls.clear()
    assert not one({"all": [{"exact": {"a": "x"}}, {"exact": {"b": "2"}}]}, event)
    assert calls == ["a"]
    calls.clear()
    assert not one({"exact": {"a": "x", "b": "2"}}, event)
    assert calls == ["a"]


def test_readme_example() -> None:
    spec: list[Mapping[str, Any]] = [
        {"exact": {"type": "com.example.order.created"}},
        {
            "any": [
                {"prefix": {"subject": "orders/eu/"}},
                {"not": {"suffix": {"subject": ".tmp"}}},
            ]
        },
    ]
    predicate = compile_filters(spec)
    created = "com.example.order.created"
    assert predicate({"type": created, "subject": "orders/eu/1.tmp"})
    assert predicate({"type": created, "subject": "orders/us/1.json"})
    assert not predicate({"type": created, "subject": "orders/us/1.tmp"})
    assert predicate({"type": created})  # no subject: "not suffix" holds
    assert not predicate({"type": "com.example.order.deleted", "subject": "orders/eu/1"})


def test_deep_nesting() -> None:
    spec = [
        {
            "all": [
                {"prefix": {"type": "com.example."}},
                {
                    "any": [
                        {
                            "all": [
                                {"exact": {"tenant": "acme"}},
                                {"not": {"exact": {"urgent": "false"}}},
                            ]
                        },
                        {"suffix": {"subject": ".xml"}},
                    ]
                },
                {"not": {"any": [{"exact": {"priority": "1"}}, {"exact": {"priority": "2"}}]}},
            ]
        }
    ]
    assert matches(spec)
    assert not matches(spec, {**EVENT, "urgent": False})
    assert matches(spec, {**EVENT, "urgent": False, "subject": "a.xml"})
    assert not matches(spec, {**EVENT, "priority": 2})
    assert not matches(spec, {**EVENT, "type": "org.example"})


def test_attribute_map_order_irrelevant() -> None:
    a = compile_filters([{"exact": {"type": "com.example.order.created", "tenant": "acme"}}])
    b = compile_filters([{"exact": {"tenant": "acme", "type": "com.example.order.created"}}])
    for event in (EVENT, {"tenant": "acme"}, {**EVENT, "tenant": "x"}):
        assert a(event) == b(event)


def test_spec_mutation_after_compile_has_no_effect() -> None:
    attrs = {"type": "com.example.order.created"}
    items: list[Mapping[str, Any]] = [{"exact": attrs}]
    predicate = compile_filters(items)
    attrs["type"] = "other"
    items.append({"exact": {"tenant": "nobody"}})
    assert predicate(EVENT)


def test_dialects_constant() -> None:
    assert DIALECTS == ("all", "any", "cel", "exact", "not", "prefix", "suffix")


# ---------------------------------------------------------------- validation


def test_filter_error_shape() -> None:
    err = FilterError("filter[0].exact.type", "value must be a string")
    assert isinstance(err, ValueError)
    assert err.path == "filter[0].exact.type"
    assert err.message == "value must be a string"
    assert str(err) == "filter[0].exact.type: value must be a string"


def error_of(spec: Any, path: str = "filter") -> FilterError:
    with pytest.raises(FilterError) as info:
        compile_filters(spec, path)
    err = info.value
    assert str(err) == f"{err.path}: {err.message}"
    return err


@pytest.mark.parametrize(
    ("spec", "path", "fragment"),
    [
        # top level
        ({"exact": {"type": "a"}}, "filter", "must be a list of filter expressions, got dict"),
        ("exact", "filter", "must be a list of filter expressions, got str"),
        (b"exact", "filter", "got bytes"),
        (5, "filter", "got int"),
        # expression shape
        ([None], "filter[0]", "got null"),
        (["exact"], "filter[0]", "must be a filter expression mapping"),
        ([[{"exact": {"type": "a"}}]], "filter[0]", "got list"),
        ([{}], "filter[0]", "empty filter expression; expected one of: all, any, cel, exact, not"),
        (
            [{"exact": {"type": "a"}, "prefix": {"type": "b"}}],
            "filter[0]",
            "exactly one dialect key, got 2: exact, prefix",
        ),
        ([T, {"all": [], "any": [], "not": T}], "filter[1]", "got 3: all, any, not"),
        # unknown dialects
        ([{"exists": {"type": ""}}], "filter[0].exists", "unknown filter dialect 'exists'"),
        ([{"Exact": {"type": "a"}}], "filter[0].Exact", "unknown filter dialect 'Exact'"),
        ([{"cesql": "type = 'a'"}], "filter[0].cesql", "CESQL dialect is not supported"),
        ([{1: {"type": "a"}}], "filter[0][1]", "unknown filter dialect 1"),
        ([{"my-dialect": {}}], "filter[0]['my-dialect']", "unknown filter dialect"),
        # attribute dialects: value shape
        ([{"exact": "type"}], "filter[0].exact", "must be a mapping of attribute name"),
        ([{"prefix": ["type"]}], "filter[0].prefix", "got list"),
        ([{"suffix": None}], "filter[0].suffix", "got null"),
        ([{"exact": {}}], "filter[0].exact", "must name at least one attribute"),
        ([{"prefix": {}}], "filter[0].prefix", "must name at least one attribute"),
        ([{"suffix": {}}], "filter[0].suffix", "must name at least one attribute"),
        # attribute names
        ([{"exact": {"": "a"}}], "filter[0].exact['']", "attribute name must not be empty"),
        ([{"exact": {"Type": "a"}}], "filter[0].exact.Type", "invalid attribute name 'Type'"),
        ([{"prefix": {"my-ext": "a"}}], "filter[0].prefix['my-ext']", "invalid attribute name"),
        ([{"suffix": {"my_ext": "a"}}], "filter[0].suffix.my_ext", "lowercase a-z and 0-9"),
        ([{"exact": {"a b": "a"}}], "filter[0].exact['a b']", "invalid attribute name"),
        ([{"exact": {"caf\u00e9": "a"}}], "filter[0].exact['caf\u00e9']", "invalid attribute"),
        ([{"exact": {"type\n": "a"}}], "filter[0].exact['type\\n']", "invalid attribute name"),
        ([{"exact": {1: "a"}}], "filter[0].exact[1]", "attribute name must be a string, got int"),
        ([{"exact": {None: "a"}}], "filter[0].exact[None]", "must be a string, got null"),
        # attribute values
        ([{"exact": {"type": 1}}], "filter[0].exact.type", "value must be a string, got int"),
        ([{"exact": {"urgent": True}}], "filter[0].exact.urgent", "got bool (quote it in YAML)"),
        ([{"prefix": {"subject": None}}], "filter[0].prefix.subject", "got null"),
        ([{"suffix": {"subject": [".jpg"]}}], "filter[0].suffix.subject", "got list"),
        (
            [{"exact": {"type": "a", "source": 2}}],
            "filter[0].exact.source",
            "value must be a string, got int",
        ),
        # all / any
        ([{"all": T}], "filter[0].all", "must be a list of filter expressions, got dict"),
        ([{"any": "exact"}], "filter[0].any", "got str"),
        ([{"all": None}], "filter[0].all", "got null"),
        ([{"any": [T, "x"]}], "filter[0].any[1]", "must be a filter expression mapping"),
        ([{"all": [T, {}]}], "filter[0].all[1]", "empty filter expression"),
        # not
        (
            [{"not": [T]}],
            "filter[0].not",
            "must be a filter expression mapping with exactly one dialect key, got list",
        ),
        ([{"not": {}}], "filter[0].not", "empty filter expression"),
        ([{"not": None}], "filter[0].not", "got null"),
        ([{"not": {"foo": {}}}], "filter[0].not.foo", "unknown filter dialect 'foo'"),
        # nested paths
        (
            [T, {"all": [T, {"exact": {"type": 3}}]}],
            "filter[1].all[1].exact.type",
            "value must be a string",
        ),
        (
            [{"any": [T, {"not": {"all": [T, T, {"prefix": {"X": "a"}}]}}]}],
            "filter[0].any[1].not.all[2].prefix.X",
            "invalid attribute name 'X'",
        ),
        (
            [{"not": {"not": {"any": [{"suffix": {}}]}}}],
            "filter[0].not.not.any[0].suffix",
            "must name at least one attribute",
        ),
    ],
)
def test_validation_errors(spec: Any, path: str, fragment: str) -> None:
    err = error_of(spec)
    assert err.path == path
    assert fragment in err.message


def test_first_problem_reported() -> None:
    err = error_of([T, {"exact": {"Bad": 1}}, {"nope": {}}])
    assert err.path == "filter[1].exact.Bad"
    err = error_of([{"exact": {"type": "a", "b-c": "x", "d": 1}}])
    assert err.path == "filter[0].exact['b-c']"


def test_custom_base_path() -> None:
    err = error_of([{"all": [{"prefix": {"type": 1}}]}], "spec.filter")
    assert err.path == "spec.filter[0].all[0].prefix.type"
    assert str(err).startswith("spec.filter[0].all[0].prefix.type: value must be a string")
    assert error_of({}, "bindings[3].filter").path == "bindings[3].filter"


def test_valid_names_accepted() -> None:
    names = ["id", "source", "type", "subject", "specversion", "datacontenttype", "dataschema"]
    names += ["time", "a", "0", "ext123", "x" * 40]
    predicate = compile_filters([{"prefix": dict.fromkeys(names, "")}])
    assert predicate(dict.fromkeys(names, "v"))
    assert not predicate(dict.fromkeys(names[:-1], "v"))
