"""A function's ``rateLimit``, held across every hub process with GCRA in Redis.

``reserve`` books the next free slot for the function and returns how long to wait for it. The
dispatcher books it once a message is there (one at a time under a rate limit): a slot booked in
advance would be spent late and let a burst through after an idle spell. Slots are spaced
evenly (``period / count`` apart, no burst), so no window of any length ever sees more than the
rate allows.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from eventhub.units import Rate

# KEYS[1]: the function's key. ARGV[1]: the interval between slots in microseconds.
# Returns the wait in microseconds before the booked slot.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local ttl = math.ceil((tat + interval - now) / 1000) + 1000
redis.call('SET', KEYS[1], tostring(tat + interval), 'PX', ttl)
return tostring(tat - now)
"""


class RateLimiter:
    def __init__(self, client: aioredis.Redis, namespace: str) -> None:
        self._redis = client
        self._prefix = f"{namespace}:rate:"
        self._script = client.register_script(_GCRA)

    async def reserve(self, function: str, rate: Rate) -> float:
        """Book the next slot; returns the seconds to wait before using it."""
        interval_us = int(1_000_000 * rate.period / rate.count)
        wait_us = await self._script(keys=[self._prefix + function], args=[interval_us])
        return max(0.0, float(wait_us) / 1_000_000)
