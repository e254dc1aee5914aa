"""Outcome callbacks: ``X-Callback-Url`` of a direct invocation receives the result.

Sent after the invocation is settled (acked), best effort: up to three tries a few seconds
apart, then logged. The body is the start of the function's response; headers say what happened
(``Eventhub-Invocation-Status: succeeded | dead-lettered``, ``X-Function-Status``, and
OpenFaaS's ``X-Call-Id``). A callback never causes the function to be invoked again.

Callbacks go through their own HTTP client, whose resolver applies the callback policy again
(see eventhub.callbackpolicy): an address refused at send time is logged and not tried again.
Redirects are not followed: any answer below 500 ends the delivery. Logs name a callback by
``scheme://host:port`` only, never its credentials, path or query.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver
from yarl import URL

from eventhub.callbackpolicy import (
    CallbackRefused,
    GuardedResolver,
    is_ip_literal,
    origin,
    policy_of,
)
from eventhub.invocations import Invocation
from eventhub.retry import Outcome

log = structlog.get_logger(__name__)
_TRIES = 3
_BACKOFF = 2.0  # seconds, times the attempt number
_MAX_PENDING = 1000


class Callbacks:
    """Owns the callback tasks and the HTTP client they share (made on first use)."""

    def __init__(self, allow: Iterable[str] = (), resolver: AbstractResolver | None = None) -> None:
        self._policy = policy_of(tuple(allow))  # the one the API checks with
        self._inner_resolver = resolver  # the lookup under the guard (tests pass a fake one)
        self._session: aiohttp.ClientSession | None = None
        self._resolver: GuardedResolver | None = None
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
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._resolver is not None:
            await self._resolver.close()  # the connector closes only a resolver it made
            self._resolver = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._resolver = GuardedResolver(self._policy, self._inner_resolver)
            self._session = aiohttp.ClientSession(
                # No DNS cache: every connection is made to addresses checked just then.
                connector=aiohttp.TCPConnector(resolver=self._resolver, use_dns_cache=False),
                trust_env=False,  # a proxy would resolve the host beyond the guard
            )
        return self._session

    async def _deliver(self, invocation: Invocation, status: str, outcome: Outcome) -> None:
        if invocation.callback_url is None:
            return
        try:
            url = URL(invocation.callback_url)
        except ValueError:
            log.warning("callback_refused", invocation_id=invocation.id, reason="not a URL")
            return
        bound = log.bind(invocation_id=invocation.id, callback=origin(url))
        # aiohttp connects to an IP literal without asking the resolver: check it here.
        host = url.raw_host or ""
        literal = self._policy.refusal(host) if is_ip_literal(host) else None
        if literal:
            bound.warning("callback_refused", reason=f"{host} is {literal}")
            return
        headers = {
            "Eventhub-Invocation-Id": invocation.id,
            "Eventhub-Invocation-Status": status,
            "X-Call-Id": invocation.id,
            "X-Function-Name": invocation.function,
            "Eventhub-Function-Version": invocation.version,
            "X-Function-Status": str(outcome.status) if outcome.status else outcome.code,
        }
        for attempt in range(1, _TRIES + 1):
            try:
                async with self._client().post(
                    url,
                    data=outcome.response_excerpt.encode(),
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=10),
                    allow_redirects=False,
                ) as response:
                    if response.status < 500:
                        if 300 <= response.status < 400:
                            bound.info("callback_redirect_not_followed", status=response.status)
                        return
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, CallbackRefused):
                    bound.warning("callback_refused", reason=str(exc.os_error))
                    return
                bound.info("callback_failed", error=str(exc))  # host:port and the OS error
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                # Only the type: some messages carry the whole URL.
                bound.info("callback_failed", error=type(exc).__name__)
            if attempt < _TRIES:
                await asyncio.sleep(_BACKOFF * attempt)
        bound.warning("callback_gave_up", tries=_TRIES)
