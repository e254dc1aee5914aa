"""The page's Flows view, in a real headless Chromium against an in-process hub and a real flow
(a sequence, a choice and a parallel step with its join; see test_flows.py).

What must hold: the view lists the flow with the binding that starts it, and its runs with their
status and trigger event; a run is drawn as the flow's declared steps (one node per branch, a
join) with an edge for each `next`, choice rule (labelled with its `when`), default and the
fan-out and join, each node carrying the run's status for it; selecting a node shows its
attempts, version and result; a failed run shows its failed step and the dead letter it left.

Any page error fails a test: an uncaught exception, a console error, a failed request, an HTTP
error answer.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest

from tests.browser import launch
from tests.integration.test_flows import JsonFunctions, declare_uploads, post, wait_run
from tests.integration.test_ui_functions import UI, expect
from tests.support import RunningHub

if TYPE_CHECKING:
    from playwright.async_api import Browser, Locator

NODES = {
    "scan": ("function", "succeeded"),
    "route": ("choice", "succeeded"),
    "thumbs": ("parallel", "succeeded"),
    "thumbs[0]": ("branch", "succeeded"),
    "thumbs[1]": ("branch", "succeeded"),
    "thumbs/join": ("join", "succeeded"),
    "quarantine": ("function", "not-reached"),
    "store": ("function", "succeeded"),
}
EDGES = {
    ("scan", "route", "next", None),
    ("route", "quarantine", "choice", "data.infected == true"),
    ("route", "thumbs", "default", "default"),
    ("thumbs", "thumbs[0]", "fan-out", None),
    ("thumbs", "thumbs[1]", "fan-out", None),
    ("thumbs[0]", "thumbs/join", "join", None),
    ("thumbs[1]", "thumbs/join", "join", None),
    ("thumbs/join", "store", "next", None),
}  # quarantine ends the run (`end: true`); store is the last step
SELECTED = re.compile(r"\bselected\b")
EDGES_TAKEN_CLEAN = {(a, b) for a, b, _, _ in EDGES} - {("route", "quarantine")}


@pytest.fixture
async def fns() -> AsyncIterator[JsonFunctions]:
    server = JsonFunctions()
    await server.start()
    yield server
    await server.stop()


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
    view.watch()
    yield view
    errors = list(view.errors)  # before closing: closing aborts the page's pending reads
    await context.close()
    assert errors == []


def graph(ui: UI) -> Locator:
    return ui.page.locator("#flow-run svg.flow-graph")


async def nodes(ui: UI) -> dict[str, tuple[str, str]]:
    found: list[list[str]] = (
        await graph(ui)
        .locator("g.node")
        .evaluate_all("els => els.map(g => [g.dataset.node, g.dataset.kind, g.dataset.status])")
    )
    return {node: (kind, status) for node, kind, status in found}


async def edges(ui: UI) -> set[tuple[str, str, str, str | None]]:
    found: list[list[Any]] = (
        await graph(ui)
        .locator("g.edge")
        .evaluate_all(
            "els => els.map(g => [g.dataset.from, g.dataset.to, g.dataset.kind,"
            " g.dataset.label ?? null])"
        )
    )
    return {(a, b, kind, label) for a, b, kind, label in found}


async def taken(ui: UI) -> set[tuple[str, str]]:
    found: list[list[str]] = (
        await graph(ui)
        .locator('g.edge[data-taken="true"]')
        .evaluate_all("els => els.map(g => [g.dataset.from, g.dataset.to])")
    )
    return {(a, b) for a, b in found}


async def test_a_run_is_listed_and_drawn_as_the_flows_steps(
    ui: UI, hub: RunningHub, fns: JsonFunctions
) -> None:
    await declare_uploads(hub, fns)
    await post(hub, "clean-1", {"object": {"key": "a.jpg", "infected": False}})
    run = await wait_run(hub, "uploads", "clean-1", "succeeded")
    await post(hub, "bad-1", {"object": {"key": "b.jpg", "infected": True}})
    bad = await wait_run(hub, "uploads", "bad-1", "succeeded")

    await ui.sign_in()
    await ui.page.get_by_role("link", name="Flows").click()
    row = ui.page.locator('#flows tr[data-flow="uploads"]')
    await expect(row).to_contain_text("on-upload")  # the binding that starts it
    await expect(row).to_contain_text("scan → route → thumbs → quarantine → store")
    await row.get_by_role("link", name="uploads").click()

    # The runs, newest first, with status and trigger event.
    runs = ui.page.locator("#flow tr[data-run]")
    await expect(runs).to_have_count(2)
    assert await runs.evaluate_all("els => els.map(r => r.dataset.run)") == [bad["id"], run["id"]]
    listed = ui.page.locator(f'#flow tr[data-run="{run["id"]}"]')
    await expect(listed.locator(".badge")).to_have_text("succeeded")
    await expect(listed).to_contain_text("clean-1")
    await expect(listed).to_contain_text("/uploads · com.example.upload")

    # Before a run is opened: the flow as declared, no status.
    await expect(graph(ui).locator("g.node")).to_have_count(len(NODES))
    assert await graph(ui).locator("g.node[data-status]").count() == 0

    await listed.get_by_role("link").click()
    await expect(ui.page.locator("#flow-run h3").first).to_contain_text(run["id"])
    assert ui.page.url.endswith(f"#flows/uploads/{run['id']}")
    assert await nodes(ui) == NODES
    assert await edges(ui) == EDGES
    assert await taken(ui) == EDGES_TAKEN_CLEAN
    await expect(graph(ui).locator('g.edge[data-kind="choice"] text')).to_have_text(
        "data.infected == true"
    )

    # A node selected: its timing, attempts, version and result.
    await graph(ui).locator('g.node[data-node="scan"]').click()
    panel = ui.page.locator("#flow-step")
    await expect(panel.locator("h3")).to_contain_text("scan")
    entry = panel.locator("dl.entry")
    await expect(entry).to_have_count(1)
    await expect(entry).to_contain_text("latest")
    await expect(entry).to_contain_text(re.compile(r'"scanned": ?true'))
    await expect(entry.locator("dt", has_text="Attempts").locator("+ dd")).to_have_text("1")
    await expect(entry.locator("dt", has_text="Duration").locator("+ dd")).to_contain_text("ms")
    await expect(graph(ui).locator('g.node[data-node="scan"]')).to_have_class(
        re.compile(r"\bselected\b")
    )
    await graph(ui).locator('g.node[data-node="thumbs[1]"]').click()
    await expect(panel).to_contain_text("large:a.jpg")
    await graph(ui).locator('g.node[data-node="quarantine"]').click()
    await expect(panel).to_contain_text("This run did not reach this step.")

    # The other run took the rule: quarantine, and nothing after the choice but it.
    await ui.page.goto(f"{hub.base_url}/ui#flows/uploads/{bad['id']}")
    await expect(ui.page.locator("#flow-run h3").first).to_contain_text(bad["id"])
    statuses = {node: status for node, (_, status) in (await nodes(ui)).items()}
    assert statuses == {
        "scan": "succeeded",
        "route": "succeeded",
        "quarantine": "succeeded",
        **{n: "not-reached" for n in ("thumbs", "thumbs[0]", "thumbs[1]", "thumbs/join", "store")},
    }
    assert await taken(ui) == {("scan", "route"), ("route", "quarantine")}


async def test_a_failed_run_shows_its_failed_step(
    ui: UI, hub: RunningHub, fns: JsonFunctions
) -> None:
    fns.handlers["store"] = lambda _: (400, {"error": "no room"})
    await declare_uploads(hub, fns, retry={"maxAttempts": 1})
    await post(hub, "doomed", {"object": {"key": "d.jpg", "infected": False}})
    failed = await wait_run(hub, "uploads", "doomed", "failed")
    [dead] = await hub.wait_dead_letters(1, function="store")

    await ui.sign_in(view=f"#flows/uploads/{failed['id']}")  # a link keeps the place
    await expect(ui.page.locator("#flow-run h3").first).to_contain_text(failed["id"])
    listed = ui.page.locator(f'#flow tr[data-run="{failed["id"]}"]')
    await expect(listed.locator(".badge")).to_have_text("failed")
    await expect(listed).to_contain_text("step 'store' failed")
    statuses = {node: status for node, (_, status) in (await nodes(ui)).items()}
    assert statuses["store"] == "failed"
    assert statuses["thumbs/join"] == "succeeded" and statuses["quarantine"] == "not-reached"
    assert [n for n, s in statuses.items() if s == "failed"] == ["store"]
    await expect(ui.page.locator("#flow-run dl.facts").first).to_contain_text("non-retryable")

    await graph(ui).locator('g.node[data-node="store"]').click()
    entry = ui.page.locator("#flow-step dl.entry")
    await expect(entry.locator(".badge")).to_have_text("failed")
    await expect(entry).to_contain_text(dead["id"])
    await expect(entry).to_contain_text("HTTP 400")

    # Filtered by status: the failed run only.
    await ui.page.locator('#flow select[name="status"]').select_option("succeeded")
    await expect(ui.page.locator("#flow tr[data-run]")).to_have_count(0)
    await ui.page.locator('#flow select[name="status"]').select_option("failed")
    await expect(ui.page.locator("#flow tr[data-run]")).to_have_count(1)

    # The dead letter the step left links back to its run.
    await ui.page.get_by_role("link", name="Dead letters").click()
    await ui.page.locator(f'#rows tr[data-id="{dead["id"]}"] td').nth(2).click()
    fact = ui.page.locator("#detail dt", has_text="Flow run").locator("+ dd")
    await expect(fact).to_contain_text("uploads, step store")
    await fact.get_by_role("link", name=failed["id"]).click()
    await expect(ui.page.locator("#detail")).to_be_hidden()
    await expect(ui.page.locator("#flow-run h3").first).to_contain_text(failed["id"])
