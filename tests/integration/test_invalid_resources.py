"""A stored resource that no longer validates (an older version's row, a time zone this machine
lacks) is skipped, logged, counted and shown; it never stops the others from routing: a hub
starts, the change listener keeps following changes, and new bindings route."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from eventhub import db
from eventhub.settings import Settings
from eventhub.store import ResourceStore
from tests.support import FunctionServer, HubProcess, RunningHub, client, run_eventhub

MARS = {"type": "cron", "schedule": "@hourly", "timezone": "Mars/Olympus"}
OLD_BINDING = {"source": "api", "function": "f1", "colour": "red"}  # a field no longer known


async def store_row(settings: Settings, kind: str, name: str, spec: object) -> None:
    """Write a row as an older version (or a hand) would: no validation, then NOTIFY."""
    dsn, namespace = settings.database_url.get_secret_value(), settings.namespace
    async with db.migrated(dsn, namespace) as pool:
        await pool.execute(
            "insert into resources (kind, name, spec) values ($1, $2, $3::jsonb)",
            kind,
            name,
            orjson.dumps(spec).decode(),
        )
        await pool.execute("select pg_notify($1, $2)", f"{namespace}_resources", f"{kind}/{name}")


async def post_until_routed(api: RunningHub, function: str, wait: float = 30.0) -> str:
    """Post events until one is routed to ``function`` (the hub learns of new bindings by
    NOTIFY); returns that event's id. Events posted before are answered 202 and unrouted."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        event_id = f"e-{uuid.uuid4().hex[:8]}"
        headers = {
            "ce-specversion": "1.0",
            "ce-id": event_id,
            "ce-source": "/test",
            "ce-type": "com.example.test",
            "content-type": "application/json",
            **api.auth(),
        }
        async with api.http.post(f"{api.base_url}/v1/events", data=b"{}", headers=headers) as r:
            assert r.status == 202, await r.text()
            body = await r.json()
        if any(i["function"] == function for i in body["invocations"]):
            return event_id
        await asyncio.sleep(0.2)
    raise AssertionError(f"no event was routed to {function} within {wait} s")


async def get_json(api: RunningHub, path: str) -> tuple[int, Any]:
    async with api.http.get(f"{api.base_url}{path}", headers=api.auth()) as response:
        return response.status, await response.json()


async def test_a_hub_starts_routes_and_shows_an_invalid_stored_resource(
    settings: Settings, hub_process: Any, function: FunctionServer, tmp_path: Path
) -> None:
    await store_row(settings, "Source", "mars", MARS)
    await store_row(settings, "Binding", "old-binding", OLD_BINDING)
    process: HubProcess = hub_process()
    await process.ready()  # the hub starts although two stored rows do not validate

    (tmp_path / "r.yaml").write_text(
        f"apiVersion: eventhub/v1\nkind: Function\nmetadata: {{name: f1}}\n"
        f"spec: {{url: '{function.url('f1')}'}}\n---\n"
        "apiVersion: eventhub/v1\nkind: Binding\nmetadata: {name: new-binding}\n"
        "spec: {source: api, function: f1}\n"
    )
    applied = await asyncio.to_thread(run_eventhub, settings, "apply", "-f", str(tmp_path))
    assert applied.returncode == 0, applied.stderr
    async with client(process) as api:
        event_id = await post_until_routed(api, "f1")
        calls = await function.wait_for(1, "f1")
        assert event_id in {c.ce["id"] for c in calls}

        async with api.http.get(f"{api.base_url}/readyz") as response:
            assert response.status == 200  # reported, and still ready
            ready = await response.json()
        assert ready["status"] == "ready"
        shown = {(r["kind"], r["name"]): r["error"] for r in ready["invalidResources"]}
        assert set(shown) == {("Source", "mars"), ("Binding", "old-binding")}
        assert shown["Source", "mars"].startswith("spec.timezone: ")
        assert shown["Binding", "old-binding"].startswith("spec.colour: ")

        status, listed = await get_json(api, "/v1/sources")
        assert status == 200
        [mars] = listed["items"]
        assert mars["spec"] == MARS
        assert mars["status"] == {
            "paused": False,
            "invalid": True,
            "error": shown["Source", "mars"],
        }
        status, bindings = await get_json(api, "/v1/bindings")
        assert [(b["metadata"]["name"], "invalid" in b["status"]) for b in bindings["items"]] == [
            ("new-binding", False),
            ("old-binding", True),
        ]
        status, one = await get_json(api, "/v1/sources/mars")
        assert status == 200 and one["status"]["invalid"] is True
        status, problem = await get_json(api, "/v1/sources/mars/status")
        assert status == 409 and "invalid" in problem["detail"]

        async with api.http.get(f"{api.base_url}/metrics") as response:
            exposition = await response.text()
        assert 'eventhub_invalid_resources{kind="Source"} 1.0' in exposition
        assert 'eventhub_invalid_resources{kind="Binding"} 1.0' in exposition
        assert 'eventhub_invalid_resources{kind="Function"} 0.0' in exposition

    table = await asyncio.to_thread(run_eventhub, settings, "get", "sources")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("INVALID")
    assert lines[1].split() == ["NAME", "ERROR"]
    assert lines[2].startswith("mars") and "spec.timezone" in lines[2]
    got = await asyncio.to_thread(run_eventhub, settings, "get", "bindings", "-o", "json")
    items = {d["metadata"]["name"]: d for d in json.loads(got.stdout)["items"]}
    assert items["old-binding"]["status"]["invalid"] is True
    assert "invalid" not in items["new-binding"]["status"]
    one_binding = await asyncio.to_thread(run_eventhub, settings, "get", "bindings", "old-binding")
    assert "spec.colour" in one_binding.stdout

    logged = process.output()
    assert '"event": "resource_invalid_skipped"' in logged or "resource_invalid_skipped" in logged
    assert "Mars/Olympus" in logged or "spec.timezone" in logged


async def test_the_change_listener_outlives_a_row_that_turns_invalid(
    hub: RunningHub, function: FunctionServer, settings: Settings
) -> None:
    assert hub.hub is not None
    await hub.function("f1", function.url("f1"))
    await store_row(settings, "Source", "mars", MARS)

    # Declared elsewhere (another process's apply): only the NOTIFY tells this hub.
    dsn, namespace = settings.database_url.get_secret_value(), settings.namespace
    async with db.migrated(dsn, namespace) as pool:
        from eventhub.resources import parse_resource

        doc = {
            "apiVersion": "eventhub/v1",
            "kind": "Binding",
            "metadata": {"name": "later"},
            "spec": {"source": "api", "function": "f1"},
        }
        await ResourceStore(pool, namespace).apply([parse_resource(doc)], apply_set="t")
    await post_until_routed(hub, "f1")
    await function.wait_for(1, "f1")
    assert [(r.kind.value, r.name) for r in hub.hub.router.invalid] == [("Source", "mars")]

    # The API's own writes reload the router too, with the invalid row still stored.
    await hub.bind("by-api", "f1")
    assert "by-api" in {r.binding for r in hub.hub.router.routes.bindings_of("api")}


async def test_the_change_listener_survives_a_failing_reload(settings: Settings) -> None:
    """Whatever a reload raises, it is logged and tried again, and changes are still followed."""
    dsn, namespace = settings.database_url.get_secret_value(), settings.namespace
    async with db.migrated(dsn, namespace) as pool:
        store = ResourceStore(pool, namespace)
        calls: list[str] = []
        called = asyncio.Condition()

        async def reload() -> None:
            async with called:
                calls.append("call")
                called.notify_all()
            if len(calls) == 1:
                raise RuntimeError("a bug in a reload")

        async def wait_calls(count: int) -> None:
            async with called:
                await asyncio.wait_for(called.wait_for(lambda: len(calls) >= count), 30)

        task = asyncio.create_task(store.listen(reload, dsn))
        try:
            await wait_calls(2)  # the failed first reload was tried again, unprompted
            await pool.execute("select pg_notify($1, 'Function/x')", store.channel)
            await wait_calls(3)  # and a change afterwards is still followed
            assert not task.done()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
