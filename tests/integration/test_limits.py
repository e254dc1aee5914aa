"""Peak shaving: a full buffer answers 503, a rate limit spaces the calls."""

from __future__ import annotations

import asyncio
import time

from eventhub.settings import Settings
from tests.conftest import TOKEN
from tests.support import FunctionServer, start_hub


async def test_full_buffer_answers_503_with_retry_after(
    settings: Settings, function: FunctionServer
) -> None:
    small = settings.model_copy(update={"stream_max_msgs": 3})
    function.delays["stuck"] = 5.0
    async with start_hub(small, TOKEN) as hub:
        await hub.function("stuck", function.url("stuck"), maxConcurrency=1)
        await hub.bind("to-stuck", "stuck")
        statuses = []
        for i in range(5):
            response = await hub.post_event(f"s{i}")
            statuses.append(response.status)
            if response.status == 503:
                assert response.headers["Retry-After"]
        assert statuses[:3] == [202, 202, 202]
        assert statuses[3:] == [503, 503]


async def test_rate_limit_spaces_invocations(settings: Settings, function: FunctionServer) -> None:
    async with start_hub(settings, TOKEN) as hub:
        await hub.function("paced", function.url("paced"), rateLimit="10/s", maxConcurrency=50)
        await hub.bind("to-paced", "paced")
        posted = time.monotonic()
        await asyncio.gather(*(hub.post_event(f"r{i}") for i in range(20)))
        calls = await function.wait_for(20, "paced", wait=30)
    assert sorted(c.ce["id"] for c in calls) == sorted(f"r{i}" for i in range(20))
    assert_paced(posted, [c.at for c in calls], interval=0.1)  # 10/s: slots 100 ms apart


async def test_no_burst_after_an_idle_spell(settings: Settings, function: FunctionServer) -> None:
    async with start_hub(settings, TOKEN) as hub:
        await hub.function("calm", function.url("calm"), rateLimit="2/s", maxConcurrency=10)
        await hub.bind("to-calm", "calm")
        await asyncio.sleep(1.5)  # idle: a slot booked in advance would be long past now
        posted = time.monotonic()
        await asyncio.gather(*(hub.post_event(f"c{i}", type_="t") for i in range(3)))
        calls = await function.wait_for(3, "calm")
    # Slots 500 ms apart from the first call on: a slot booked before the idle spell would let
    # two calls through at once.
    assert_paced(posted, [c.at for c in calls], interval=0.5)


def assert_paced(posted: float, arrivals: list[float], interval: float) -> None:
    """The k-th call (0-based, by arrival) came no sooner than k intervals after the events
    were posted. Each call waits for its own slot, booked in Redis (GCRA) once its message is
    there; slots are ``interval`` apart and none lies before the posting. A call arrives after
    its slot, so however a loaded machine delays or bunches arrivals, this holds; 10 ms are
    allowed between Redis's clock and ours. (Gaps between arrivals are not checked: a delayed
    call may arrive just before the next one.)"""
    for k, at in enumerate(sorted(arrivals)):
        assert at - posted >= k * interval - 0.01, (k, at - posted)
