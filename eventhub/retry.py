"""What to do after an attempt: a pure function of the outcome and the function's policy.

``decide`` returns one of :class:`Ack` (the function succeeded), :class:`Retry` (ask JetStream to
redeliver after ``delay`` seconds) or :class:`DeadLetter` (give up: store the dead letter, then
ack). Retryable outcomes: connection errors, timeouts, 408, 429 and 5xx. Every other status below
200 or from 300 on is final at once, and so is a request that could not be sent at all
(``invalid-request``). The attempt number is JetStream's delivery count, so a
delivery interrupted by a crash counts as an attempt. Delays grow exponentially
(``initialDelay * multiplier^(attempt-1)``, capped at ``maxDelay``), lose up to ``jitter`` of
their length at random, and never go below a ``Retry-After`` the function sent. An event whose
next attempt would come later than ``maxEventAge`` after it was enqueued is dead-lettered instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from eventhub.resources import RetrySpec

RETRYABLE_STATUS = frozenset({408, 429})
FINAL_ERRORS = frozenset({"invalid-request"})  # the same request would fail the same way


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt produced: an HTTP status, or a transport error and no status."""

    status: int | None = None
    error: str | None = None  # timeout | connection | ...: set when there is no status
    message: str = ""
    retry_after: float | None = None
    latency: float = 0.0
    response_excerpt: str = ""
    # The whole response, kept only when the function has an onSuccess destination.
    body: bytes | None = None
    headers: Mapping[str, str] | None = None  # Content-Type and ce-* headers, with body

    @property
    def succeeded(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        if self.status is None:
            return self.error not in FINAL_ERRORS
        return self.status in RETRYABLE_STATUS or self.status >= 500

    @property
    def code(self) -> str:
        return f"http-{self.status}" if self.status is not None else (self.error or "error")


@dataclass(frozen=True, slots=True)
class Ack:
    pass


@dataclass(frozen=True, slots=True)
class Retry:
    delay: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str  # non-retryable | attempts-exhausted | event-expired


Decision = Ack | Retry | DeadLetter

NON_RETRYABLE = "non-retryable"
EXHAUSTED = "attempts-exhausted"
EXPIRED = "event-expired"


def backoff(attempt: int, policy: RetrySpec, rand: Callable[[], float]) -> float:
    """The delay before attempt ``attempt + 1``; ``rand`` returns a float in [0, 1)."""
    exponent = min(attempt - 1, 64)
    base = min(policy.max_delay, policy.initial_delay * policy.multiplier**exponent)
    return base * (1.0 - policy.jitter * rand())


def expired(age: float, max_event_age: float) -> bool:
    """Checked before an attempt: an event older than maxEventAge is not invoked any more."""
    return age > max_event_age


def decide(
    outcome: Outcome,
    *,
    attempt: int,
    age: float,
    policy: RetrySpec,
    max_event_age: float,
    rand: Callable[[], float],
) -> Decision:
    if outcome.succeeded:
        return Ack()
    if not outcome.retryable:
        return DeadLetter(NON_RETRYABLE)
    if attempt >= policy.max_attempts:
        return DeadLetter(EXHAUSTED)
    delay = backoff(attempt, policy, rand)
    if outcome.retry_after is not None:
        delay = max(delay, outcome.retry_after)
    if age + delay > max_event_age:
        return DeadLetter(EXPIRED)
    return Retry(delay)
