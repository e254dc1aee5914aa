"""Waiting for PubAcks: outcomes, a deadline for the batch, and cancellation."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from eventhub.errors import DependencyDown, QueueFull
from eventhub.pubacks import PubAcks, settle

STORED = orjson.dumps({"stream": "S", "seq": 1})
DUPLICATE = orjson.dumps({"stream": "S", "seq": 1, "duplicate": True})
FULL = orjson.dumps({"error": {"code": 503, "err_code": 10077, "description": "maximum messages"}})


def _sent(count: int) -> list[tuple[str, asyncio.Future[bytes]]]:
    loop = asyncio.get_running_loop()
    return [(str(i), loop.create_future()) for i in range(count)]


def _pubacks() -> PubAcks:
    return PubAcks(None)  # type: ignore[arg-type]  # forget() needs no connection


@pytest.mark.parametrize("count", [1, 3])
async def test_stored_and_duplicate_pubacks_are_counted(count: int) -> None:
    sent = _sent(count)
    for i, (_, future) in enumerate(sent):
        future.set_result(DUPLICATE if i == 1 else STORED)
    assert await settle(_pubacks(), sent, 1.0) == count - (1 if count > 1 else 0)


@pytest.mark.parametrize("count", [1, 3])
async def test_a_missing_puback_is_dependency_down_after_the_deadline(count: int) -> None:
    sent = _sent(count)
    for _, future in sent[1:]:
        future.set_result(STORED)
    with pytest.raises(DependencyDown, match="no PubAck in time"):
        await settle(_pubacks(), sent, 0.05)
    assert sent[0][1].done()


@pytest.mark.parametrize("count", [1, 3])
async def test_a_refusal_is_raised_once_every_puback_came(count: int) -> None:
    sent = _sent(count)
    for _, future in sent:
        future.set_result(FULL)
    with pytest.raises(QueueFull):
        await settle(_pubacks(), sent, 1.0)


@pytest.mark.parametrize("count", [1, 3])
async def test_cancellation_propagates(count: int) -> None:
    sent = _sent(count)
    task = asyncio.create_task(settle(_pubacks(), sent, 10.0))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(future.cancelled() for _, future in sent)
