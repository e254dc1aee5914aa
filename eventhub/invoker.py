"""Calls a function over HTTP: one POST, one :class:`Outcome`.

The request carries the event in the function's ``eventFormat`` (binary: ``ce-*`` headers and the
data as body; structured: ``application/cloudevents+json``), the function's own ``headers``, and
``Eventhub-Invocation-Id``, ``Eventhub-Attempt`` and W3C ``traceparent``. Transport failures are
mapped here, once, to outcomes with an ``error`` code: ``timeout`` or ``connection`` (retried), or
``invalid-request`` when the request cannot be sent at all (a header value the HTTP client
refuses, such as a control character in ``datacontenttype`` or in the function's ``headers``): no
retry can fix that, so it is final. The invoker never raises for a failed call; cancellation
propagates.

The response's first :data:`EXCERPT_BYTES` are kept as text for the attempt history: asked for
uncompressed (``Accept-Encoding: identity``), a gzip or deflate body is decompressed anyway, and
bytes that are not UTF-8 text (and NUL) become U+FFFD.
"""

from __future__ import annotations

import functools
import time
import zlib
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import aiohttp

from eventhub.events import STRUCTURED
from eventhub.invocations import Invocation
from eventhub.resources import VersionSpec
from eventhub.retry import Outcome

EXCERPT_BYTES = 1024
MAX_RESULT_BYTES = 8 * 1024 * 1024  # a bigger result cannot be an event anyway
INVALID_REQUEST = "invalid-request"
USER_AGENT = "eventhub/0.1"


class Invoker:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def invoke(
        self, invocation: Invocation, spec: VersionSpec, attempt: int, keep_body: bool = False
    ) -> Outcome:
        """One call. ``keep_body``: read the whole response (up to :data:`MAX_RESULT_BYTES`)
        and keep it with its Content-Type and ``ce-*`` headers: it becomes a result event."""
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
                if keep_body:
                    kept = await _read_at_most(response.content, MAX_RESULT_BYTES)
                    excerpt = (kept or b"")[:EXCERPT_BYTES]
                else:
                    kept, excerpt = None, await response.content.read(EXCERPT_BYTES)
                return Outcome(
                    status=response.status,
                    retry_after=parse_retry_after(response.headers.get("Retry-After")),
                    latency=time.monotonic() - started,
                    response_excerpt=excerpt_text(
                        excerpt, response.headers.get("Content-Encoding")
                    ),
                    body=kept,
                    headers=_result_headers(response.headers) if keep_body else None,
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
        except ValueError as exc:  # aiohttp refuses the headers (injection, not encodable)
            return Outcome(
                error=INVALID_REQUEST,
                message=f"the request cannot be sent: {exc}"[:500],
                latency=time.monotonic() - started,
            )


async def _read_at_most(content: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole body, or None when it is longer than ``limit``."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _result_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {
        k.lower(): v
        for k, v in headers.items()
        if k.lower() == "content-type" or k.lower().startswith("ce-")
    }


@functools.lru_cache(maxsize=256)
def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds)


def request_for(
    invocation: Invocation, spec: VersionSpec, attempt: int
) -> tuple[dict[str, str], bytes]:
    event = invocation.event
    if spec.event_format == "structured":
        headers = {"Content-Type": STRUCTURED}
        body = event.structured_bytes()
    else:
        headers = event.binary_headers()
        body = event.data
    headers["Accept-Encoding"] = "identity"
    headers.update(spec.headers)
    headers["Eventhub-Invocation-Id"] = invocation.id
    headers["Eventhub-Attempt"] = str(attempt)
    headers["traceparent"] = invocation.traceparent
    if invocation.tracestate:
        headers["tracestate"] = invocation.tracestate
    headers["User-Agent"] = USER_AGENT
    return headers, body


def excerpt_text(excerpt: bytes, encoding: str | None) -> str:
    """The start of a response body as text: decompressed (at most :data:`EXCERPT_BYTES` out of
    a possibly truncated stream), undecodable bytes and NUL as U+FFFD."""
    coding = (encoding or "identity").strip().lower()
    if excerpt and coding in ("gzip", "x-gzip", "deflate"):
        wbits = 47 if coding != "deflate" else (15 if excerpt[:1] == b"\x78" else -15)
        try:
            excerpt = zlib.decompressobj(wbits).decompress(excerpt, EXCERPT_BYTES)
        except zlib.error:
            return f"[{coding}-encoded body that cannot be decompressed]"
    elif coding != "identity":
        return f"[{coding}-encoded body]"
    return excerpt.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


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
