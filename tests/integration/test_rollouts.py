"""Canary rollouts on a real hub (PostgreSQL, NATS, Redis), with events posted all along.

- a healthy canary grows step by step and is promoted: the stored alias names it, every
  process routes to it, ``eventhub get`` shows it;
- a failing canary is rolled back at once, mid-step; invocations already queued for it through
  the alias are called on the stable version (``onRollback: stable``) or become dead letters
  with the canary's version and reason ``rolled-back`` (``onRollback: dead-letter``);
- a slow canary is rolled back on its p95 latency;
- a rollout survives its hub: stopped mid-rollout, the next hub carries it on;
- pause, resume and abort, from the API and the CLI; bad input names its field.

Intervals are short and the assertions are on states, verdicts and counts, never on durations.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from eventhub.settings import Settings
from eventhub.versions import pick
from tests.support import FunctionServer, HubProcess, RunningHub, client, run_eventhub

WAIT = 90.0


async def _function(
    hub: RunningHub, function: FunctionServer, *, name: str = "f", **spec: Any
) -> None:
    retry = {"maxAttempts": 10, "initialDelay": "500ms", "maxDelay": "2s", "jitter": 0}
    await hub.put(
        "functions",
        name,
        {
            "versions": {
                "v1": {"url": function.url("v1"), "retry": retry},
                "v2": {"url": function.url("v2"), "retry": retry},
            },
            "aliases": {"prod": "v1"},
            "default": "prod",
            **spec,
        },
    )
    await hub.bind(f"to-{name}", name)


async def _start(hub: RunningHub, function: str = "f", **body: Any) -> dict[str, Any]:
    body.setdefault("alias", "prod")
    body.setdefault("to", "v2")
    async with hub.http.post(
        f"{hub.base_url}/v1/functions/{function}/rollouts", json=body, headers=hub.auth()
    ) as response:
        doc = await response.json()
        assert response.status == 201, doc
        assert response.headers["Location"] == f"/v1/rollouts/{doc['id']}"
        return doc  # type: ignore[no-any-return]


async def _rollout(hub: RunningHub, rollout_id: str) -> dict[str, Any]:
    async with hub.http.get(
        f"{hub.base_url}/v1/rollouts/{rollout_id}", headers=hub.auth()
    ) as response:
        assert response.status == 200, await response.text()
        return await response.json()  # type: ignore[no-any-return]


async def _wait(
    hub: RunningHub, rollout_id: str, done: Callable[[dict[str, Any]], bool], wait: float = WAIT
) -> dict[str, Any]:
    deadline = time.monotonic() + wait
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            doc = await _rollout(hub, rollout_id)
            if done(doc):
                return doc
        await asyncio.sleep(0.2)
    raise AssertionError(f"the rollout never got there: {json.dumps(doc, indent=1)}")


def _state(*states: str) -> Callable[[dict[str, Any]], bool]:
    return lambda doc: doc["state"] in states


async def _action(
    hub: RunningHub, rollout_id: str, verb: str, body: Any = None
) -> tuple[int, dict[str, Any]]:
    async with hub.http.post(
        f"{hub.base_url}/v1/rollouts/{rollout_id}/{verb}", json=body, headers=hub.auth()
    ) as response:
        return response.status, await response.json()


async def _until(check: Callable[[], bool], what: str, wait: float = WAIT) -> None:
    deadline = time.monotonic() + wait
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


class Poster:
    """Posts events one after another until stopped, to whichever hub ``target`` names now
    (a hub being stopped refuses some: they are simply not counted)."""

    def __init__(self, target: Callable[[], RunningHub], prefix: str = "p") -> None:
        self._target = target
        self._prefix = prefix
        self.posted: list[str] = []

    async def run(self) -> None:
        for n in itertools.count():
            event_id = f"{self._prefix}{n}"
            # RuntimeError: the target's HTTP session was closed as the test moved on.
            with contextlib.suppress(aiohttp.ClientError, OSError, RuntimeError):
                response = await self._target().post_event(event_id)
                if response.status == 202:
                    self.posted.append(event_id)
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def posting(target: Callable[[], RunningHub], prefix: str = "p") -> AsyncIterator[Poster]:
    poster = Poster(target, prefix)
    task = asyncio.create_task(poster.run())
    try:
        yield poster
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _ids(calls: list[Any]) -> set[str]:
    return {c.headers["ce-id"] for c in calls}


# Promotion.


@pytest.mark.timeout(180)
async def test_a_healthy_canary_grows_step_by_step_and_is_promoted(
    hub: RunningHub, function: FunctionServer, settings: Settings
) -> None:
    await _function(hub, function)
    # Both answer 200, equally fast; the latency ratio is loose, so a busy machine's noise on
    # calls of a few milliseconds cannot break it.
    analysis = {"maxErrorRate": 0.05, "maxLatencyRatio": 50, "minCalls": 5}
    async with posting(lambda: hub):
        await function.wait_for(5, "v1")
        started = await _start(hub, steps=[50, 100], interval="2s", analysis=analysis)
        assert (started["state"], started["step"], started["weight"]) == ("running", 0, 50)
        assert (started["stable"], started["canary"]) == ("v1", "v2")
        done = await _wait(hub, started["id"], _state("promoted", "rolled-back", "aborted"))

    assert done["state"] == "promoted", done
    assert (done["weight"], done["reason"]) == (100, None)
    history = done["history"]
    assert [(h["step"], h["weight"], h["verdict"]) for h in history] == [
        (0, 50, "held"),
        (1, 100, "held"),
    ]
    assert all(h["canary"]["calls"] >= 5 and h["canary"]["errors"] == 0 for h in history)
    assert history[0]["baseline"] == "step" and history[0]["stable"]["calls"] >= 5
    # The stored alias names the canary: a resource update, seen by every reader.
    async with hub.http.get(f"{hub.base_url}/v1/functions/f", headers=hub.auth()) as r:
        assert (await r.json())["spec"]["aliases"]["prod"] == "v2"
    shown = run_eventhub(settings, "get", "functions", "f", "-o", "json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["spec"]["aliases"]["prod"] == "v2"
    # The override is gone and the declared alias routes every new event to the canary.
    assert hub.hub is not None
    router = hub.hub.router
    await _until(
        lambda: (
            router.routes.weights["f"]["prod"] == (("v2", 100),)
            and not router.routes.overrides.weights
        ),
        "the promotion never reached the router",
    )
    v1_before = len(function.calls_to("v1"))
    for n in range(10):
        assert (await hub.post_event(f"after{n}")).status == 202
    await function.wait_for(10, "v2")
    await _until(
        lambda: {f"after{n}" for n in range(10)} <= _ids(function.calls_to("v2")),
        "the events after the promotion did not all reach the canary",
    )
    assert not {f"after{n}" for n in range(10)} & _ids(function.calls_to("v1")[v1_before:])
    async with hub.http.get(f"{hub.base_url}/metrics") as r:
        metrics = await r.text()
    assert 'eventhub_rollout_weight{alias="prod",function="f",version="v2"} 100.0' in metrics


# Rollback.


async def _failing_canary_rolled_back(
    hub: RunningHub, function: FunctionServer, on_rollback: str
) -> tuple[dict[str, Any], set[str], set[str]]:
    """A canary answering 500, rolled back with invocations held for it; returns the rollout,
    the ids of the events posted and of those whose invocation was enqueued for the canary.
    The function is paused from just after the canary's first failures until the rollback
    reached the router, so invocations queued for the canary through the alias (never called,
    or waiting to be retried) are still there."""
    function.rules["v2"] = lambda call: 500
    # A rate limit keeps a backlog: most events are still queued when the function is paused.
    await _function(hub, function, rateLimit="10/s", maxConcurrency=2)
    analysis = {"maxErrorRate": 0.2, "maxLatencyRatio": 50, "minCalls": 5}
    started = await _start(
        hub, steps=[50, 100], interval="10m", analysis=analysis, onRollback=on_rollback
    )
    posted = {f"e{n}" for n in range(60)}
    for_canary: set[str] = set()
    for event_id in sorted(posted):
        response = await hub.post_event(event_id)
        assert response.status == 202
        (invocation,) = (await response.json())["invocations"]
        # The version is chosen from the invocation id, as the router does at enqueue.
        if pick((("v1", 50), ("v2", 50)), invocation["id"]) == "v2":
            for_canary.add(event_id)
    await function.wait_for(5, "v2")
    async with hub.http.post(f"{hub.base_url}/v1/functions/f/pause", headers=hub.auth()) as r:
        assert r.status == 200
    done = await _wait(hub, started["id"], _state("promoted", "rolled-back", "aborted"))
    assert hub.hub is not None
    router = hub.hub.router
    await _until(
        lambda: ("f", "prod", "v2") in router.routes.overrides.withdrawn,
        "the rollback never reached the router",
    )
    # Some were called on the canary, and some are still queued for it, never called.
    assert _ids(function.calls_to("v2")) < for_canary
    return done, posted, for_canary


def _check_broke(done: dict[str, Any]) -> None:
    assert (done["state"], done["weight"]) == ("rolled-back", 0), done
    last = done["history"][-1]
    assert (last["step"], last["weight"], last["verdict"]) == (0, 50, "broke")
    assert last["canary"]["calls"] >= 5 and last["canary"]["errorRate"] > 0.2
    assert last["stable"] is not None and last["baseline"] is None  # latency not compared
    assert "error rate" in done["reason"] and done["reason"] == last["reason"]


@pytest.mark.timeout(180)
async def test_a_failing_canary_is_rolled_back_and_its_queued_invocations_go_to_stable(
    hub: RunningHub, function: FunctionServer
) -> None:
    done, posted, for_canary = await _failing_canary_rolled_back(hub, function, "stable")
    _check_broke(done)
    canary_calls = len(function.calls_to("v2"))
    async with hub.http.post(f"{hub.base_url}/v1/functions/f/resume", headers=hub.auth()) as r:
        assert r.status == 200

    # Every event ends on the stable version: those the canary failed, and those never called.
    await _until(
        lambda: posted <= _ids(function.calls_to("v1")),
        "some invocations never reached the stable version",
    )
    assert for_canary <= _ids(function.calls_to("v1"))
    assert len(function.calls_to("v2")) == canary_calls  # the canary was called no more
    assert await hub.dead_letters() == []


@pytest.mark.timeout(180)
async def test_a_rolled_back_canarys_queued_invocations_can_become_dead_letters(
    hub: RunningHub, function: FunctionServer
) -> None:
    done, posted, for_canary = await _failing_canary_rolled_back(hub, function, "dead-letter")
    _check_broke(done)
    canary_calls = len(function.calls_to("v2"))
    async with hub.http.post(f"{hub.base_url}/v1/functions/f/resume", headers=hub.auth()) as r:
        assert r.status == 200

    # Each event either succeeded on the stable version or is a rolled-back dead letter of v2.
    def ended() -> set[str]:
        return _ids(function.calls_to("v1")) | dead_ids

    dead_ids: set[str] = set()
    deadline = time.monotonic() + WAIT
    while not posted <= ended():
        assert time.monotonic() < deadline, f"not all ended: {sorted(posted - ended())[:5]}"
        dead = await hub.dead_letters(limit="500")
        dead_ids = {d["event"]["id"] for d in dead}
        await asyncio.sleep(0.2)
    dead = await hub.dead_letters(limit="500")
    assert dead and {(d["version"], d["reason"]) for d in dead} == {("v2", "rolled-back")}
    # Exactly the invocations enqueued for the canary: those it failed, and those never called.
    assert dead_ids == for_canary
    assert not dead_ids & _ids(function.calls_to("v1"))
    assert len(function.calls_to("v2")) == canary_calls


@pytest.mark.timeout(180)
async def test_a_slow_canary_is_rolled_back_on_its_latency(
    hub: RunningHub, function: FunctionServer
) -> None:
    function.delays["v2"] = 0.5  # the stable version answers at once, on this machine
    await _function(hub, function)
    analysis = {"maxErrorRate": 0.5, "maxLatencyRatio": 2, "minCalls": 5}
    async with posting(lambda: hub):
        started = await _start(hub, steps=[50, 100], interval="10m", analysis=analysis)
        done = await _wait(hub, started["id"], _state("promoted", "rolled-back", "aborted"))
    assert done["state"] == "rolled-back", done
    last = done["history"][-1]
    assert last["verdict"] == "broke" and last["baseline"] == "step"
    assert last["canary"]["errors"] == 0 and last["canary"]["p95Ms"] >= 400
    assert last["canary"]["p95Ms"] > 2 * last["stable"]["p95Ms"]
    assert "p95" in done["reason"]


# Restarts.


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("stop", ["terminate", "kill"])
async def test_a_rollout_survives_its_hub_being_stopped(
    hub_process: Callable[[], HubProcess], function: FunctionServer, stop: str
) -> None:
    """Stopped, the hub gives its lease back and the next one carries on at once; killed, the
    next one takes over once the lease lapsed."""
    first = hub_process()
    await first.ready()
    current: dict[str, RunningHub] = {}
    async with client(first) as api:
        current["hub"] = api
        await _function(api, function)
        analysis = {"maxErrorRate": 0.05, "maxLatencyRatio": 50, "minCalls": 3}
        async with posting(lambda: current["hub"]):
            started = await _start(api, steps=[20, 50, 100], interval="3s", analysis=analysis)
            moved = await _wait(api, started["id"], lambda d: d["step"] >= 1)
            assert moved["state"] == "running", moved
            if stop == "terminate":
                assert first.terminate() == 0  # stopped mid-rollout
            else:
                first.kill()
            second = hub_process()
            await second.ready()
            async with client(second) as api2:
                current["hub"] = api2
                done = await _wait(
                    api2, started["id"], _state("promoted", "rolled-back", "aborted")
                )
    assert done["state"] == "promoted", done
    assert [h["verdict"] for h in done["history"]] == ["held", "held", "held"]
    assert [h["weight"] for h in done["history"]] == [20, 50, 100]


# Operators: API.


@pytest.mark.timeout(60)
async def test_pause_resume_and_abort(hub: RunningHub, function: FunctionServer) -> None:
    await _function(hub, function)
    assert hub.hub is not None
    router = hub.hub.router
    # Never enough calls: the rollout stays on its first step until told otherwise.
    started = await _start(hub, steps=[10, 100], interval="1s", analysis={"minCalls": 1000})
    rid = started["id"]
    await _until(
        lambda: router.routes.weights["f"]["prod"] == (("v1", 90), ("v2", 10)),
        "the canary's weight never reached the router",
    )
    # One rollout per alias.
    async with hub.http.post(
        f"{hub.base_url}/v1/functions/f/rollouts",
        json={"alias": "prod", "to": "v2"},
        headers=hub.auth(),
    ) as r:
        assert r.status == 409 and "already has" in (await r.json())["detail"]

    status, paused = await _action(hub, rid, "pause")
    assert (status, paused["state"], paused["weight"]) == (200, "paused", 10)
    assert [h["verdict"] for h in paused["history"]] == ["paused"]
    status, again = await _action(hub, rid, "pause")
    assert status == 409 and "only a running rollout can be paused" in again["detail"]
    assert router.routes.weights["f"]["prod"] == (("v1", 90), ("v2", 10))  # held, not dropped

    status, resumed = await _action(hub, rid, "resume")
    assert (status, resumed["state"]) == (200, "running")
    assert resumed["stepStartedAt"] > started["stepStartedAt"]

    status, aborted = await _action(hub, rid, "abort", {"reason": "not today"})
    assert (status, aborted["state"], aborted["weight"]) == (200, "aborted", 0)
    assert aborted["reason"] == "not today"
    assert [h["verdict"] for h in aborted["history"]] == ["paused", "aborted"]
    await _until(
        lambda: router.routes.weights["f"]["prod"] == (("v1", 100),),
        "the abort never reached the router",
    )
    assert not router.routes.overrides.withdrawn  # aborted, not rolled back
    status, _ = await _action(hub, rid, "resume")
    assert status == 409
    # The alias is free again.
    second = await _start(hub, steps=[10, 100], interval="1s", analysis={"minCalls": 1000})
    async with hub.http.get(
        f"{hub.base_url}/v1/rollouts", params={"function": "f"}, headers=hub.auth()
    ) as r:
        items = (await r.json())["items"]
    assert [i["id"] for i in items] == [second["id"], rid]
    async with hub.http.get(
        f"{hub.base_url}/v1/rollouts", params={"state": "aborted"}, headers=hub.auth()
    ) as r:
        assert [i["id"] for i in (await r.json())["items"]] == [rid]


@pytest.mark.timeout(60)
async def test_bad_requests_name_their_field(hub: RunningHub, function: FunctionServer) -> None:
    await _function(hub, function)
    await hub.put(
        "functions",
        "split",
        {
            "versions": {"v1": {"url": function.url("v1")}, "v2": {"url": function.url("v2")}},
            "aliases": {"half": {"v1": 50, "v2": 50}},
            "default": "half",
        },
    )
    cases: list[tuple[str, Any, int, str | None]] = [
        ("f", {"alias": "nope", "to": "v2"}, 400, "alias"),
        ("f", {"alias": "prod", "to": "v9"}, 400, "to"),
        ("f", {"alias": "prod", "to": "v1"}, 400, "to"),
        ("f", {"alias": "prod", "to": "v2", "steps": [50, 10]}, 400, "steps[1]"),
        ("f", {"alias": "prod", "to": "v2", "interval": "0s"}, 400, "interval"),
        (
            "f",
            {"alias": "prod", "to": "v2", "analysis": {"minCalls": -1}},
            400,
            "analysis.minCalls",
        ),
        ("f", {"alias": "prod", "to": "v2", "onRollback": "x"}, 400, "onRollback"),
        ("f", {"to": "v2"}, 400, "alias"),
        ("split", {"alias": "half", "to": "v2"}, 400, "alias"),
        ("ghost", {"alias": "prod", "to": "v2"}, 404, None),
    ]
    for name, body, status, field in cases:
        async with hub.http.post(
            f"{hub.base_url}/v1/functions/{name}/rollouts", json=body, headers=hub.auth()
        ) as r:
            doc = await r.json()
            assert r.status == status, (body, doc)
            assert r.content_type == "application/problem+json"
            if field is not None:
                assert doc["errors"][0]["field"] == field, (body, doc)
    async with hub.http.post(
        f"{hub.base_url}/v1/functions/f/rollouts", data=b"{", headers=hub.auth()
    ) as r:
        assert r.status == 400
    for path in ("/v1/rollouts/nope", "/v1/rollouts/6f1c1a40-0000-4000-8000-000000000000"):
        async with hub.http.get(f"{hub.base_url}{path}", headers=hub.auth()) as r:
            assert r.status == 404
    async with hub.http.get(
        f"{hub.base_url}/v1/rollouts", params={"limit": "0"}, headers=hub.auth()
    ) as r:
        assert r.status == 400 and (await r.json())["errors"][0]["field"] == "limit"
    async with hub.http.get(
        f"{hub.base_url}/v1/rollouts", params={"state": "done"}, headers=hub.auth()
    ) as r:
        assert r.status == 400
    async with hub.http.get(f"{hub.base_url}/v1/rollouts") as r:
        assert r.status == 401


# Operators: CLI.


@pytest.mark.timeout(90)
async def test_the_cli_starts_lists_shows_pauses_resumes_and_aborts(
    hub: RunningHub, function: FunctionServer, settings: Settings
) -> None:
    await _function(hub, function)

    def cli(*args: str) -> Any:
        return run_eventhub(settings, "rollout", *args)

    bad = cli("start", "f", "--alias", "prod", "--to", "v2", "--steps", "50,10")
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1, bad.stderr
    assert "--steps" in bad.stderr and "Traceback" not in bad.stderr
    missing = cli("start", "ghost", "--alias", "prod", "--to", "v2")
    assert missing.returncode == 1 and "Function 'ghost' does not exist" in missing.stderr

    started = cli(
        "start",
        "f",
        "--alias",
        "prod",
        "--to",
        "v2",
        "--steps",
        "10,100",
        "--interval",
        "1s",
        "--min-calls",
        "1000",
        "--on-rollback",
        "dead-letter",
    )
    assert started.returncode == 0, started.stderr
    rid = started.stdout.split()[1]
    assert "f:prod v1 -> v2 at 10%" in started.stdout
    again = cli("start", "f", "--alias", "prod", "--to", "v2")
    assert again.returncode == 1 and "already has" in again.stderr

    listed = cli("list", "--function", "f")
    assert listed.returncode == 0 and rid in listed.stdout and "running" in listed.stdout
    shown = cli("get", rid[:8], "-o", "json")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert (doc["id"], doc["onRollback"], doc["steps"]) == (rid, "dead-letter", [10, 100])

    assert cli("pause", rid).returncode == 0
    assert "state=paused" in cli("get", rid).stdout
    twice = cli("pause", rid)
    assert twice.returncode == 1 and "paused" in twice.stderr
    assert cli("resume", rid).returncode == 0
    aborted = cli("abort", rid, "--reason", "by hand")
    assert aborted.returncode == 0 and "f:prod is v1" in aborted.stdout
    text = cli("get", rid).stdout
    assert "state=aborted" in text and "reason: by hand" in text and "paused" in text
    assert (await _rollout(hub, rid))["state"] == "aborted"
    unknown = cli("get", "zzzz")
    assert unknown.returncode == 1 and "does not exist" in unknown.stderr
