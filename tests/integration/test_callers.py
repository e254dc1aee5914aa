"""Callers of one hub cannot reach each other's work, nor the hub's networks through callbacks.

Against a real hub (NATS, PostgreSQL, Redis) with several tokens: callbacks to internal addresses
are refused unless allowed, redirects are not followed, idempotency keys and invocation status
belong to the token that used them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import SecretStr

from eventhub.settings import Scope, Settings
from tests.conftest import TOKEN
from tests.support import FunctionServer, RunningHub, start_hub

A, B, C, ADMIN = "caller-a-token", "caller-b-token", "caller-c-token", "admin-only-token"
HEADER = "X-Callback-Url"


def _tokens(settings: Settings) -> dict[SecretStr, list[Scope]]:
    return {
        **settings.tokens,
        SecretStr(A): [Scope.INVOKE],
        SecretStr(B): [Scope.INVOKE],
        SecretStr(C): [Scope.EVENTS, Scope.INVOKE],
        SecretStr(ADMIN): [Scope.ADMIN],
    }


@pytest.fixture
async def strict(settings: Settings) -> AsyncIterator[RunningHub]:
    """A hub that allows no internal callback destination (the default)."""
    async with start_hub(settings.model_copy(update={"tokens": _tokens(settings)}), TOKEN) as hub:
        yield hub


@pytest.fixture
async def allowing(settings: Settings) -> AsyncIterator[RunningHub]:
    """A hub that allows callbacks to 127.0.0.1, where the test's function server listens."""
    update = {"tokens": _tokens(settings), "callback_allow": ("127.0.0.1",)}
    async with start_hub(settings.model_copy(update=update), TOKEN) as hub:
        yield hub


async def _invoke(
    hub: RunningHub, token: str, body: bytes, **headers: str
) -> tuple[int, dict[str, Any]]:
    async with hub.http.post(
        f"{hub.base_url}/v1/functions/job/invocations",
        data=body,
        headers={**hub.auth(token), **{k.replace("_", "-"): v for k, v in headers.items()}},
    ) as response:
        return response.status, await response.json()


async def _status(hub: RunningHub, token: str, inv_id: str) -> tuple[int, dict[str, Any]]:
    async with hub.http.get(
        f"{hub.base_url}/v1/invocations/{inv_id}", headers=hub.auth(token)
    ) as response:
        return response.status, await response.json()


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://127.0.0.1:{port}/callback",
        "http://localhost:{port}/callback",
        "http://10.0.0.7/callback",
        "http://192.168.1.1/callback",
        "http://[::1]:{port}/callback",
        "http://[::ffff:127.0.0.1]:{port}/callback",
        "http://[fe80::1]/callback",
        "http://0.0.0.0:{port}/callback",
        "ftp://example.com/callback",
    ],
)
async def test_callbacks_to_internal_addresses_are_refused(
    strict: RunningHub, function: FunctionServer, target: str
) -> None:
    await strict.function("job", function.url("job"))
    url = target.format(port=function.port)
    status, problem = await _invoke(strict, A, b"refused", **{HEADER: url})
    assert status == 400, problem
    assert problem["errors"][0]["field"] == HEADER
    # Nothing was enqueued: the next invocation is the function's first call.
    status, _ = await _invoke(strict, A, b"next")
    assert status == 202
    [call] = await function.wait_for(1, "job")
    assert call.body == b"next"
    assert function.calls_to("callback") == []


async def test_callbacks_to_allowed_addresses_are_sent(
    allowing: RunningHub, function: FunctionServer
) -> None:
    await allowing.function("job", function.url("job"))
    status, body = await _invoke(allowing, A, b"x", **{HEADER: function.url("callback")})
    assert status == 202, body
    [callback] = await function.wait_for(1, "callback")
    assert callback.headers["x-call-id"] == body["id"]
    assert callback.headers["eventhub-function-version"] == "latest"
    # Allowing 127.0.0.1 allows that address only.
    status, problem = await _invoke(allowing, A, b"x", **{HEADER: "http://10.0.0.7/"})
    assert status == 400 and problem["errors"][0]["field"] == HEADER


@pytest.mark.parametrize("redirect", [307, 308])
async def test_callback_redirects_are_not_followed(
    allowing: RunningHub, function: FunctionServer, redirect: int
) -> None:
    # Followed, a 307 or 308 repeats the POST, which the function server records (a followed
    # 302 turns into a GET, which it would not); the client follows every kind or none.
    await allowing.function("job", function.url("job"))
    function.respond("callback", redirect)
    function.headers["callback"] = {"Location": function.url("elsewhere")}
    status, _ = await _invoke(allowing, A, b"x", **{HEADER: function.url("callback")})
    assert status == 202
    await function.wait_for(1, "callback")
    # A second callback, sent after the first was answered, marks the end of the first.
    status, _ = await _invoke(allowing, A, b"y", **{HEADER: function.url("after")})
    assert status == 202
    await function.wait_for(1, "after")
    assert function.calls_to("elsewhere") == []
    assert len(function.calls_to("callback")) == 1


async def test_idempotency_keys_belong_to_the_token(
    strict: RunningHub, function: FunctionServer
) -> None:
    await strict.function("job", function.url("job"))
    _, first = await _invoke(strict, A, b"from a", Idempotency_Key="order-42")
    _, other = await _invoke(strict, B, b"from b", Idempotency_Key="order-42")
    _, again = await _invoke(strict, A, b"from a again", Idempotency_Key="order-42")
    assert first["id"] != other["id"]  # two callers, two invocations
    assert again["id"] == first["id"]  # the same caller, the same invocation
    _, last = await _invoke(strict, A, b"last")
    calls = await function.wait_for(3, "job")
    await strict.wait_status(last["id"], "succeeded")
    await strict.wait_status(first["id"], "succeeded")
    await strict.wait_status(other["id"], "succeeded")
    assert sorted(c.body for c in function.calls_to("job")) == [b"from a", b"from b", b"last"]
    assert len(calls) == 3


async def test_status_is_readable_by_its_token_or_admin(
    strict: RunningHub, function: FunctionServer
) -> None:
    await strict.function("job", function.url("job"))
    _, mine = await _invoke(strict, A, b"x")
    doc = await strict.wait_status(mine["id"], "succeeded")  # the all-scopes token is admin
    assert "owner" not in doc
    status, own = await _status(strict, A, mine["id"])
    assert status == 200 and own["status"] == "succeeded" and "owner" not in own
    status, admin = await _status(strict, ADMIN, mine["id"])
    assert status == 200 and admin["id"] == mine["id"]
    # Another token is told what it would be told of an id that never existed.
    status, hidden = await _status(strict, B, mine["id"])
    _, unknown = await _status(strict, B, "00000000-0000-0000-0000-000000000000")
    assert status == 404
    assert hidden["title"] == unknown["title"] and hidden["status"] == unknown["status"]
    # Invocations of a posted event belong to the token that posted it.
    await strict.bind("on-test", "job")
    await strict.wait_routed("job")
    async with strict.http.post(
        f"{strict.base_url}/v1/events",
        data=b"{}",
        headers={
            **strict.auth(C),
            "ce-specversion": "1.0",
            "ce-id": "e-1",
            "ce-source": "/callers",
            "ce-type": "com.example.test",
            "content-type": "application/json",
        },
    ) as response:
        assert response.status == 202
        [posted] = (await response.json())["invocations"]
    await strict.wait_status(posted["id"], "succeeded")
    assert (await _status(strict, C, posted["id"]))[0] == 200
    assert (await _status(strict, A, posted["id"]))[0] == 404
