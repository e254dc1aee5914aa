"""Unit tests for eventhub.retry: the pure retry / backoff / dead-letter decision."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from eventhub.resources import RetrySpec
from eventhub.retry import (
    EXHAUSTED,
    EXPIRED,
    NON_RETRYABLE,
    Ack,
    DeadLetter,
    Decision,
    Outcome,
    Retry,
    backoff,
    decide,
    expired,
)

POLICY = RetrySpec(max_attempts=5, initial_delay=1.0, max_delay=60.0, multiplier=2.0, jitter=0.2)
NO_JITTER = RetrySpec(max_attempts=5, initial_delay=1.0, max_delay=60.0, multiplier=2.0, jitter=0.0)
DAY = 86400.0


def low() -> float:
    return 0.0


def high() -> float:
    return 0.999


def run(
    outcome: Outcome,
    *,
    attempt: int = 1,
    age: float = 0.0,
    policy: RetrySpec = NO_JITTER,
    max_event_age: float = DAY,
    rand: Callable[[], float] = low,
) -> Decision:
    return decide(
        outcome, attempt=attempt, age=age, policy=policy, max_event_age=max_event_age, rand=rand
    )


# ---------------------------------------------------------------- classification


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
@pytest.mark.parametrize("attempt", [1, 5, 99])
def test_success_is_acked(status: int, attempt: int) -> None:
    # Even on the last attempt, and even when the event is old: success is success.
    assert run(Outcome(status=status), attempt=attempt, age=2 * DAY) == Ack()


@pytest.mark.parametrize("status", [408, 429, 500, 501, 502, 503, 504, 599])
def test_retryable_statuses_are_retried(status: int) -> None:
    outcome = Outcome(status=status)
    assert outcome.retryable
    assert not outcome.succeeded
    assert run(outcome) == Retry(1.0)


@pytest.mark.parametrize("error", ["timeout", "connection", None])
def test_transport_errors_are_retried(error: str | None) -> None:
    outcome = Outcome(status=None, error=error)
    assert outcome.retryable
    assert not outcome.succeeded
    assert run(outcome) == Retry(1.0)


@pytest.mark.parametrize(
    "status",
    [100, 199, 300, 301, 302, 304, 307, 308, 400, 401, 403, 404, 405, 409, 410, 413, 415, 422],
)
def test_other_statuses_are_dead_lettered_at_once(status: int) -> None:
    outcome = Outcome(status=status)
    assert not outcome.retryable
    assert not outcome.succeeded
    assert run(outcome, attempt=1) == DeadLetter(NON_RETRYABLE)


def test_non_retryable_wins_over_exhausted_and_expired() -> None:
    decision = run(Outcome(status=400), attempt=99, age=2 * DAY)
    assert decision == DeadLetter("non-retryable")


def test_reason_constants() -> None:
    assert (NON_RETRYABLE, EXHAUSTED, EXPIRED) == (
        "non-retryable",
        "attempts-exhausted",
        "event-expired",
    )


# ---------------------------------------------------------------- attempts


@pytest.mark.parametrize("attempt", [1, 2, 3, 4])
def test_attempts_below_max_are_retried(attempt: int) -> None:
    assert isinstance(run(Outcome(status=503), attempt=attempt), Retry)


@pytest.mark.parametrize("attempt", [5, 6, 100])
def test_attempts_at_or_above_max_are_exhausted(attempt: int) -> None:
    assert run(Outcome(status=503), attempt=attempt) == DeadLetter(EXHAUSTED)


def test_single_attempt_policy_never_retries() -> None:
    policy = RetrySpec(max_attempts=1)
    assert run(Outcome(error="timeout"), attempt=1, policy=policy) == DeadLetter(EXHAUSTED)


def test_exhausted_wins_over_expired() -> None:
    decision = run(Outcome(status=503), attempt=5, age=2 * DAY)
    assert decision == DeadLetter(EXHAUSTED)


# ---------------------------------------------------------------- event age


def test_retry_within_max_event_age() -> None:
    # age 8 + delay 2 == 10: not later than maxEventAge.
    assert run(Outcome(status=503), attempt=2, age=8.0, max_event_age=10.0) == Retry(2.0)


def test_retry_past_max_event_age_is_expired() -> None:
    decision = run(Outcome(status=503), attempt=2, age=8.5, max_event_age=10.0)
    assert decision == DeadLetter(EXPIRED)


def test_expiry_accounts_for_the_delay_not_just_the_age() -> None:
    # The event is young, but the next attempt (after 16 s) would come too late.
    policy = RetrySpec(max_attempts=10, jitter=0.0)
    decision = run(Outcome(status=503), attempt=5, age=0.0, max_event_age=10.0, policy=policy)
    assert decision == DeadLetter(EXPIRED)


def test_expiry_uses_retry_after_delay() -> None:
    outcome = Outcome(status=429, retry_after=120.0)
    assert run(outcome, age=0.0, max_event_age=100.0) == DeadLetter(EXPIRED)
    assert run(outcome, age=0.0, max_event_age=120.0) == Retry(120.0)


@pytest.mark.parametrize(
    ("age", "max_age", "result"),
    [(0.0, 10.0, False), (10.0, 10.0, False), (10.001, 10.0, True), (100.0, 0.0, True)],
)
def test_expired(age: float, max_age: float, result: bool) -> None:
    assert expired(age, max_age) is result


# ---------------------------------------------------------------- Retry-After


def test_retry_after_longer_than_backoff_is_honoured() -> None:
    assert run(Outcome(status=429, retry_after=30.0)) == Retry(30.0)


def test_retry_after_shorter_than_backoff_is_a_lower_bound_only() -> None:
    # Backoff for attempt 4 is 8 s; a Retry-After of 1 s does not shorten it.
    assert run(Outcome(status=503, retry_after=1.0), attempt=4) == Retry(8.0)


def test_retry_after_zero_keeps_backoff() -> None:
    assert run(Outcome(status=503, retry_after=0.0), attempt=3) == Retry(4.0)


def test_retry_after_beyond_max_delay_is_still_honoured() -> None:
    assert run(Outcome(status=503, retry_after=600.0)) == Retry(600.0)


def test_retry_after_ignored_for_non_retryable_status() -> None:
    assert run(Outcome(status=404, retry_after=5.0)) == DeadLetter(NON_RETRYABLE)


def test_retry_after_with_jitter_is_still_a_lower_bound() -> None:
    decision = run(Outcome(status=503, retry_after=1.0), policy=POLICY, rand=high)
    assert decision == Retry(1.0)


# ---------------------------------------------------------------- backoff


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0), (6, 32.0), (7, 60.0), (8, 60.0)],
)
def test_backoff_grows_exponentially_up_to_max_delay(attempt: int, expected: float) -> None:
    assert backoff(attempt, NO_JITTER, low) == expected


@pytest.mark.parametrize(
    ("initial", "multiplier", "attempt", "expected"),
    [
        (0.5, 3.0, 1, 0.5),
        (0.5, 3.0, 3, 4.5),
        (2.0, 1.0, 10, 2.0),  # multiplier 1: constant delay
        (10.0, 10.0, 3, 300.0),  # 1000 capped
    ],
)
def test_backoff_uses_initial_delay_and_multiplier(
    initial: float, multiplier: float, attempt: int, expected: float
) -> None:
    policy = RetrySpec(initial_delay=initial, multiplier=multiplier, max_delay=300.0, jitter=0.0)
    assert backoff(attempt, policy, low) == pytest.approx(expected)


@pytest.mark.parametrize("attempt", [100, 1000, 10**6])
def test_backoff_of_huge_attempts_stays_capped(attempt: int) -> None:
    policy = RetrySpec(multiplier=10.0, max_delay=300.0, jitter=0.0)
    assert backoff(attempt, policy, low) == 300.0


def test_backoff_is_monotonic_without_jitter() -> None:
    delays = [backoff(a, NO_JITTER, low) for a in range(1, 30)]
    assert delays == sorted(delays)
    assert max(delays) == NO_JITTER.max_delay


@pytest.mark.parametrize("attempt", [1, 3, 6, 20])
def test_jitter_bounds(attempt: int) -> None:
    base = backoff(attempt, NO_JITTER, low)
    assert backoff(attempt, POLICY, low) == base  # rand 0: the full delay
    shortest = backoff(attempt, POLICY, high)
    assert shortest == pytest.approx(base * (1 - 0.2 * 0.999))
    assert base * 0.8 < shortest < base


@pytest.mark.parametrize("r", [0.0, 0.25, 0.5, 0.75, 0.999])
def test_jitter_only_shortens_within_the_fraction(r: float) -> None:
    delay = backoff(4, POLICY, lambda: r)
    assert 8.0 * (1 - POLICY.jitter) < delay <= 8.0


def test_full_jitter_can_approach_zero() -> None:
    policy = RetrySpec(initial_delay=10.0, jitter=1.0)
    assert backoff(1, policy, low) == 10.0
    assert backoff(1, policy, high) == pytest.approx(0.01)
    assert backoff(1, policy, high) > 0


def test_decide_applies_jitter() -> None:
    decision = run(Outcome(status=503), attempt=3, policy=POLICY, rand=high)
    assert isinstance(decision, Retry)
    assert decision.delay == pytest.approx(4.0 * (1 - 0.2 * 0.999))


def test_decide_uses_the_default_policy() -> None:
    policy = RetrySpec()  # 3 attempts, 1 s initial, x2
    assert run(Outcome(status=500), attempt=1, policy=policy) == Retry(1.0)
    assert run(Outcome(status=500), attempt=2, policy=policy) == Retry(2.0)
    assert run(Outcome(status=500), attempt=3, policy=policy) == DeadLetter(EXHAUSTED)


# ---------------------------------------------------------------- Outcome


@pytest.mark.parametrize(
    ("outcome", "code"),
    [
        (Outcome(status=200), "http-200"),
        (Outcome(status=503), "http-503"),
        (Outcome(status=404, error="ignored"), "http-404"),
        (Outcome(error="timeout"), "timeout"),
        (Outcome(error="connection"), "connection"),
        (Outcome(), "error"),
    ],
)
def test_outcome_code(outcome: Outcome, code: str) -> None:
    assert outcome.code == code


def test_outcome_defaults() -> None:
    outcome = Outcome()
    assert outcome.status is None
    assert outcome.retry_after is None
    assert outcome.message == ""
    assert outcome.latency == 0.0
    assert outcome.response_excerpt == ""
