"""Outcome callbacks: ``X-Callback-Url`` of a direct invocation receives the result.

Sent after the invocation is settled (acked), best effort: up to three tries a few seconds
apart, then logged. The body is the start of the function's response; headers say what happened
(``Eventhub-Invocation-Status: succeeded | dead-lettered``, ``X-Function-Status``, and
OpenFaaS's ``X-Call-Id``). A callback never causes the function to be invoked again.
"""

from __future__ import annotations

import asyncio

import aiohttp
import structlog

from eventhub.invocations import Invocation
from eventhub.retry import Outcome

log = structlog.get_logger(__name__)
_TRIES = 3
_MAX_PENDING = 1000


class Callbacks:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, invocation: Invocation, status: str, outcome: Outcome) -> None:
        if not invocation.callback_url:
            return
        if len(self._tasks) >= _MAX_PENDING:
            log.warning("callback_dropped", invocation_id=invocation.id, reason="too many pending")
            return
        task = asyncio.create_task(self._deliver(invocation, status, outcome))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, grace: float) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    async def _deliver(self, invocation: Invocation, status: str, outcome: Outcome) -> None:
        if invocation.callback_url is None:
            return
        headers = {
            "Eventhub-Invocation-Id": invocation.id,
            "Eventhub-Invocation-Status": status,
            "X-Call-Id": invocation.id,
            "X-Function-Name": invocation.function,
            "X-Function-Status": str(outcome.status) if outcome.status else outcome.code,
        }
        for attempt in range(1, _TRIES + 1):
            try:
                async with self._session.post(
                    invocation.callback_url,
                    data=outcome.response_excerpt.encode(),
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=10),
                ) as response:
                    if response.status < 500:
                        return
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.info("callback_failed", invocation_id=invocation.id, error=repr(exc))
            if attempt < _TRIES:
                await asyncio.sleep(2.0 * attempt)
        log.warning("callback_gave_up", invocation_id=invocation.id, url=invocation.callback_url)
