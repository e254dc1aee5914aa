"""The page's Functions view, in a real headless Chromium against an in-process hub.

What must hold: the view lists every function with its state, versions and aliases; a function
with two versions behind a weighted alias shows, per version and window, the figures its calls
made (counted again here from the function server's own log); pausing from the page (after a
confirmation) holds invocations, which wait in the backlog and reach the function only once it is
resumed from the page; rollouts show the weights in force, every step's figures and verdict, and
can be paused, resumed and aborted; a hub without the rollout API is said to have no rollouts; a
token sees the views its scopes allow.

Any page error fails a test: an uncaught exception, a console error, a failed request, an HTTP
error answer, unless the test names it as expected.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import SecretStr

from eventhub.settings import Scope, Settings
from tests.browser import launch
from tests.conftest import TOKEN
from tests.support import FunctionServer, RunningHub

if TYPE_CHECKING:
    from playwright.async_api import (
        Browser,
        ConsoleMessage,
        Locator,
        Page,
        Request,
        Response,
        Route,
    )

WAIT = 20.0
FAST_RETRY = {"maxAttempts": 2, "initialDelay": "50ms", "jitter": 0}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared settings, with a token of each scope the page knows apart."""
    tokens = {
        **settings.tokens,
        SecretStr("admin-only"): [Scope.ADMIN],
        SecretStr("dlq-only"): [Scope.DLQ],
    }
    return settings.model_copy(update={"tokens": tokens})


@dataclass
class UI:
    hub: RunningHub
    page: Page
    errors: list[str] = field(default_factory=list)
    # URL parts whose error answers (and the console line the browser logs for them) a test
    # expects, e.g. "/v1/rollouts" on a hub without the rollout API.
    expected: list[str] = field(default_factory=list)

    def watch(self) -> None:
        self.page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        self.page.on("console", self._console)
        self.page.on("requestfailed", self._failed)
        self.page.on("response", self._response)

    def _allowed(self, url: str) -> bool:
        return any(part in url for part in self.expected)

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error" and not self._allowed(msg.location.get("url", "")):
            self.errors.append(f"console: {msg.text}")

    def _failed(self, request: Request) -> None:
        if not self._allowed(request.url):
            self.errors.append(f"failed: {request.method} {request.url}: {request.failure}")

    def _response(self, response: Response) -> None:
        if response.status >= 400 and not self._allowed(response.url):
            self.errors.append(f"HTTP {response.status}: {response.request.method} {response.url}")

    async def sign_in(self, token: str = TOKEN, view: str = "") -> None:
        await self.page.goto(f"{self.hub.base_url}/ui{view}")
        await self.page.fill("#token", token)
        await self.page.click("#login-form button[type=submit]")

    async def open_function(self, name: str) -> Locator:
        await self.page.get_by_role("link", name="Functions").click()
        await self.row(name).get_by_role("link", name=name).click()
        detail = self.page.locator("#function")
        await expect(detail.locator("h2")).to_contain_text(name)
        return detail

    def row(self, name: str) -> Locator:
        return self.page.locator(f'#functions tr[data-function="{name}"]')

    def dialog(self) -> Locator:
        return self.page.locator("#confirm")


def expect(target: Any) -> Any:
    from playwright.async_api import expect as playwright_expect

    return playwright_expect(target)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with launch() as b:
        yield b


@pytest.fixture
async def ui(browser: Browser, hub: RunningHub) -> AsyncIterator[UI]:
    from playwright.async_api import expect as playwright_expect

    playwright_expect.set_options(timeout=10_000)
    context = await browser.new_context(viewport={"width": 1360, "height": 1000})
    page = await context.new_page()
    page.set_default_timeout(10_000)
    view = UI(hub, page)
    if not await _has_rollout_api(hub):
        view.expected.append("/v1/rollouts")  # the panel says "no rollouts": tested below
    view.watch()
    yield view
    errors = list(view.errors)  # before closing: closing aborts the page's pending reads
    await context.close()
    assert errors == []


async def _has_rollout_api(hub: RunningHub) -> bool:
    async with hub.http.get(f"{hub.base_url}/v1/rollouts", headers=hub.auth()) as r:
        return r.status != 404


async def _stats(hub: RunningHub, name: str, done: Callable[[dict[str, Any]], bool]) -> Any:
    """The function's statistics once ``done`` says they are complete."""
    deadline = time.monotonic() + WAIT
    while True:
        async with hub.http.get(
            f"{hub.base_url}/v1/functions/{name}/stats", headers=hub.auth()
        ) as r:
            assert r.status == 200, await r.text()
            doc = await r.json()
        if done(doc):
            return doc
        assert time.monotonic() < deadline, doc
        await asyncio.sleep(0.1)


async def _invoke(hub: RunningHub, target: str) -> None:
    async with hub.http.post(
        f"{hub.base_url}/v1/functions/{target}/invocations", data=b"x", headers=hub.auth()
    ) as r:
        assert r.status == 202, await r.text()


async def _figures(table: Locator, version: str, window: str) -> dict[str, str]:
    row = table.locator(f'tr[data-version="{version}"][data-window="{window}"]')
    cells = row.locator("td[data-figure]")
    await expect(cells).to_have_count(8)
    return {
        str(await cell.get_attribute("data-figure")): await cell.inner_text()
        for cell in await cells.all()
    }


# ---- versions, aliases and statistics


async def test_a_weighted_alias_shows_versions_aliases_and_figures_per_version(
    ui: UI, function: FunctionServer
) -> None:
    hub = ui.hub
    function.rules["v2"] = lambda call: 500  # v2 always fails: retried once, then dead-lettered
    await hub.put(
        "functions",
        "shop",
        {
            "versions": {
                "v1": {"url": function.url("v1"), "timeout": "5s"},
                "v2": {"url": function.url("v2"), "retry": FAST_RETRY},
            },
            "aliases": {"prod": {"v1": 50, "v2": 50}, "beta": "v2"},
            "default": "prod",
        },
    )
    await hub.bind("to-shop", "shop")
    await hub.wait_routed("shop")
    for i in range(12):
        assert (await hub.post_event(f"shop-{i}")).status == 202
    await _invoke(hub, "shop:v1")  # both versions are called, whatever the alias picks
    await _invoke(hub, "shop:v2")

    # Every invocation ends as a success on v1 or a dead letter from v2.
    def settled(doc: dict[str, Any]) -> bool:
        total = doc["windows"]["5m"]["total"]
        return bool(total["successes"] + total["deadLetters"] == 14)

    await _stats(hub, "shop", settled)
    v1_calls = len(function.calls_to("v1"))
    v2_calls = len(function.calls_to("v2"))
    v2_invocations = 14 - v1_calls
    assert v2_calls == 2 * v2_invocations and v1_calls >= 1 and v2_invocations >= 1

    await ui.sign_in()
    await ui.page.get_by_role("link", name="Functions").click()
    await expect(ui.page.locator("#view-name")).to_have_text("functions")
    row = ui.row("shop")
    await expect(row.locator(".badge")).to_have_text("active")
    await expect(row).to_contain_text("prod")
    await expect(row).to_contain_text("v1, v2")
    await expect(row).to_contain_text("beta → v2; prod → v1 50 % · v2 50 %")

    detail = await ui.open_function("shop")
    assert ui.page.url.endswith("#functions/shop")
    versions = detail.locator("table.grid").nth(0)
    await expect(versions.locator("tbody tr")).to_have_count(2)
    await expect(versions.locator("tr", has_text="v1")).to_contain_text(function.url("v1"))
    await expect(versions.locator("tr", has_text="v1")).to_contain_text("5s")
    await expect(versions.locator("tr", has_text="v2")).to_contain_text("beta, prod")
    prod = detail.locator('tr[data-alias="prod"]')
    await expect(prod).to_contain_text("prod (default)")
    await expect(prod).to_contain_text("v1 50 % · v2 50 %")
    await expect(prod).to_contain_text("as declared")  # no rollout runs
    await expect(detail.locator('tr[data-alias="beta"]')).to_contain_text("v2")

    for key, value in [("queued", "0"), ("inFlight", "0"), ("retrying", "0")]:
        await expect(detail.locator(f'[data-backlog="{key}"] strong')).to_have_text(value)
    await expect(detail.locator('[data-backlog="oldestWaitingSeconds"] strong')).to_have_text("—")

    stats = detail.locator(".stats table")
    await expect(stats.locator("tbody tr")).to_have_count(9)  # v1, v2, all: three windows each
    for window in ("5m", "1h", "24h"):
        v1 = await _figures(stats, "v1", window)
        assert (v1["invocations"], v1["successes"], v1["failures"]) == (
            str(v1_calls),
            str(v1_calls),
            "0",
        )
        assert (v1["retries"], v1["deadLetters"], v1["errorRate"]) == ("0", "0", "0.0 %")
        assert v1["p50Ms"].endswith(" ms") and v1["p99Ms"].endswith(" ms")
        v2 = await _figures(stats, "v2", window)
        assert (v2["invocations"], v2["successes"], v2["failures"]) == (
            str(v2_calls),
            "0",
            str(v2_calls),
        )
        assert (v2["retries"], v2["deadLetters"]) == (str(v2_invocations), str(v2_invocations))
        assert v2["errorRate"] == "100.0 %"
        total = stats.locator(f'tr[data-total][data-window="{window}"]')
        await expect(total.locator('[data-figure="invocations"]')).to_have_text(
            str(v1_calls + v2_calls)
        )
    await expect(stats.locator('tr[data-version="v1"] th')).to_have_text("v1")
    await expect(stats.locator("tr[data-total] th")).to_have_text("all versions")


# ---- pause and resume


async def test_pausing_from_the_page_holds_invocations_until_resumed(
    ui: UI, function: FunctionServer
) -> None:
    hub = ui.hub
    await hub.function("held", function.url("held"))
    await hub.bind("to-held", "held", filter=[{"exact": {"type": "held.t"}}])
    await hub.wait_routed("held")
    await ui.sign_in()
    detail = await ui.open_function("held")
    await expect(detail.locator("h2 .badge")).to_have_text("active")

    # A pause asks first: cancelled, nothing is paused.
    await ui.row("held").get_by_role("button", name="Pause…").click()
    dialog = ui.dialog()
    await expect(dialog).to_contain_text("Pause held")
    await dialog.get_by_role("button", name="Cancel").click()
    await expect(dialog).to_be_hidden()
    assert (await _status(hub, "held"))["paused"] is False

    await detail.get_by_role("button", name="Pause…").click()
    await dialog.get_by_role("button", name="Pause", exact=True).click()
    await expect(dialog).to_be_hidden()
    await expect(ui.page.locator("#notice")).to_contain_text("held is paused")
    await expect(ui.row("held").locator(".badge")).to_have_text("paused")
    await expect(detail.locator("h2 .badge")).to_have_text("paused")
    assert (await _status(hub, "held"))["paused"] is True

    for i in range(4):
        assert (await hub.post_event(f"held-{i}", type_="held.t")).status == 202
    await _stats(hub, "held", lambda doc: bool(doc["backlog"]["queued"] == 4))
    assert function.calls_to("held") == []  # all four wait, none was called
    await detail.get_by_role("button", name="Refresh").click()
    await expect(detail.locator('[data-backlog="queued"] strong')).to_have_text("4")
    await expect(detail.locator('[data-backlog="oldestWaitingSeconds"] strong')).not_to_have_text(
        "—"
    )

    await detail.get_by_role("button", name="Resume").click()  # no question: nothing is lost
    await expect(detail.locator("h2 .badge")).to_have_text("active")
    await expect(ui.row("held").get_by_role("button", name="Pause…")).to_be_visible()
    calls = await function.wait_for(4, "held")
    assert sorted(c.ce["id"] for c in calls) == [f"held-{i}" for i in range(4)]
    await _stats(hub, "held", lambda doc: bool(doc["windows"]["5m"]["total"]["successes"] == 4))
    await detail.get_by_role("button", name="Refresh").click()
    await expect(detail.locator('[data-backlog="queued"] strong')).to_have_text("0")
    total = detail.locator('.stats tr[data-total][data-window="5m"] [data-figure="successes"]')
    await expect(total).to_have_text("4")


async def _status(hub: RunningHub, name: str) -> dict[str, Any]:
    async with hub.http.get(f"{hub.base_url}/v1/functions/{name}/status", headers=hub.auth()) as r:
        assert r.status == 200, await r.text()
        return await r.json()  # type: ignore[no-any-return]


# ---- rollouts


async def _web(hub: RunningHub, function: FunctionServer) -> None:
    """``web``: v1 (stable, behind ``prod``) and v2, a canary whose every call fails."""
    function.rules["v2"] = lambda call: 500
    once = {"maxAttempts": 1}
    await hub.put(
        "functions",
        "web",
        {
            "versions": {
                "v1": {"url": function.url("v1"), "retry": once},
                "v2": {"url": function.url("v2"), "retry": once},
            },
            "aliases": {"prod": "v1"},
            "default": "prod",
        },
    )
    await hub.wait_routed("web")


async def _start_rollout(hub: RunningHub, **body: Any) -> dict[str, Any]:
    async with hub.http.post(
        f"{hub.base_url}/v1/functions/web/rollouts",
        json={"alias": "prod", "to": "v2", **body},
        headers=hub.auth(),
    ) as r:
        doc = await r.json()
        assert r.status == 201, doc
        return doc  # type: ignore[no-any-return]


async def _rollout(hub: RunningHub, rollout_id: str, state: str | None = None) -> Any:
    """The rollout as the API shows it; with ``state``, once it is in that state."""
    deadline = time.monotonic() + WAIT
    while True:
        async with hub.http.get(
            f"{hub.base_url}/v1/rollouts/{rollout_id}", headers=hub.auth()
        ) as r:
            assert r.status == 200, await r.text()
            doc = await r.json()
        if state is None or doc["state"] == state:
            return doc
        assert time.monotonic() < deadline, json.dumps(doc)
        await asyncio.sleep(0.1)


async def _routed_weight(hub: RunningHub, version: str, weight: int) -> None:
    """Wait until the hub's router gives ``version`` of web's alias prod ``weight``."""
    assert hub.hub is not None
    deadline = time.monotonic() + WAIT
    while dict(hub.hub.router.routes.weights.get("web", {}).get("prod", ())).get(version) != weight:
        assert time.monotonic() < deadline, hub.hub.router.routes.weights
        await asyncio.sleep(0.02)


async def test_rollouts_show_weights_in_force_steps_and_verdicts_and_act(
    ui: UI, function: FunctionServer
) -> None:
    hub = ui.hub
    if not await _has_rollout_api(hub):
        pytest.skip("this hub has no rollout API (the panel's 404 is tested below)")
    await _web(hub, function)
    # A canary given all the traffic at once breaks on its first (failing) call: rolled back.
    broken = await _start_rollout(
        hub, steps=[100], interval="1h", analysis={"minCalls": 1, "maxErrorRate": 0.05}
    )
    await _routed_weight(hub, "v2", 100)  # the rollout reaches the router by NOTIFY
    await _invoke(hub, "web")
    broken = await _rollout(hub, broken["id"], "rolled-back")
    [judged] = broken["history"]
    assert judged["verdict"] == "broke" and judged["canary"]["calls"] == 1
    # Then one that waits for calls that never come: it runs until the page acts on it.
    running = await _start_rollout(hub, steps=[10, 50, 100], interval="1h")

    await ui.sign_in()
    detail = await ui.open_function("web")
    prod = detail.locator('tr[data-alias="prod"]')
    await expect(prod.locator(".in-force")).to_contain_text("v1 90 % · v2 10 %")
    await expect(detail.locator(".rollouts > li")).to_have_count(2)
    item = detail.locator(f'.rollout[data-id="{running["id"]}"]')
    head = item.locator(".job-head .badge")
    await expect(head).to_have_text("running")
    await expect(item).to_contain_text("prod: v1 → v2")
    await expect(item).to_contain_text("canary at 10 %")
    await expect(item).to_contain_text("step 1 of 3 (10 % → 50 % → 100 %), each 1 h")
    await expect(item).to_contain_text("No step has ended yet.")
    ended = detail.locator(f'.rollout[data-id="{broken["id"]}"]')
    await expect(ended.locator(".job-head .badge")).to_have_text("rolled-back")
    await expect(ended).to_contain_text(broken["reason"])
    await expect(ended.locator("tbody tr .badge")).to_have_text("broke")
    await expect(ended.locator("tbody tr")).to_contain_text("1 call · 1 failed · 100.0 %")
    await expect(ended.get_by_role("button")).to_have_count(0)  # over: nothing to do

    await item.get_by_role("button", name="Pause").click()
    await expect(head).to_have_text("paused")
    assert (await _rollout(hub, running["id"]))["state"] == "paused"
    await expect(item.locator("tbody tr .badge")).to_have_text("paused")  # the step it ended
    await expect(prod.locator(".in-force")).to_contain_text("v1 90 % · v2 10 %")  # still in force
    await item.get_by_role("button", name="Resume").click()
    await expect(head).to_have_text("running")
    assert (await _rollout(hub, running["id"]))["state"] == "running"

    await item.get_by_role("button", name="Abort…").click()
    await expect(ui.dialog()).to_contain_text("prod goes back to v1 alone")
    await ui.dialog().get_by_role("button", name="Cancel").click()
    assert (await _rollout(hub, running["id"]))["state"] == "running"
    await item.get_by_role("button", name="Abort…").click()
    await ui.dialog().get_by_role("button", name="Abort").click()
    await expect(head).to_have_text("aborted")
    await expect(prod).to_contain_text("as declared")
    assert (await _rollout(hub, running["id"]))["state"] == "aborted"

    # What the hub says is text on the page, never markup.
    hostile = '<img src=x onerror="window.__pwned=1">'
    last = await _start_rollout(hub, interval="1h")
    async with hub.http.post(
        f"{hub.base_url}/v1/rollouts/{last['id']}/abort",
        json={"reason": hostile},
        headers=hub.auth(),
    ) as r:
        assert r.status == 200, await r.text()
    await detail.get_by_role("button", name="Refresh").click()
    await expect(detail.locator(f'.rollout[data-id="{last["id"]}"]')).to_contain_text(hostile)
    assert await detail.locator("img").count() == 0
    assert await ui.page.evaluate("window.__pwned") is None


async def test_a_hub_without_the_rollout_api_shows_no_rollouts(
    ui: UI, function: FunctionServer
) -> None:
    await _web(ui.hub, function)
    ui.expected.append("/v1/rollouts")
    problem = {"type": "about:blank", "title": "Not Found", "status": 404, "detail": "no route"}

    async def not_found(route: Route) -> None:
        await route.fulfill(
            status=404, content_type="application/problem+json", body=json.dumps(problem)
        )

    await ui.page.route("**/v1/rollouts**", not_found)
    await ui.sign_in()
    detail = await ui.open_function("web")
    await expect(detail.locator(".no-rollouts")).to_contain_text("No rollouts")
    await expect(detail.locator('tr[data-alias="prod"]')).to_contain_text("as declared")
    await expect(detail.locator(".stats table")).to_be_visible()
    await expect(ui.page.locator("#notice")).to_be_hidden()
    await expect(detail.locator(".err")).to_have_count(0)


# ---- what a token may see


async def test_each_token_sees_the_views_its_scopes_allow(ui: UI, function: FunctionServer) -> None:
    await _web(ui.hub, function)
    ui.expected.append("/v1/dead-letters")  # admin-only: the sign-in's probe is refused (403)
    await ui.sign_in("admin-only")
    await expect(ui.page.locator("#view-name")).to_have_text("functions")  # its only view
    await expect(ui.row("web")).to_be_visible()
    await expect(ui.page.get_by_role("link", name="Dead letters")).to_be_hidden()
    await ui.page.click("#signout")

    ui.expected[-1] = "/v1/functions"  # dlq-only: functions are refused (403)
    await ui.sign_in("dlq-only", view="#functions")
    await expect(ui.page.locator("#view-name")).to_have_text("dead letters")
    await expect(ui.page.locator("#dead-letters-view")).to_be_visible()
    await expect(ui.page.get_by_role("link", name="Functions")).to_be_hidden()
    await expect(ui.page.locator("#functions-view")).to_be_hidden()


async def test_a_function_that_does_not_exist_is_said_so(ui: UI, function: FunctionServer) -> None:
    await _web(ui.hub, function)
    ui.expected.append("/v1/functions/nope")
    await ui.sign_in(view="#functions/nope")
    await expect(ui.page.locator("#function .err")).to_contain_text("HTTP 404")
    await expect(ui.page.locator("#function .err")).to_contain_text("nope")
    await expect(ui.row("web")).to_be_visible()  # the list is there all the same
    await ui.row("web").get_by_role("link", name="web").click()
    await expect(ui.page.locator("#function h2")).to_contain_text("web")
