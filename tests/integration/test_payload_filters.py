"""Payload filters end to end: events posted to /v1/events reach only the functions whose
``cel`` filter matches their data, in binary and structured content modes; a bad expression
is refused by ``eventhub apply`` and by PUT, naming the field and the column."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from eventhub.settings import Settings
from tests.support import FunctionServer, RunningHub, run_eventhub

FILTERS: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "to-big": ("big", [{"cel": "data.amount > 100"}]),
    "to-small": ("small", [{"cel": "data.amount <= 100"}]),
    "to-eur": (
        "eur",
        [{"exact": {"type": "com.example.order"}}, {"cel": "data.currency == 'EUR'"}],
    ),
    "to-gold": ("gold", [{"cel": "data.customer.tier in ['gold'] && source == '/shop'"}]),
}


async def wait_bound(hub: RunningHub, bindings: set[str], wait: float = 5.0) -> None:
    assert hub.hub is not None
    deadline = time.monotonic() + wait
    while not bindings <= {r.binding for r in hub.hub.router.routes.bindings_of("api")}:
        assert time.monotonic() < deadline, "the bindings never reached the router"
        await asyncio.sleep(0.02)


async def post(hub: RunningHub, headers: dict[str, str], body: bytes) -> list[str]:
    """POST /v1/events; the bindings of the invocations it made, sorted."""
    async with hub.http.post(
        f"{hub.base_url}/v1/events", data=body, headers={**headers, **hub.auth()}
    ) as response:
        doc = await response.json()
        assert response.status == 202, doc
    return sorted(i["binding"] for i in doc["invocations"])


def binary(event_id: str, ctype: str = "application/json") -> dict[str, str]:
    """The binary content mode, as the Kafka binding carries an event: attributes as
    headers, the body as it is."""
    return {
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-source": "/shop",
        "ce-type": "com.example.order",
        "content-type": ctype,
    }


def structured(event_id: str, data: Any) -> bytes:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": event_id,
            "source": "/shop",
            "type": "com.example.order",
            "datacontenttype": "application/json",
            "data": data,
        }
    ).encode()


async def test_events_reach_only_the_functions_whose_payload_filter_matches(
    hub: RunningHub, function: FunctionServer
) -> None:
    for name in ("big", "small", "eur", "gold"):
        await hub.function(name, function.url(name))
    for binding, (target, spec_filter) in FILTERS.items():
        await hub.bind(binding, target, filter=spec_filter)
    await wait_bound(hub, set(FILTERS))

    order = json.dumps({"amount": 150, "currency": "EUR"}).encode()
    assert await post(hub, binary("b1"), order) == ["to-big", "to-eur"]
    small = {"amount": 50, "currency": "USD", "customer": {"tier": "gold"}}
    body = structured("s1", small)
    assert await post(hub, {"content-type": "application/cloudevents+json"}, body) == [
        "to-gold",
        "to-small",
    ]
    # A body that is not JSON has data null: no payload filter matches, nothing fails.
    text = b"amount=500"
    assert await post(hub, binary("t1", "text/plain"), text) == []
    assert await post(hub, binary("j1"), b"{broken") == []
    # A payload without the field: no match for it, the other filters still decide.
    partial = json.dumps({"currency": "EUR"}).encode()
    assert await post(hub, binary("p1"), partial) == ["to-eur"]

    calls = {name: await function.wait_for(n, name) for name, n in [("big", 1), ("eur", 2)]}
    calls |= {name: await function.wait_for(1, name) for name in ("small", "gold")}
    assert sorted(c.ce["id"] for c in calls["eur"]) == ["b1", "p1"]
    assert [c.ce["id"] for c in calls["big"]] == ["b1"]
    assert [c.ce["id"] for c in calls["small"]] == ["s1"]
    assert [c.ce["id"] for c in calls["gold"]] == ["s1"]
    assert calls["big"][0].body == order  # the payload is passed on as it came
    assert json.loads(calls["small"][0].body) == small


BAD_BINDING = """
apiVersion: eventhub/v1
kind: Function
metadata: {name: f1}
spec: {url: "http://127.0.0.1:9/f1"}
---
apiVersion: eventhub/v1
kind: Binding
metadata: {name: big-orders}
spec:
  source: api
  function: f1
  filter:
    - exact: {type: com.example.order}
    - cel: "data.amount >> 100"
"""


def test_apply_refuses_a_bad_expression_in_one_line(settings: Settings, tmp_path: Path) -> None:
    bad = tmp_path / "bindings.yaml"
    bad.write_text(BAD_BINDING)
    result = run_eventhub(settings, "apply", "-f", str(bad))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert str(bad) in line and "Binding 'big-orders'" in line
    assert "spec.filter[1].cel: syntax error at column 14: unexpected '>'" in line
    listed = run_eventhub(settings, "get", "functions")
    assert "f1" not in listed.stdout  # nothing of the file was applied


async def test_put_refuses_a_bad_expression_with_a_problem_naming_the_field(
    hub: RunningHub, function: FunctionServer
) -> None:
    await hub.function("f1", function.url("f1"))
    spec = {"source": "api", "function": "f1", "filter": [{"cel": "data.a > 1 &&"}]}
    async with hub.http.put(
        f"{hub.base_url}/v1/bindings/b1", json={"spec": spec}, headers=hub.auth()
    ) as response:
        assert response.status == 400
        assert response.content_type == "application/problem+json"
        problem = await response.json()
    assert problem["errors"] == [
        {
            "field": "spec.filter[0].cel",
            "message": "syntax error at column 14: the expression ends too early",
        }
    ]
