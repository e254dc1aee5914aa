"""Function versions and aliases, paused functions and at-most-once delivery, end to end."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from eventhub.events import Event
from eventhub.invocations import event_invocation_id
from eventhub.resources import parse_resource
from eventhub.settings import Settings
from eventhub.versions import choose
from tests.support import FunctionServer, HubProcess, RunningHub, client, run_eventhub


def versioned(function: FunctionServer, **extra: Any) -> dict[str, Any]:
    return {
        "versions": {
            "v1": {"url": function.url("v1")},
            "v2": {"url": function.url("v2"), "retry": {"maxAttempts": 2, "initialDelay": "50ms"}},
        },
        "aliases": {"prod": {"v1": 70, "v2": 30}},
        "default": "prod",
        **extra,
    }


async def post_invocation(hub: RunningHub, target: str, body: bytes = b"{}") -> Any:
    async with hub.http.post(
        f"{hub.base_url}/v1/functions/{target}/invocations",
        data=body,
        headers={**hub.auth(), "Content-Type": "application/json"},
    ) as response:
        return response.status, await response.json()


async def test_a_weighted_alias_sends_each_event_to_the_version_its_id_hashes_to(
    hub: RunningHub, function: FunctionServer
) -> None:
    spec = versioned(function)
    await hub.put("functions", "f", spec)
    await hub.bind("to-f", "f")  # a plain name: the function's default, the alias prod
    for i in range(60):
        assert (await hub.post_event(f"e{i}")).status == 202
    await function.wait_for(60)
    model = parse_resource(
        {"apiVersion": "eventhub/v1", "kind": "Function", "metadata": {"name": "f"}, "spec": spec}
    ).model
    expected = {
        f"e{i}": choose(
            model, None, event_invocation_id(Event({"id": f"e{i}", "source": "/test"}, b""), "to-f")
        ).version
        for i in range(60)
    }
    got = {c.ce["id"]: c.path for c in function.calls}
    assert got == expected
    assert set(got.values()) == {"v1", "v2"}
    # The version is on the invocation's record, and in the metrics.
    async with hub.http.get(f"{hub.base_url}/metrics", headers=hub.auth()) as r:
        text = await r.text()
    for version in ("v1", "v2"):
        count = sum(1 for v in expected.values() if v == version)
        line = f'eventhub_invocations_total{{function="f",outcome="succeeded",version="{version}"}}'
        assert f"{line} {float(count)}" in text


async def test_a_retry_goes_to_the_version_of_its_first_attempt_and_records_it(
    hub: RunningHub, function: FunctionServer
) -> None:
    await hub.put("functions", "f", versioned(function))
    function.respond("v2", 503)
    status, body = await post_invocation(hub, "f:v2")
    assert status == 202 and body["version"] == "v2"
    doc = await hub.wait_status(body["id"], "succeeded")
    assert [c.path for c in function.calls] == ["v2", "v2"]
    assert doc["version"] == "v2"
    assert [a["version"] for a in doc["history"]] == ["v2", "v2"]


async def test_targets_name_versions_and_aliases_or_are_refused(
    hub: RunningHub, function: FunctionServer
) -> None:
    await hub.put("functions", "f", versioned(function, url=function.url("latest")))
    status, body = await post_invocation(hub, "f:latest")
    assert status == 202 and body["version"] == "latest"
    status, body = await post_invocation(hub, "f:v9")
    assert status == 404 and "v9" in body["detail"]
    # A binding may name a version; one naming what the function lacks is refused.
    await hub.bind("to-v1", "f:v1")
    assert (await hub.post_event("pinned")).status == 202
    await function.wait_for(2)
    assert sorted(c.path for c in function.calls) == ["latest", "v1"]
    async with hub.http.put(
        f"{hub.base_url}/v1/bindings/bad",
        json={"spec": {"source": "api", "function": "f:v9"}},
        headers=hub.auth(),
    ) as r:
        problem = await r.json()
        assert r.status == 400, problem
        assert problem["errors"][0]["field"] == "spec.function"


async def test_a_declared_version_cannot_change_and_applying_twice_changes_nothing(
    hub: RunningHub, function: FunctionServer, settings: Settings, tmp_path: Any
) -> None:
    await hub.put("functions", "f", versioned(function))
    changed = versioned(function)
    changed["versions"]["v1"] = {"url": function.url("v1"), "timeout": "2s"}
    async with hub.http.put(
        f"{hub.base_url}/v1/functions/f", json={"spec": changed}, headers=hub.auth()
    ) as r:
        problem = await r.json()
        assert r.status == 400, problem
        assert problem["errors"][0]["field"] == "spec.versions.v1"
    # A new version, and the alias moved to it: allowed.
    moved = versioned(function)
    moved["versions"]["v3"] = {"url": function.url("v3")}
    moved["aliases"] = {"prod": "v3"}
    await hub.put("functions", "f", moved)
    # A version a binding still names cannot be removed.
    await hub.bind("to-v3", "f:v3")
    del moved["versions"]["v3"]
    moved["aliases"] = {"prod": "v1"}
    async with hub.http.put(
        f"{hub.base_url}/v1/functions/f", json={"spec": moved}, headers=hub.auth()
    ) as r:
        problem = await r.json()
        assert r.status == 400, problem
        assert problem["errors"][0]["field"] == "spec.function"
    # eventhub apply of the same file twice: the second creates and changes nothing.
    manifest = tmp_path / "f.yaml"
    manifest.write_text(
        "apiVersion: eventhub/v1\nkind: Function\nmetadata: {name: g}\nspec:\n"
        f"  versions:\n    v1: {{url: '{function.url('g1')}', timeout: 5s}}\n"
        f"    v2: {{url: '{function.url('g2')}'}}\n"
        "  aliases: {prod: {v1: 90, v2: 10}}\n  default: prod\n"
    )
    first = run_eventhub(settings, "apply", "-f", str(manifest))
    assert first.returncode == 0, first.stderr
    assert "Function/g created" in first.stdout
    second = run_eventhub(settings, "apply", "-f", str(manifest))
    assert second.returncode == 0, second.stderr
    assert "created" not in second.stdout and "updated" not in second.stdout
    table = run_eventhub(settings, "get", "functions").stdout.splitlines()
    [g] = [line.split() for line in table if line.startswith("g ")]
    assert g[:4] == ["g", "prod", "-", "v1,v2"]


async def test_ordered_bindings_keep_one_keys_events_on_one_version_in_order(
    hub: RunningHub, function: FunctionServer
) -> None:
    await hub.put("functions", "f", versioned(function))
    await hub.bind("in-order", "f:prod", ordering="ordered")
    keys = [f"k{i}" for i in range(8)]
    for n in range(5):
        for key in keys:
            assert (await hub.post_event(f"{key}-{n}", partitionkey=key)).status == 202
    await function.wait_for(40, wait=30)
    for key in keys:
        calls = [c for c in function.calls if c.ce["partitionkey"] == key]
        assert len({c.path for c in calls}) == 1, key
        assert [c.ce["id"] for c in calls] == [f"{key}-{n}" for n in range(5)]


async def test_dead_letters_name_the_version_and_replay_to_another(
    hub: RunningHub, function: FunctionServer, settings: Settings
) -> None:
    await hub.put("functions", "f", versioned(function))
    function.rules["v2"] = lambda call: 500
    ids = []
    for i in range(3):
        status, body = await post_invocation(hub, "f:v2", f'{{"n": {i}}}'.encode())
        assert status == 202
        ids.append(body["id"])
    dead = await hub.wait_dead_letters(3, function="f", version="v2")
    assert {d["version"] for d in dead} == {"v2"}
    assert all(a["version"] == "v2" for d in dead for a in d["attempts"])
    replay = run_eventhub(settings, "dlq", "replay", "--version", "v2", "--to", "f:v1")
    assert replay.returncode == 0, replay.stderr
    calls = await function.wait_for(3, "v1", wait=30)
    assert len(calls) == 3
    # Without --to, a replay calls the version that failed.
    await hub.wait_dead_letters(3, function="f", version="v2", status="resolved")
    function.rules["v2"] = lambda call: None
    again = run_eventhub(settings, "dlq", "replay", "--version", "v2", "--status", "resolved")
    assert again.returncode == 0, again.stderr
    await function.wait_for(3 * 2 + 3, "v2", wait=30)  # 2 attempts each, then the replays
    refused = run_eventhub(settings, "dlq", "replay", "--version", "v2", "--to", "f:v7")
    assert refused.returncode != 0
    assert "has no version or alias 'v7'" in refused.stderr
    assert "Traceback" not in refused.stderr


async def test_a_dead_letter_function_may_be_a_version_of_another_function(
    hub: RunningHub, function: FunctionServer
) -> None:
    await hub.put(
        "functions",
        "audit",
        {
            "versions": {"a1": {"url": function.url("a1")}, "a2": {"url": function.url("a2")}},
            "default": "a1",
        },
    )
    await hub.put(
        "functions",
        "failing",
        {
            "url": function.url("failing"),
            "retry": {"maxAttempts": 1},
            "deadLetter": {"function": "audit:a2"},
        },
    )
    function.respond("failing", 500)
    status, _ = await post_invocation(hub, "failing")
    assert status == 202
    [call] = await function.wait_for(1, "a2")
    assert call.ce["eventhubfunction"] == "failing"
    assert function.calls_to("a1") == []


async def test_a_paused_function_holds_every_invocation_until_resumed(
    hub: RunningHub, function: FunctionServer, settings: Settings
) -> None:
    await hub.function("held", function.url("held"))
    await hub.bind("to-held", "held")
    paused = run_eventhub(settings, "pause", "function", "held")
    assert paused.returncode == 0, paused.stderr
    async with hub.http.get(f"{hub.base_url}/v1/functions/held/status", headers=hub.auth()) as r:
        assert (await r.json())["paused"] is True
    await _until(lambda: "held" in _paused(hub))
    for i in range(3):
        assert (await hub.post_event(f"h{i}")).status == 202
    status, _ = await post_invocation(hub, "held")
    assert status == 202  # direct invocations are still accepted
    await asyncio.sleep(1.0)
    assert function.calls_to("held") == []
    shown = run_eventhub(settings, "status", "function", "held")
    assert "paused=true" in shown.stdout and "queued=4" in shown.stdout, shown.stdout
    resumed = run_eventhub(settings, "resume", "function", "held")
    assert resumed.returncode == 0, resumed.stderr
    calls = await function.wait_for(4, "held", wait=20)
    assert len(calls) == 4


async def test_at_most_once_calls_once_and_keeps_the_failure(
    hub: RunningHub, function: FunctionServer
) -> None:
    await hub.put(
        "functions",
        "once",
        {"url": function.url("once"), "delivery": "at-most-once", "retry": {"maxAttempts": 5}},
    )
    function.respond("once", 500)
    status, body = await post_invocation(hub, "once")
    assert status == 202
    [dead] = await hub.wait_dead_letters(1, function="once")
    assert dead["reason"] == "at-most-once"
    assert len(dead["attempts"]) == 1
    await asyncio.sleep(1.0)
    assert len(function.calls_to("once")) == 1
    assert (await hub.invocation(body["id"]))["status"] == "dead-lettered"


async def test_at_most_once_is_not_called_again_after_the_hub_is_killed(
    hub_process: Callable[[], HubProcess], function: FunctionServer
) -> None:
    first = hub_process()
    await first.ready()
    gate = function.gates["once"] = asyncio.Event()
    async with client(first) as api:
        await api.put(
            "functions",
            "once",
            {"url": function.url("once"), "timeout": "10s", "delivery": "at-most-once"},
        )
        await api.bind("to-once", "once")
        assert (await api.post_event("only")).status == 202
    await function.wait_for(1, "once")  # the call is in flight, the message acked before it
    first.kill()
    gate.set()
    second = hub_process()
    await second.ready()
    await asyncio.sleep(8.0)  # beyond ack_wait: an unacked message would have come back
    assert [c.ce["id"] for c in function.calls_to("once")] == ["only"]


def _paused(hub: RunningHub) -> frozenset[str]:
    assert hub.hub is not None
    return hub.hub.router.routes.paused_functions


async def _until(condition: Callable[[], bool], wait: float = 5.0) -> None:
    for _ in range(int(wait / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never held")
