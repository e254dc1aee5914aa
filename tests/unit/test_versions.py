"""Versions and aliases: validation, and a weighted split that is fair and stable."""

from __future__ import annotations

from typing import Any

import pytest

from eventhub.errors import ResourceInvalid
from eventhub.events import Event
from eventhub.invocations import event_invocation_id
from eventhub.resources import FunctionSpec, parse_resource
from eventhub.versions import LATEST, Target, choose, pick, version_spec


def function(**spec: Any) -> FunctionSpec:
    doc = {"apiVersion": "eventhub/v1", "kind": "Function", "metadata": {"name": "f"}}
    model: FunctionSpec = parse_resource({**doc, "spec": spec}).model
    return model


def problems(**spec: Any) -> list[str]:
    with pytest.raises(ResourceInvalid) as caught:
        function(**spec)
    return [p.field for p in caught.value.problems]


TWO = {"v1": {"url": "http://v1/"}, "v2": {"url": "http://v2/", "timeout": "5s"}}


def test_targets_name_a_function_and_maybe_a_version_or_alias() -> None:
    assert Target.parse("resize") == Target("resize")
    assert Target.parse("resize:v4") == Target("resize", "v4")
    assert str(Target("resize", "prod")) == "resize:prod"


def test_the_top_level_settings_are_the_version_latest() -> None:
    spec = function(url="http://f/", timeout="3s")
    latest = version_spec(spec, LATEST)
    assert latest is not None and latest.url == "http://f/" and latest.timeout == 3.0
    assert choose(spec, None, "any").version == LATEST
    assert version_spec(spec, "v9") is None


def test_each_version_keeps_its_own_settings() -> None:
    spec = function(versions=TWO, aliases={"prod": "v1"}, default="prod")
    v2 = version_spec(spec, "v2")
    assert v2 is not None and v2.url == "http://v2/" and v2.timeout == 5.0
    assert v2.retry.max_attempts == 3  # defaults, not the top level's
    assert version_spec(spec, LATEST) is None  # no top-level url: no latest
    choice = choose(spec, None, "k")
    assert (choice.version, choice.alias) == ("v1", "prod")
    assert choose(spec, "v2", "k").alias is None


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({}, "spec.url"),
        ({"versions": TWO}, "spec.default"),  # no latest, so the default must be named
        ({"url": "http://f/", "aliases": {"prod": {"v9": 100}}}, "spec.aliases.prod.v9"),
        ({"versions": TWO, "default": "v1", "aliases": {"p": {"v1": 90}}}, "spec.aliases.p"),
        ({"versions": TWO, "default": "v1", "aliases": {"v1": "v2"}}, "spec.aliases.v1"),
        (
            {"url": "http://f/", "versions": {"latest": {"url": "http://x/"}}},
            "spec.versions.latest",
        ),
        ({"url": "http://f/", "default": "nope"}, "spec.default"),
        ({"versions": {"v1": {}}, "default": "v1"}, "spec.versions.v1.url"),
        ({"versions": {"V1": {"url": "http://x/"}}, "default": "V1"}, "spec.versions.V1.[key]"),
        ({"url": "http://f/", "delivery": "exactly-once"}, "spec.delivery"),
    ],
)
def test_invalid_versions_and_aliases_name_the_field(spec: dict[str, Any], field: str) -> None:
    assert field in problems(**spec)


def test_a_90_10_alias_sends_ten_percent_within_one_percent_over_10000_events() -> None:
    spec = function(versions=TWO, aliases={"prod": {"v1": 90, "v2": 10}}, default="prod")
    events = [Event({"id": f"e-{i}", "source": "/orders", "type": "t"}, b"") for i in range(10_000)]
    ids = [event_invocation_id(e, "to-f") for e in events]
    to_canary = sum(choose(spec, None, i).version == "v2" for i in ids)
    assert 900 <= to_canary <= 1100, to_canary


def test_the_same_key_always_gets_the_same_version() -> None:
    weights = (("v1", 50), ("v2", 50))
    assert all(pick(weights, f"k{i}") == pick(weights, f"k{i}") for i in range(1000))


def test_a_growing_canary_weight_only_moves_keys_to_the_canary() -> None:
    keys = [f"key-{i}" for i in range(5000)]
    before = {k: pick((("v1", 90), ("v2", 10)), k) for k in keys}
    after = {k: pick((("v1", 75), ("v2", 25)), k) for k in keys}
    assert all(after[k] == "v2" for k in keys if before[k] == "v2")
    assert sum(v == "v2" for v in after.values()) > sum(v == "v2" for v in before.values())


def test_a_zero_weight_gets_nothing_and_a_full_weight_everything() -> None:
    keys = [f"k{i}" for i in range(2000)]
    assert {pick((("v1", 100), ("v2", 0)), k) for k in keys} == {"v1"}
    assert {pick((("v1", 0), ("v2", 100)), k) for k in keys} == {"v2"}
