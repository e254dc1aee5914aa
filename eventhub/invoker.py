"""Calls a function over HTTP: one POST, one :class:`Outcome`.

The request carries the event in the function's ``eventFormat`` (binary: ``ce-*`` headers and the
data as body; structured: ``application/cloudevents+json``), the function's own ``headers``, and
``Eventhub-Invocation-Id``, ``Eventhub-Attempt`` and W3C ``traceparent``. Transport failures are
mapped here, once, to outcomes with an ``error`` code: ``timeout`` or ``connection``. The invoker
never raises for a failed call; cancellation propagates.
"""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import aiohttp

from eventhub.events import STRUCTURED
from eventhub.invocations import Invocation
from eventhub.resources import FunctionSpec
from eventhub.retry import Outcome

EXCERPT_BYTES = 1024
USER_AGENT = "eventhub/0.1"


class Invoker:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def invoke(self, invocation: Invocation, spec: FunctionSpec, attempt: int) -> Outcome:
        headers, body = request_for(invocation, spec, attempt)
        started = time.monotonic()
        try:
            async with self._session.post(
                spec.url,
                data=body,
                headers=headers,
                timeout=_timeout(spec.timeout),
                allow_redirects=False,
            ) as response:
                excerpt = await response.content.read(EXCERPT_BYTES)
                return Outcome(
                    status=response.status,
                    retry_after=parse_retry_after(response.headers.get("Retry-After")),
                    latency=time.monotonic() - started,
                    response_excerpt=excerpt.decode("utf-8", errors="replace"),
                )
        except TimeoutError:
            return Outcome(
                error="timeout",
                message=f"no response within {spec.timeout:g}s",
                latency=time.monotonic() - started,
            )
        except (aiohttp.ClientError, OSError) as exc:
            return Outcome(
                error="connection",
                message=f"{type(exc).__name__}: {exc}"[:500],
                latency=time.monotonic() - started,
            )


@functools.lru_cache(maxsize=256)
def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds)


def request_for(
    invocation: Invocation, spec: FunctionSpec, attempt: int
) -> tuple[dict[str, str], bytes]:
    event = invocation.event
    if spec.event_format == "structured":
        headers = {"Content-Type": STRUCTURED}
        body = event.structured_bytes()
    else:
        headers = event.binary_headers()
        body = event.data
    headers.update(spec.headers)
    headers["Eventhub-Invocation-Id"] = invocation.id
    headers["Eventhub-Attempt"] = str(attempt)
    headers["traceparent"] = invocation.traceparent
    if invocation.tracestate:
        headers["tracestate"] = invocation.tracestate
    headers["User-Agent"] = USER_AGENT
    return headers, body


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
