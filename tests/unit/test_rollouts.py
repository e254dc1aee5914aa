"""Judging a canary's step, and checking a rollout request (pure: no services)."""

from __future__ import annotations

from typing import Any

import pytest

from eventhub.errors import InvalidInput
from eventhub.resources import FunctionSpec
from eventhub.rollout.judge import Analysis, Sample, judge
from eventhub.rollout.plan import DEFAULT_STEPS, parse_request, plan

A = Analysis(max_error_rate=0.05, max_latency_ratio=1.5, min_calls=20)
FAST = Sample(calls=100, errors=0, p95=0.010)


def verdict(
    canary: Sample,
    stable: Sample = FAST,
    since_start: Sample | None = None,
    elapsed: bool = True,
) -> Any:
    return judge(A, canary=canary, stable=stable, stable_since_start=since_start, elapsed=elapsed)


# The minimum number of canary calls.


def test_a_step_does_not_pass_before_min_calls_however_long_it_ran() -> None:
    v = verdict(Sample(calls=19, errors=0, p95=0.010), elapsed=True)
    assert v.outcome == "pending"
    assert "19 of 20" in v.reason


def test_nothing_breaks_before_min_calls_even_if_every_call_failed() -> None:
    assert verdict(Sample(calls=19, errors=19, p95=9.0)).outcome == "pending"


def test_a_step_holds_with_min_calls_once_its_interval_is_over() -> None:
    v = verdict(Sample(calls=20, errors=1, p95=0.012))
    assert (v.outcome, v.baseline, v.stable) == ("held", "step", FAST)


def test_a_healthy_step_waits_for_its_interval() -> None:
    assert verdict(Sample(calls=500, errors=0, p95=0.010), elapsed=False).outcome == "pending"


# Error rate.


def test_an_error_rate_above_the_threshold_breaks_at_once_mid_step() -> None:
    v = verdict(Sample(calls=20, errors=2, p95=0.010), elapsed=False)
    assert v.outcome == "broke"
    assert "10.0%" in v.reason and "5.0%" in v.reason and "2 of 20" in v.reason


def test_an_error_rate_at_the_threshold_holds() -> None:
    assert verdict(Sample(calls=100, errors=5, p95=0.010)).outcome == "held"


def test_the_stable_versions_errors_do_not_excuse_the_canarys() -> None:
    failing = Sample(calls=100, errors=50, p95=0.010)
    assert verdict(Sample(calls=20, errors=10, p95=0.010), stable=failing).outcome == "broke"


def test_a_zero_error_rate_threshold_breaks_on_the_first_error() -> None:
    strict = Analysis(max_error_rate=0.0, min_calls=1)
    canary = Sample(calls=10, errors=1, p95=0.01)
    v = judge(strict, canary=canary, stable=FAST, stable_since_start=None, elapsed=False)
    assert v.outcome == "broke"


# Latency.


def test_a_p95_above_ratio_times_the_stable_p95_breaks_mid_step() -> None:
    v = verdict(Sample(calls=20, errors=0, p95=0.016), elapsed=False)
    assert v.outcome == "broke"
    assert "16.0ms" in v.reason and "10.0ms" in v.reason and "1.5 x" in v.reason
    assert v.baseline == "step"


def test_a_p95_at_ratio_times_the_stable_p95_holds() -> None:
    assert verdict(Sample(calls=20, errors=0, p95=0.015)).outcome == "held"


def test_with_few_stable_calls_the_stable_figures_since_the_start_are_the_baseline() -> None:
    few = Sample(calls=3, errors=0, p95=0.001)  # at weight 100 the stable version gets little
    since = Sample(calls=400, errors=0, p95=0.100)
    v = verdict(Sample(calls=50, errors=0, p95=0.120), stable=few, since_start=since)
    assert (v.outcome, v.baseline, v.stable) == ("held", "rollout", since)
    slow = verdict(Sample(calls=50, errors=0, p95=0.160), stable=few, since_start=since)
    assert slow.outcome == "broke" and "since the rollout began" in slow.reason


def test_without_any_baseline_latency_is_not_compared_and_the_verdict_says_so() -> None:
    few = Sample(calls=3, errors=0, p95=0.001)
    v = verdict(Sample(calls=50, errors=0, p95=5.0), stable=few, since_start=few)
    assert v.outcome == "held" and v.baseline is None
    assert "latency not compared" in v.reason


def test_errors_are_judged_before_latency() -> None:
    v = verdict(Sample(calls=20, errors=20, p95=1.0))
    assert v.outcome == "broke" and "error rate" in v.reason


def test_figures_as_json() -> None:
    assert Sample(calls=4, errors=1, p95=0.0123456).to_json() == {
        "calls": 4,
        "errors": 1,
        "errorRate": 0.25,
        "p95Ms": 12.346,
    }
    assert Sample().to_json()["p95Ms"] is None


# Requests.


def spec(**aliases: Any) -> FunctionSpec:
    return FunctionSpec.model_validate(
        {
            "url": "http://fn/",
            "versions": {"v1": {"url": "http://v1/"}, "v2": {"url": "http://v2/"}},
            "aliases": aliases,
        }
    )


def field_of(body: object) -> str:
    with pytest.raises(InvalidInput) as caught:
        parse_request(body)
    return caught.value.problems[0].field if caught.value.problems else ""


def test_a_request_takes_the_defaults() -> None:
    r = parse_request({"alias": "prod", "to": "v2"})
    assert r.steps == DEFAULT_STEPS and r.interval == 60.0 and r.on_rollback == "stable"
    assert r.analysis == Analysis()


def test_a_full_request() -> None:
    r = parse_request(
        {
            "alias": "prod",
            "to": "v2",
            "steps": [5, 100],
            "interval": "1m30s",
            "analysis": {"maxErrorRate": 0.01, "maxLatencyRatio": 2, "minCalls": 3},
            "onRollback": "dead-letter",
        }
    )
    assert (r.steps, r.interval, r.on_rollback) == ((5, 100), 90.0, "dead-letter")
    assert r.analysis == Analysis(0.01, 2.0, 3)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], ""),
        ({"to": "v2"}, "alias"),
        ({"alias": "prod"}, "to"),
        ({"alias": 3, "to": "v2"}, "alias"),
        ({"alias": "prod", "to": "v2", "extra": 1}, "extra"),
        ({"alias": "prod", "to": "v2", "steps": []}, "steps"),
        ({"alias": "prod", "to": "v2", "steps": "10,20"}, "steps"),
        ({"alias": "prod", "to": "v2", "steps": [10, 10]}, "steps[1]"),
        ({"alias": "prod", "to": "v2", "steps": [50, 20]}, "steps[1]"),
        ({"alias": "prod", "to": "v2", "steps": [0, 20]}, "steps[0]"),
        ({"alias": "prod", "to": "v2", "steps": [10, 101]}, "steps[1]"),
        ({"alias": "prod", "to": "v2", "steps": [10, 50]}, "steps[1]"),
        ({"alias": "prod", "to": "v2", "steps": [True]}, "steps[0]"),
        ({"alias": "prod", "to": "v2", "steps": [10.5]}, "steps[0]"),
        ({"alias": "prod", "to": "v2", "steps": list(range(1, 30))}, "steps"),
        ({"alias": "prod", "to": "v2", "interval": "soon"}, "interval"),
        ({"alias": "prod", "to": "v2", "interval": 0.5}, "interval"),
        ({"alias": "prod", "to": "v2", "interval": "2d"}, "interval"),
        ({"alias": "prod", "to": "v2", "interval": {}}, "interval"),
        ({"alias": "prod", "to": "v2", "analysis": []}, "analysis"),
        ({"alias": "prod", "to": "v2", "analysis": {"p99": 1}}, "analysis.p99"),
        ({"alias": "prod", "to": "v2", "analysis": {"maxErrorRate": 2}}, "analysis.maxErrorRate"),
        (
            {"alias": "prod", "to": "v2", "analysis": {"maxErrorRate": "x"}},
            "analysis.maxErrorRate",
        ),
        (
            {"alias": "prod", "to": "v2", "analysis": {"maxLatencyRatio": 0.5}},
            "analysis.maxLatencyRatio",
        ),
        (
            {"alias": "prod", "to": "v2", "analysis": {"maxLatencyRatio": float("inf")}},
            "analysis.maxLatencyRatio",
        ),
        ({"alias": "prod", "to": "v2", "analysis": {"minCalls": 0}}, "analysis.minCalls"),
        ({"alias": "prod", "to": "v2", "analysis": {"minCalls": 2.5}}, "analysis.minCalls"),
        ({"alias": "prod", "to": "v2", "onRollback": "keep"}, "onRollback"),
    ],
)
def test_a_bad_request_names_its_field(body: object, field: str) -> None:
    assert field_of(body) == field


def test_the_alias_names_the_stable_version() -> None:
    p = plan("f", spec(prod="v1"), parse_request({"alias": "prod", "to": "v2"}))
    assert (p.function, p.stable, p.request.to) == ("f", "v1", "v2")
    weighted = spec(prod={"v1": 100, "v2": 0})
    assert plan("f", weighted, parse_request({"alias": "prod", "to": "v2"})).stable == "v1"
    latest = parse_request({"alias": "prod", "to": "latest"})
    assert plan("f", spec(prod="v1"), latest).request.to == "latest"


def plan_field(aliases: dict[str, Any], body: dict[str, Any]) -> str:
    with pytest.raises(InvalidInput) as caught:
        plan("f", spec(**aliases), parse_request(body))
    return caught.value.problems[0].field


def test_a_plan_refuses_what_the_function_does_not_allow() -> None:
    assert plan_field({"prod": "v1"}, {"alias": "beta", "to": "v2"}) == "alias"
    assert plan_field({"prod": {"v1": 50, "v2": 50}}, {"alias": "prod", "to": "v2"}) == "alias"
    assert plan_field({"prod": "v1"}, {"alias": "prod", "to": "v9"}) == "to"
    assert plan_field({"prod": "v1"}, {"alias": "prod", "to": "v1"}) == "to"
    assert plan_field({"prod": "v1"}, {"alias": "prod", "to": "prod"}) == "to"
