"""Headless Chromium for browser tests, driven by Playwright for Python.

The browser is the system's Chromium (``/usr/bin/chromium`` from Debian, or the path in
``EVENTHUB_CHROMIUM``); Playwright's own browser downloads are never used (``playwright
install`` needs the internet). Without Playwright or the browser the tests skip, saying what to
install, unless ``EVENTHUB_REQUIRE_SERVICES=1`` (CI), where they fail instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def unavailable(reason: str) -> NoReturn:
    if os.environ.get("EVENTHUB_REQUIRE_SERVICES") == "1":
        pytest.fail(f"browser tests required but {reason}")
    pytest.skip(reason)


def chromium_path() -> str | None:
    configured = os.environ.get("EVENTHUB_CHROMIUM")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    for candidate in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        found = shutil.which(candidate)
        if found:
            return found
    return None


@contextlib.asynccontextmanager
async def launch() -> AsyncIterator[Browser]:
    try:
        from playwright.async_api import Error, async_playwright
    except ImportError:
        unavailable("Playwright is not installed (pip install playwright)")
    path = chromium_path()
    if path is None:
        unavailable("no Chromium found (apt-get install chromium, or set EVENTHUB_CHROMIUM)")
    async with async_playwright() as playwright:
        try:
            browser = await playwright.chromium.launch(
                executable_path=path, args=ARGS, timeout=30_000
            )
        except Error as exc:
            unavailable(f"Chromium at {path} did not start: {exc}")
        try:
            yield browser
        finally:
            await browser.close()


def record_errors(page: Page) -> list[str]:
    """Uncaught script errors and Content-Security-Policy violations of ``page``, as they come.

    Failed requests are not errors here: the page reports those itself."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    page.on(
        "console",
        lambda msg: (
            errors.append(f"console: {msg.text}")
            if msg.type == "error" and "Content Security Policy" in msg.text
            else None
        ),
    )
    return errors
