"""Cancellation is never swallowed, even when a client library turns it into an error (nats-py
raises ConnectionClosedError from a pull cancelled on a closed connection)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from eventhub.queue import Puller, keep_pulling
from eventhub.sources import SourceRunner


class ClosedConnection(Exception):
    pass


async def _turns_cancellation_into_an_error() -> None:
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        raise ClosedConnection("nats: connection closed") from None


async def _stops_when_cancelled(task: asyncio.Task[None]) -> None:
    await asyncio.sleep(0.05)  # it is waiting inside the client now
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)
    assert done, "the task went on after it was cancelled"
    assert task.cancelled()


async def test_a_pull_loop_stops_when_its_cancellation_comes_back_as_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def open_puller() -> Puller:
        return Puller.__new__(Puller)

    async def pull_once(_puller: Puller) -> int:
        await _turns_cancellation_into_an_error()
        return 0

    async def nothing() -> None:
        return None

    closed: list[bool] = []

    async def close(_self: Puller) -> None:
        closed.append(True)

    monkeypatch.setattr(Puller, "close", close)
    task = asyncio.create_task(
        keep_pulling(open_puller, pull_once, nothing, lambda: True, consumer="c")
    )
    await _stops_when_cancelled(task)
    assert closed == [True]


async def test_a_source_stops_when_its_cancellation_comes_back_as_an_error() -> None:
    class Connector:
        async def run(self, ctx: Any) -> None:
            await _turns_cancellation_into_an_error()

    class Context:
        name = "s"
        state = "new"
        restarts = 0

    runner = SourceRunner(Context(), Connector())  # type: ignore[arg-type]
    runner.start()
    assert runner._task is not None
    await _stops_when_cancelled(runner._task)
