"""The operators' page at ``/ui``, in a real headless Chromium against an in-process hub.

What must hold: the page needs no token but every data call does (and a refused token is said
plainly); the list shows and filters the dead letters; the detail shows the event and every
attempt, with event data shown as text, never run; the overview counts per function and error
with a 24 h sparkline; replay previews the count, asks for confirmation and follows the job to
its end; purge asks for confirmation and removes the rows.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest

from eventhub.events import Event
from eventhub.ports import DeadLetterRecord, dead_letter_id
from tests.browser import launch, record_errors
from tests.conftest import TOKEN
from tests.support import FunctionServer, RunningHub

if TYPE_CHECKING:
    from playwright.async_api import Browser, Locator, Page


@dataclass
class UI:
    hub: RunningHub
    page: Page
    errors: list[str]

    async def sign_in(self, token: str = TOKEN) -> None:
        await self.page.goto(f"{self.hub.base_url}/ui")
        await self.page.fill("#token", token)
        await self.page.click("#login-form button[type=submit]")

    @property
    def rows(self) -> Locator:
        return self.page.locator("#rows tr")

    def row(self, event_id: str) -> Locator:
        return self.rows.filter(has_text=event_id)

    async def filter(self, **values: str) -> None:
        for name, value in values.items():
            field = self.page.locator(f"#filters [name={name}]")
            if name == "status":
                await field.select_option(value)
            else:
                await field.fill(value)
        await self.page.click("#filters button[type=submit]")

    def dialog(self) -> Locator:
        return self.page.locator("#confirm")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with launch() as b:
        yield b


@pytest.fixture
async def ui(browser: Browser, hub: RunningHub) -> AsyncIterator[UI]:
    from playwright.async_api import expect

    expect.set_options(timeout=10_000)
    context = await browser.new_context(viewport={"width": 1360, "height": 1000})
    page = await context.new_page()
    page.set_default_timeout(10_000)
    view = UI(hub, page, record_errors(page))
    yield view
    await context.close()
    assert view.errors == []


def expect(target: Any) -> Any:
    from playwright.async_api import expect as playwright_expect

    return playwright_expect(target)


async def seed(
    hub: RunningHub, function: str, count: int, *, error_code: str = "http-500", **kw: Any
) -> list[str]:
    """``count`` dead letters of ``function`` failed in the last hours; their event ids."""
    assert hub.hub is not None
    now = datetime.now(UTC)
    ids = []
    for i in range(count):
        event_id = f"{function}-{i}"
        inv = f"inv-{uuid.uuid4().hex}"
        attributes = {"specversion": "1.0", "id": event_id, "source": "/seed", "type": "t"}
        await hub.hub.dead_letters.store(
            DeadLetterRecord(
                id=dead_letter_id(inv),
                invocation_id=inv,
                function=function,
                binding=kw.get("binding", f"to-{function}"),
                event=Event(attributes, json.dumps({"i": i}).encode()),
                reason="attempts-exhausted",
                error_code=error_code,
                error_message="attempts-exhausted: the function answered HTTP 500",
                attempts=[],
                enqueued_at=now - timedelta(hours=i % 5, minutes=1),
                failed_at=now - timedelta(hours=i % 5, seconds=i),
                dead_letter_function=None,
            )
        )
        ids.append(event_id)
    return ids


async def failing(hub: RunningHub, function: FunctionServer, name: str, events: int) -> None:
    """Real dead letters: ``name`` answers 400 (not retried) to ``events`` events."""
    function.respond(name, *[400] * events)
    await hub.function(name, function.url(name), retry={"maxAttempts": 2})
    await hub.bind(f"to-{name}", name, filter=[{"exact": {"type": f"{name}.t"}}])
    await hub.wait_routed(name)
    for i in range(events):
        response = await hub.post_event(f"{name}-{i}", type_=f"{name}.t")
        assert response.status == 202
    await hub.wait_dead_letters(events, function=name)


# ---- served without a token; data only with one


async def test_page_and_assets_are_served_without_a_token(hub: RunningHub) -> None:
    async with hub.http.get(f"{hub.base_url}/ui") as r:
        assert r.status == 200
        assert r.content_type == "text/html"
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert 'src="/ui/app.js"' in await r.text()
    async with hub.http.get(f"{hub.base_url}/ui/") as r:
        assert (r.status, r.content_type) == (200, "text/html")
    for name, content_type in [
        ("app.js", "text/javascript"),
        ("api.js", "text/javascript"),
        ("dom.js", "text/javascript"),
        ("app.css", "text/css"),
    ]:
        async with hub.http.get(f"{hub.base_url}/ui/{name}") as r:
            assert (r.status, r.content_type) == (200, content_type)
    for path in ["/ui/nothing.js", "/ui/..%2Fapi%2Fui.py", "/ui/../api/ui.py"]:
        async with hub.http.get(f"{hub.base_url}{path}") as r:
            assert r.status == 404, path
    async with hub.http.get(f"{hub.base_url}/v1/dead-letters") as r:
        assert r.status == 401


async def test_rejected_tokens_are_explained(ui: UI) -> None:
    await ui.sign_in("not-a-token")
    await expect(ui.page.locator("#notice")).to_contain_text("401")
    await expect(ui.page.locator("#login")).to_be_visible()
    await ui.sign_in("events-only")
    await expect(ui.page.locator("#notice")).to_contain_text("403")
    await expect(ui.page.locator("#notice")).to_contain_text("dlq")
    await expect(ui.page.locator("#app")).to_be_hidden()
    assert await ui.page.evaluate("sessionStorage.getItem('eventhub.token')") is None


# ---- list, filters, pages, detail


async def test_sign_in_lists_dead_letters_and_filters_by_function(ui: UI) -> None:
    odd = await seed(ui.hub, "odd", 3)
    even = await seed(ui.hub, "even", 4, error_code="http-503")
    await ui.sign_in()
    await expect(ui.rows).to_have_count(7)
    await expect(ui.row(odd[0])).to_contain_text("http-500")
    await expect(ui.row(odd[0]).locator(".badge")).to_have_text("dead")

    await ui.filter(function="odd")
    await expect(ui.rows).to_have_count(3)
    for event_id in odd:
        await expect(ui.row(event_id)).to_contain_text("odd")
    await ui.page.click("#filters button[type=reset]")
    await expect(ui.rows).to_have_count(7)
    await ui.filter(status="resolved")
    await expect(ui.page.locator("#empty")).to_be_visible()

    # The token lives in the tab's sessionStorage: a reload goes straight to the list.
    await ui.page.reload()
    await expect(ui.row(even[0])).to_be_visible()
    await ui.page.click("#signout")
    await expect(ui.page.locator("#login")).to_be_visible()


async def test_list_pages_with_next_cursor(ui: UI) -> None:
    await seed(ui.hub, "many", 60)
    await ui.sign_in()
    await expect(ui.rows).to_have_count(50)
    await ui.page.click("#more")
    await expect(ui.rows).to_have_count(60)
    await expect(ui.page.locator("#more")).to_be_hidden()


async def test_detail_shows_event_attempts_and_dead_letter_function(
    ui: UI, function: FunctionServer
) -> None:
    hub = ui.hub
    await hub.function("picky-dlf", function.url("picky-dlf"))
    function.respond("picky", 400)
    await hub.function("picky", function.url("picky"), deadLetter={"function": "picky-dlf"})
    await hub.bind("to-picky", "picky")
    await hub.wait_routed("picky")
    # Event data is user input: markup in it must be shown, never run.
    hostile = {
        "html": '<img src=x onerror="window.__pwned=1">',
        "script": "</pre><script>window.__pwned=2</script>",
    }
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "hostile-1",
        "ce-source": "/test",
        "ce-type": "com.example.test",
        "content-type": "application/json",
        **hub.auth(),
    }
    async with hub.http.post(
        f"{hub.base_url}/v1/events", data=json.dumps(hostile), headers=headers
    ) as r:
        assert r.status == 202
    await function.wait_for(1, "picky-dlf")
    [letter] = await hub.wait_dead_letters(1, function="picky")
    while letter["deadLetterFunction"]["status"] != "delivered":
        [letter] = await hub.wait_dead_letters(1, function="picky")

    await ui.sign_in()
    await ui.row("hostile-1").click()
    detail = ui.page.locator("#detail")
    await expect(detail).to_be_visible()
    await expect(detail).to_contain_text(letter["id"])
    await expect(detail).to_contain_text("non-retryable")
    attempts = detail.locator("table.grid tbody tr")
    await expect(attempts).to_have_count(1)
    await expect(attempts.first).to_contain_text("HTTP 400")
    await expect(attempts.first).to_contain_text("status 400")  # the response excerpt
    await expect(attempts.first).to_contain_text(" ms")
    await expect(detail.locator(".dlf")).to_contain_text("picky-dlf")
    await expect(detail.locator(".dlf .badge")).to_have_text("delivered")
    event_json = detail.locator("pre.json")
    await expect(event_json).to_contain_text('"id": "hostile-1"')
    for key, value in hostile.items():  # as JSON text: quotes escaped, markup kept
        await expect(event_json).to_contain_text(f'"{key}": {json.dumps(value)}')
    assert await detail.locator("img, script").count() == 0
    assert await ui.page.evaluate("window.__pwned") is None
    await detail.get_by_role("button", name="Resend").click()
    await function.wait_for(2, "picky-dlf")  # sent to the dead-letter function again
    await expect(detail.locator(".dlf .badge")).to_have_text(re.compile("pending|delivered"))
    await ui.page.click("#detail-close")
    await expect(detail).to_be_hidden()


# ---- needs GET /v1/dead-letters/stats


async def test_overview_counts_by_function_and_error_with_sparklines(ui: UI) -> None:
    await seed(ui.hub, "alpha", 5)
    await seed(ui.hub, "beta", 2, error_code="http-503")
    await ui.sign_in()
    stats = ui.page.locator("#stats")
    await expect(stats.locator(".tile").first).to_contain_text("7")
    alpha = stats.locator("tr", has_text="alpha").first
    await expect(alpha).to_contain_text("5")
    spark = alpha.locator("svg.spark")
    await expect(spark).to_have_attribute("data-total", "5")
    assert await spark.locator("rect").count() == 24
    assert await spark.locator("rect.bar:not(.zero)").count() == 5  # one per hour seeded
    await expect(stats.locator("tr", has_text="http-503")).to_contain_text("beta")
    await stats.get_by_role("button", name="beta").click()  # filters the list
    await expect(ui.rows).to_have_count(2)


# ---- needs POST /v1/dead-letters/replay and /v1/replay-jobs


async def test_replay_previews_the_count_confirms_and_follows_the_job(
    ui: UI, function: FunctionServer
) -> None:
    await failing(ui.hub, function, "shaky", 3)
    await ui.hub.function("fixed", function.url("fixed"))
    await ui.sign_in()
    await expect(ui.rows).to_have_count(3)
    await ui.filter(function="shaky")
    await ui.page.click("#replay-filter")
    dialog = ui.dialog()
    await expect(dialog.locator(".count")).to_have_text("3 dead letters will be replayed.")
    await expect(dialog.locator(".sample li")).to_have_count(3)
    await expect(dialog).not_to_contain_text("null")
    await dialog.locator("[name=to]").fill("fixed")
    await dialog.locator("[name=rate]").fill("50/s")
    await dialog.get_by_role("button", name="Preview").click()
    confirm = dialog.get_by_role("button", name="Replay 3")
    await expect(confirm).to_be_enabled()
    assert function.calls_to("fixed") == []  # a dry run replays nothing
    await confirm.click()
    await expect(dialog).to_be_hidden()

    job = ui.page.locator("#jobs .job").first
    await expect(job.locator(".badge")).to_have_text("done", timeout=30_000)
    progress = job.locator("progress")
    await expect(progress).to_have_attribute("max", "3")
    assert await progress.evaluate("p => p.value") == 3
    await expect(job).to_contain_text("fixed")
    await function.wait_for(3, "fixed")


async def test_a_running_replay_job_can_be_cancelled(ui: UI) -> None:
    await seed(ui.hub, "slow", 30)
    await ui.sign_in()
    await ui.filter(function="slow")
    await expect(ui.rows).to_have_count(30)
    await ui.page.click("#replay-filter")
    dialog = ui.dialog()
    await dialog.locator("[name=rate]").fill("1/s")
    await dialog.get_by_role("button", name="Preview").click()
    await dialog.get_by_role("button", name="Replay 30").click()
    job = ui.page.locator("#jobs .job").first
    await job.get_by_role("button", name="Cancel").click()
    await expect(job.locator(".badge")).to_have_text("cancelled", timeout=15_000)
    await expect(job.get_by_role("button", name="Cancel")).to_have_count(0)


# ---- needs POST /v1/dead-letters/purge


async def test_purge_asks_for_confirmation_and_removes_the_row(ui: UI) -> None:
    doomed, *kept = await seed(ui.hub, "purged", 3)
    await ui.sign_in()
    await expect(ui.rows).to_have_count(3)
    await ui.row(doomed).get_by_role("checkbox").check()
    await expect(ui.page.locator("#selection")).to_have_text("1 selected")
    await ui.page.click("#purge-selected")
    dialog = ui.dialog()
    await expect(dialog.locator(".count")).to_contain_text("1 dead letter will be deleted")
    await expect(dialog).not_to_contain_text("null")
    await dialog.get_by_role("button", name="Cancel").click()
    await expect(ui.rows).to_have_count(3)  # cancelled: nothing purged

    await ui.page.click("#purge-selected")
    await dialog.get_by_role("button", name="Purge 1").click()
    await expect(ui.page.locator("#notice")).to_contain_text("Purged 1 dead letter")
    await expect(ui.row(doomed)).to_have_count(0)
    await expect(ui.rows).to_have_count(2)
    remaining = await ui.hub.dead_letters(function="purged")
    assert sorted(d["event"]["id"] for d in remaining) == sorted(kept)
