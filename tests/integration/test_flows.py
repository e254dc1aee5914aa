"""Flows end to end, against the real services: a run's steps are invocations on the queue,
its state is in PostgreSQL, a failed step is a dead letter whose replay resumes the run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from eventhub.settings import Settings
from tests.support import HubProcess, RunningHub, client, run_eventhub

Handler = Callable[[Any], tuple[int, Any]]


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class JsonFunctions:
    """Functions over HTTP that answer JSON: each path's handler maps the input (parsed JSON,
    or the text) to a status and a JSON answer; without one, ``{"fn": path, "input": ...}``."""

    handlers: dict[str, Handler] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    calls: list[Received] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def to(self, path: str) -> list[Received]:
        return [c for c in self.calls if c.path == path]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{path}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(self, count: int, path: str, wait: float = 30.0) -> list[Received]:
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: len(self.to(path)) >= count), wait
                )
            except TimeoutError:
                raise AssertionError(f"{len(self.to(path))} calls to {path}, not {count}") from None
        return self.to(path)

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode()
        call = Received(path, {k.lower(): v for k, v in request.headers.items()}, body)
        async with self._changed:
            self.calls.append(call)
            self._changed.notify_all()
        if self.delays.get(path):
            await asyncio.sleep(self.delays[path])
        status, answer = self.handlers.get(path, lambda b: (200, {"fn": path, "input": b}))(body)
        return web.json_response(answer, status=status)


@pytest.fixture
async def fns() -> AsyncIterator[JsonFunctions]:
    server = JsonFunctions()
    await server.start()
    yield server
    await server.stop()


async def call(hub: RunningHub, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with hub.http.request(
        method, hub.base_url + path, json=body, headers=hub.auth()
    ) as response:
        return response.status, await response.json(content_type=None)


async def post(hub: RunningHub, event_id: str, data: Any) -> None:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-source": "/uploads",
        "ce-type": "com.example.upload",
        "content-type": "application/json",
        **hub.auth(),
    }
    async with hub.http.post(
        f"{hub.base_url}/v1/events", data=json.dumps(data), headers=headers
    ) as response:
        assert response.status == 202, await response.text()


async def runs(hub: RunningHub, flow: str, **query: str) -> list[dict[str, Any]]:
    status, body = await call(hub, "GET", f"/v1/flows/{flow}/runs?" + _query(query))
    assert status == 200, body
    return body["items"]  # type: ignore[no-any-return]


def _query(query: dict[str, str]) -> str:
    return "&".join(f"{k}={v}" for k, v in query.items())


async def run_of(hub: RunningHub, flow: str, event_id: str) -> dict[str, Any]:
    [run] = [r for r in await runs(hub, flow) if r["triggerEventId"] == event_id]
    status, body = await call(hub, "GET", f"/v1/flows/{flow}/runs/{run['id']}")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


async def wait_run(
    hub: RunningHub, flow: str, event_id: str, status: str, wait: float = 40.0
) -> dict[str, Any]:
    deadline = time.monotonic() + wait
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(ValueError):  # not made yet
            doc = await run_of(hub, flow, event_id)
            if doc["status"] == status:
                return doc
        await asyncio.sleep(0.1)
    raise AssertionError(f"the run of {event_id} never became {status}: {doc}")


def steps(run: dict[str, Any]) -> list[tuple[int, str, str | None, str]]:
    return [(s["seq"], s["name"], s["branch"], s["status"]) for s in run["steps"]]


# -- the uploads flow: a sequence, a choice, a parallel fan-out and a join ---------------------

UPLOADS = [
    {"name": "scan", "function": "scanner", "input": "data.object"},
    {
        "name": "route",
        "choice": [{"when": "data.infected == true", "next": "quarantine"}],
        "default": "thumbs",
    },
    {
        "name": "thumbs",
        "parallel": [
            {"function": "thumb", "input": "{'size': 'small', 'key': data.key}"},
            {"function": "thumb", "input": "{'size': 'large', 'key': data.key}"},
        ],
        "next": "store",
    },
    {"name": "quarantine", "function": "quarantine", "end": True},
    {"name": "store", "function": "store"},
]


async def declare_uploads(hub: RunningHub, fns: JsonFunctions, **store_spec: Any) -> None:
    fns.handlers["scanner"] = lambda b: (200, {**b, "scanned": True})
    fns.handlers["thumb"] = lambda b: (200, {"thumb": f"{b['size']}:{b['key']}"})
    fns.handlers.setdefault("store", lambda b: (200, {"stored": len(b)}))
    for name in ("scanner", "thumb", "quarantine"):
        await hub.function(name, fns.url(name), retry={"maxAttempts": 1})
    await hub.function("store", fns.url("store"), **store_spec)
    await hub.put("flows", "uploads", {"steps": UPLOADS})
    await hub.put("bindings", "on-upload", {"source": "api", "flow": "uploads"})


async def test_a_chain_of_three_functions_runs_in_sequence_choice_and_parallel(
    hub: RunningHub, fns: JsonFunctions
) -> None:
    await declare_uploads(hub, fns)
    await post(hub, "u1", {"object": {"key": "a.jpg", "infected": False}})
    run = await wait_run(hub, "uploads", "u1", "succeeded")
    # Each function was called with the input its step maps, once.
    [scan] = fns.to("scanner")
    assert scan.body == {"key": "a.jpg", "infected": False}
    assert scan.headers["ce-type"] == "eventhub.flow.step"  # its input is mapped: a new event
    assert scan.headers["ce-eventhubcauseid"] == "u1"
    assert scan.headers["ce-eventhubrun"] == run["id"]
    thumbs = sorted(c.body["size"] for c in fns.to("thumb"))
    assert thumbs == ["large", "small"]
    [stored] = fns.to("store")
    assert stored.body == [{"thumb": "small:a.jpg"}, {"thumb": "large:a.jpg"}]  # the join
    assert stored.headers["ce-type"] == "eventhub.flow.step"
    assert stored.headers["ce-eventhubcauseid"] == "u1"
    assert fns.to("quarantine") == []
    # The run's state: every step it entered, in order.
    assert steps(run) == [
        (0, "scan", None, "succeeded"),
        (1, "route", None, "succeeded"),
        (2, "thumbs", None, "succeeded"),
        (2, "thumbs", 0, "succeeded"),
        (2, "thumbs", 1, "succeeded"),
        (3, "store", None, "succeeded"),
    ]
    by_name = {(s["name"], s["branch"]): s for s in run["steps"]}
    assert by_name[("scan", None)]["function"] == "scanner"
    assert by_name[("scan", None)]["version"] == "latest"
    assert by_name[("scan", None)]["attempts"] == 1
    assert json.loads(by_name[("scan", None)]["output"])["scanned"] is True
    assert by_name[("route", None)]["output"] == "next: thumbs"
    assert json.loads(run["output"]) == {"stored": 2}
    assert run["triggerEvent"] == {"id": "u1", "source": "/uploads", "type": "com.example.upload"}
    assert run["binding"] == "on-upload" and run["endedAt"] is not None
    # Metrics per flow and per step.
    async with hub.http.get(f"{hub.base_url}/metrics") as response:
        text = await response.text()
    assert 'eventhub_flow_runs_total{flow="uploads",status="started"} 1.0' in text
    assert 'eventhub_flow_runs_total{flow="uploads",status="succeeded"} 1.0' in text
    assert 'eventhub_flow_steps_total{flow="uploads",status="succeeded",step="thumbs"} 2.0' in text


async def test_a_choice_takes_each_branch(hub: RunningHub, fns: JsonFunctions) -> None:
    await declare_uploads(hub, fns)
    await post(hub, "clean", {"object": {"key": "c.jpg", "infected": False}})
    await post(hub, "bad", {"object": {"key": "b.jpg", "infected": True}})
    bad = await wait_run(hub, "uploads", "bad", "succeeded")
    clean = await wait_run(hub, "uploads", "clean", "succeeded")
    assert [s[1] for s in steps(bad)] == ["scan", "route", "quarantine"]
    assert {s["name"]: s["output"] for s in bad["steps"]}["route"] == "next: quarantine"
    [quarantined] = fns.to("quarantine")
    assert quarantined.body["key"] == "b.jpg"  # the choice passes its input on unchanged
    assert [s[1] for s in steps(clean)][-1] == "store"
    assert {c.body["key"] for c in fns.to("thumb")} == {"c.jpg"}
    # Newest first, and by status.
    listed = await runs(hub, "uploads")
    assert [r["triggerEventId"] for r in listed] == ["bad", "clean"]
    assert await runs(hub, "uploads", status="failed") == []


async def test_a_flow_may_start_with_a_choice(hub: RunningHub, fns: JsonFunctions) -> None:
    for name in ("accept", "reject"):
        await hub.function(name, fns.url(name))
    spec = {
        "steps": [
            {"name": "gate", "choice": [{"when": "data.ok", "next": "accept"}], "default": "no"},
            {"name": "accept", "function": "accept", "end": True},
            {"name": "no", "function": "reject"},
        ]
    }
    await hub.put("flows", "gate", spec)
    await hub.put("bindings", "to-gate", {"source": "api", "flow": "gate"})
    await post(hub, "yes-1", {"ok": True})
    await post(hub, "no-1", {"ok": False})
    yes = await wait_run(hub, "gate", "yes-1", "succeeded")
    no = await wait_run(hub, "gate", "no-1", "succeeded")
    assert [s[1] for s in steps(yes)] == ["gate", "accept"]
    assert [s[1] for s in steps(no)] == ["gate", "no"]
    [accepted] = fns.to("accept")
    assert accepted.headers["ce-id"] == "yes-1"  # unmapped, first to be called: the trigger
    assert accepted.headers["ce-eventhubstep"] == "accept"
    assert [c.body for c in fns.to("reject")] == [{"ok": False}]


async def test_a_failed_step_fails_the_run_and_its_replay_resumes_it(
    hub: RunningHub, fns: JsonFunctions
) -> None:
    answers = iter([400])
    fns.handlers["store"] = lambda b: (next(answers, 200), {"stored": len(b)})
    await declare_uploads(hub, fns, retry={"maxAttempts": 1})
    await post(hub, "u2", {"object": {"key": "d.jpg", "infected": False}})
    failed = await wait_run(hub, "uploads", "u2", "failed")
    assert "step 'store' failed (non-retryable)" in failed["error"]
    last = failed["steps"][-1]
    assert (last["name"], last["status"], last["attempts"]) == ("store", "failed", 1)
    # The dead letter keeps where the run stood.
    [dead] = await hub.wait_dead_letters(1, function="store")
    assert dead["flow"] == {"flow": "uploads", "run": failed["id"], "step": "store", "seq": 3,
                            "branch": None}  # fmt: skip
    assert last["deadLetterId"] == dead["id"]
    status, _ = await call(hub, "POST", "/v1/dead-letters/replay", {"ids": [dead["id"]]})
    assert status == 202
    done = await wait_run(hub, "uploads", "u2", "succeeded")
    assert json.loads(done["output"]) == {"stored": 2}
    assert done["error"] is None and done["steps"][-1]["status"] == "succeeded"
    # The replay ran that step again, with the same input, and nothing before it.
    assert [c.body for c in fns.to("store")] == [
        [{"thumb": "small:d.jpg"}, {"thumb": "large:d.jpg"}]
    ] * 2
    assert len(fns.to("scanner")) == 1 and len(fns.to("thumb")) == 2
    await hub.wait_dead_letters(1, function="store", status="resolved")


@pytest.mark.parametrize("policy", ["continue", "fail"])
async def test_a_failed_branch_continues_or_fails_the_run(
    hub: RunningHub, fns: JsonFunctions, policy: str
) -> None:
    fns.handlers["b"] = lambda _: (500, {"error": "boom"})
    for name in ("a", "b", "after"):
        await hub.function(name, fns.url(name), retry={"maxAttempts": 1})
    spec = {
        "steps": [
            {
                "name": "fan",
                "parallel": [{"function": "a"}, {"function": "b"}],
                "onBranchFailure": policy,
            },
            {"name": "after", "function": "after"},
        ]
    }
    await hub.put("flows", "fan", spec)
    await hub.put("bindings", "to-fan", {"source": "api", "flow": "fan"})
    await post(hub, "p1", {"n": 1})
    if policy == "continue":
        run = await wait_run(hub, "fan", "p1", "succeeded")
        [after] = fns.to("after")
        first, second = after.body
        assert first == {"fn": "a", "input": {"n": 1}}
        [branch] = fns.to("a")
        assert branch.headers["ce-id"] == "p1"  # first and unmapped: the trigger event itself
        assert "attempts-exhausted" in second["error"] and second["deadLetterId"]
        assert steps(run)[-1] == (1, "after", None, "succeeded")
    else:
        run = await wait_run(hub, "fan", "p1", "failed")
        assert "step 'fan' failed" in run["error"]
        assert fns.to("after") == []
        branches = {s["branch"]: s["status"] for s in run["steps"] if s["branch"] is not None}
        assert branches == {0: "succeeded", 1: "failed"}


async def test_a_branch_is_given_up_at_its_next_attempt_past_the_timeout(
    hub: RunningHub, fns: JsonFunctions
) -> None:
    fns.handlers["flaky"] = lambda _: (503, {"error": "busy"})
    retry = {"maxAttempts": 100, "initialDelay": "200ms", "multiplier": 1, "jitter": 0}
    await hub.function("flaky", fns.url("flaky"), retry=retry)
    await hub.function("ok", fns.url("ok"))
    await hub.function("after", fns.url("after"))
    spec = {
        "steps": [
            {
                "name": "fan",
                "parallel": [{"function": "ok"}, {"function": "flaky"}],
                "timeout": "1s",
                "onBranchFailure": "continue",
            },
            {"name": "after", "function": "after"},
        ]
    }
    await hub.put("flows", "timed", spec)
    await hub.put("bindings", "to-timed", {"source": "api", "flow": "timed"})
    await post(hub, "t1", {"n": 1})
    run = await wait_run(hub, "timed", "t1", "succeeded")
    [dead] = await hub.dead_letters(function="flaky")
    assert dead["reason"] == "branch-timeout"
    assert dead["flow"]["branch"] == 1
    attempts = len(fns.to("flaky"))
    assert 1 <= attempts < 100  # given up long before its retries ran out
    [after] = fns.to("after")
    assert after.body[0] == {"fn": "ok", "input": {"n": 1}}
    assert "branch-timeout" in after.body[1]["error"]
    assert steps(run)[-1] == (1, "after", None, "succeeded")


async def test_invalid_flows_are_refused_over_http_naming_the_field(hub: RunningHub) -> None:
    await hub.function("f", "http://127.0.0.1:9/f")
    cases = [
        ({"steps": [{"name": "a", "function": "f", "next": "nope"}]}, "spec.steps[0].next"),
        ({"steps": [{"name": "a", "function": "f", "choice": [{"when": "true", "next": "a"}]}]},
         "spec.steps[0]"),
        ({"steps": [{"name": "a", "function": "f"}, {"name": "a", "function": "f"}]},
         "spec.steps[1].name"),
        ({"steps": [{"name": "a", "function": "f", "end": True}, {"name": "b", "function": "f"}]},
         "spec.steps[1]"),
        ({"steps": [{"name": "a", "choice": [{"when": "data.x >", "next": "b"}]},
                    {"name": "b", "function": "f"}]}, "spec.steps[0].choice[0].when"),
        ({"steps": [{"name": "a", "function": "missing"}]}, "spec.steps[0].function"),
    ]  # fmt: skip
    for spec, field_path in cases:
        status, body = await call(hub, "PUT", "/v1/flows/bad", {"spec": spec})
        assert status == 400, body
        assert body["errors"][0]["field"] == field_path, body
    status, body = await call(
        hub, "PUT", "/v1/bindings/b", {"spec": {"source": "api", "flow": "ghost"}}
    )
    assert (status, body["errors"][0]["field"]) == (400, "spec.flow")
    # A function a flow calls cannot be deleted.
    await hub.put("flows", "uses-f", {"steps": [{"name": "a", "function": "f"}]})
    status, body = await call(hub, "DELETE", "/v1/functions/f")
    assert status == 409 and "Flow/uses-f" in body["detail"]
    # ... nor a flow a binding starts.
    await hub.put("bindings", "starts", {"source": "api", "flow": "uses-f"})
    status, body = await call(hub, "DELETE", "/v1/flows/uses-f")
    assert status == 409 and "Binding/starts" in body["detail"]
    status, body = await call(hub, "GET", "/v1/flows/nothing/runs")
    assert status == 404
    status, body = await call(hub, "GET", "/v1/flows/uses-f/runs?status=maybe")
    assert (status, body["errors"][0]["field"]) == (400, "status")


def test_the_cli_refuses_an_invalid_flow_in_one_line_and_shows_runs(
    settings: Settings, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: eventhub/v1\nkind: Function\nmetadata: {name: f}\n"
        "spec: {url: 'http://127.0.0.1:9/f'}\n---\n"
        "apiVersion: eventhub/v1\nkind: Flow\nmetadata: {name: broken}\n"
        "spec:\n  steps:\n    - {name: a, function: f, input: 'data.'}\n"
    )
    result = run_eventhub(settings, "apply", "-f", str(bad))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"eventhub: {bad} (document 2): Flow 'broken': spec.steps[0].input:")
    assert "column" in lines[0]
    good = tmp_path / "good.yaml"
    good.write_text(bad.read_text().replace("input: 'data.'", "input: 'data.x'"))
    assert run_eventhub(settings, "apply", "-f", str(good)).returncode == 0
    listed = run_eventhub(settings, "flow", "runs", "broken")
    assert listed.returncode == 0 and listed.stdout.startswith("RUN"), listed.stderr
    got = run_eventhub(settings, "get", "flows")
    assert got.returncode == 0 and "broken" in got.stdout
    for args in (("flow", "runs", "ghost"), ("flow", "show", "0123abcd")):
        missing = run_eventhub(settings, *args)
        assert missing.returncode == 1
        assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
        assert "does not exist" in missing.stderr


async def test_cli_shows_a_run_with_its_steps(
    hub: RunningHub, fns: JsonFunctions, settings: Settings
) -> None:
    await declare_uploads(hub, fns)
    await post(hub, "u3", {"object": {"key": "e.jpg", "infected": True}})
    run = await wait_run(hub, "uploads", "u3", "succeeded")
    listed = await asyncio.to_thread(run_eventhub, settings, "flow", "runs", "uploads")
    assert run["id"] in listed.stdout and "succeeded" in listed.stdout
    shown = await asyncio.to_thread(run_eventhub, settings, "flow", "show", run["id"][:8])
    assert shown.returncode == 0, shown.stderr
    assert f"Run {run['id']}" in shown.stdout
    assert "quarantine" in shown.stdout and "scanner" in shown.stdout


@pytest.mark.slow
async def test_a_run_resumes_after_kill_9_of_the_hub_mid_step(
    hub_process: Callable[[], HubProcess], fns: JsonFunctions
) -> None:
    first = hub_process()
    await first.ready()
    fns.delays["slow"] = 2.0
    async with client(first) as api:
        for name in ("one", "slow", "three"):
            await api.function(name, fns.url(name), timeout="10s")
        steps_ = [
            {"name": "first", "function": "one"},
            {"name": "second", "function": "slow"},
            {"name": "third", "function": "three"},
        ]
        await api.put("flows", "survivor", {"steps": steps_})
        await api.put("bindings", "to-survivor", {"source": "api", "flow": "survivor"})
        await post(api, "k1", {"n": 1})
    await fns.wait_for(1, "slow")  # the second step's call is in flight ...
    first.kill()  # ... and the hub dies before it can record it
    second = hub_process()
    await second.ready()
    await fns.wait_for(1, "three", wait=60)
    async with client(second) as api:
        run = await wait_run(api, "survivor", "k1", "succeeded")
    assert [s[1:] for s in steps(run)] == [
        ("first", None, "succeeded"),
        ("second", None, "succeeded"),
        ("third", None, "succeeded"),
    ]
    assert len(fns.to("one")) == 1 and len(fns.to("three")) == 1
    assert len(fns.to("slow")) >= 2  # called again after the crash (at least once)
    [third] = fns.to("three")
    assert third.body["fn"] == "slow"  # the result of the step it followed
