"""Peak shaving: a full buffer answers 503, a rate limit spaces the calls."""

from __future__ import annotations

import asyncio
import itertools

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
        await asyncio.gather(*(hub.post_event(f"r{i}") for i in range(20)))
        calls = await function.wait_for(20, "paced", wait=30)
    times = sorted(c.at for c in calls)
    assert times[-1] - times[0] >= 1.7  # 20 calls at 10/s: slots 100 ms apart
    for i, start in enumerate(times):
        in_window = sum(1 for t in times[i:] if t - start < 1.0)
        # Slots are 100 ms apart; one more may land in a 1 s window through arrival jitter.
        assert in_window <= 11, in_window


async def test_no_burst_after_an_idle_spell(settings: Settings, function: FunctionServer) -> None:
    async with start_hub(settings, TOKEN) as hub:
        await hub.function("calm", function.url("calm"), rateLimit="2/s", maxConcurrency=10)
        await hub.bind("to-calm", "calm")
        await asyncio.sleep(1.5)  # idle: a slot booked in advance would be long past now
        await asyncio.gather(*(hub.post_event(f"c{i}", type_="t") for i in range(3)))
        calls = await function.wait_for(3, "calm")
    times = sorted(c.at for c in calls)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= 0.4 for gap in gaps), gaps  # slots 500 ms apart, from the first call on
