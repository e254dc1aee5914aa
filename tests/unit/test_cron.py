"""Unit tests for connectors.cron: ticks, missed ticks per policy, ids and events, no waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from connectors.cron import (
    DEFAULT_TYPE,
    Cron,
    CronConnector,
    Every,
    jitter_delay,
    last_tick,
    missed_ticks,
    parse_schedule,
    payload_bytes,
    rfc3339,
    tick_event,
    tick_id,
)
from eventhub.events import Event
from eventhub.resources import API_VERSION, parse_resource
from eventhub.sourcespecs import CronSpec

S = 1000
MIN = 60 * S
HOUR = 60 * MIN


def ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    """Unix milliseconds of a UTC wall time."""
    moment = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    return round(moment.timestamp() * 1000)


def spec(**fields: Any) -> CronSpec:
    return CronSpec.model_validate({"type": "cron", "schedule": "@every 1s", **fields})


def following(schedule: Any, start: int, count: int) -> list[int]:
    ticks, tick = [], start
    for _ in range(count):
        tick = schedule.next_after(tick)
        ticks.append(tick)
    return ticks


# -- schedules -----------------------------------------------------------------------------


def test_every_ticks_on_multiples_of_the_interval_since_the_epoch() -> None:
    every = parse_schedule("@every 30s", "Europe/Paris")  # the time zone does not apply
    assert every == Every(30 * S)
    assert every.next_after(ms(2024, 1, 1, 12, 0, 10)) == ms(2024, 1, 1, 12, 0, 30)
    assert every.next_after(ms(2024, 1, 1, 12, 0, 30)) == ms(2024, 1, 1, 12, 1, 0)  # strictly after
    assert every.latest_at_or_before(ms(2024, 1, 1, 12, 0, 30)) == ms(2024, 1, 1, 12, 0, 30)
    assert every.latest_at_or_before(ms(2024, 1, 1, 12, 0, 29)) == ms(2024, 1, 1, 12, 0, 0)


def test_every_with_a_fractional_interval_counts_in_milliseconds() -> None:
    every = parse_schedule("@every 1500ms", "UTC")
    assert every == Every(1500)
    assert following(every, 0, 3) == [1500, 3000, 4500]


def test_five_fields_are_minute_first() -> None:
    cron = parse_schedule("*/15 * * * *", "UTC")
    assert following(cron, ms(2024, 5, 1, 10, 7, 30), 3) == [
        ms(2024, 5, 1, 10, 15),
        ms(2024, 5, 1, 10, 30),
        ms(2024, 5, 1, 10, 45),
    ]


def test_six_fields_are_seconds_first() -> None:
    cron = parse_schedule("30 0 * * * *", "UTC")  # second 30 of minute 0 of every hour
    assert following(cron, ms(2024, 5, 1, 10, 7), 2) == [
        ms(2024, 5, 1, 11, 0, 30),
        ms(2024, 5, 1, 12, 0, 30),
    ]
    every_ten = parse_schedule("*/10 * * * * *", "UTC")
    assert following(every_ten, ms(2024, 5, 1, 10, 0, 1), 2) == [
        ms(2024, 5, 1, 10, 0, 10),
        ms(2024, 5, 1, 10, 0, 20),
    ]


def test_macros_expand_to_five_fields() -> None:
    hourly = parse_schedule("@hourly", "UTC")
    assert isinstance(hourly, Cron)
    assert hourly.expression == "0 * * * *"
    assert hourly.next_after(ms(2024, 5, 1, 10, 0)) == ms(2024, 5, 1, 11, 0)
    assert parse_schedule("@daily", "UTC").next_after(ms(2024, 5, 1, 10)) == ms(2024, 5, 2)


def test_a_tick_between_seconds_is_handled_exactly() -> None:
    cron = parse_schedule("* * * * * *", "UTC")
    half = ms(2024, 5, 1, 10, 0, 0) + 500
    assert cron.next_after(half) == ms(2024, 5, 1, 10, 0, 1)
    assert cron.latest_at_or_before(half) == ms(2024, 5, 1, 10, 0, 0)
    assert cron.latest_at_or_before(ms(2024, 5, 1, 10, 0, 0)) == ms(2024, 5, 1, 10, 0, 0)


def test_ticks_follow_the_time_zone_across_the_year() -> None:
    nine = parse_schedule("0 9 * * *", "Europe/Paris")
    assert nine.next_after(ms(2024, 1, 10)) == ms(2024, 1, 10, 8)  # CET, UTC+1
    assert nine.next_after(ms(2024, 7, 10)) == ms(2024, 7, 10, 7)  # CEST, UTC+2


def test_spring_forward_fires_a_skipped_time_once_just_after_the_gap() -> None:
    # 2024-03-31 in Paris: 02:00 CET jumps to 03:00 CEST (01:00 UTC)
    cron = parse_schedule("30 2 * * *", "Europe/Paris")
    assert following(cron, ms(2024, 3, 30, 12), 3) == [
        ms(2024, 3, 31, 1, 0),  # 03:00 CEST, the first valid time after 02:30
        ms(2024, 4, 1, 0, 30),  # 02:30 CEST
        ms(2024, 4, 2, 0, 30),
    ]


def test_fall_back_fires_a_fixed_time_once() -> None:
    # 2024-10-27 in Paris: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice
    cron = parse_schedule("30 2 * * *", "Europe/Paris")
    assert following(cron, ms(2024, 10, 26, 12), 2) == [
        ms(2024, 10, 27, 0, 30),  # 02:30 CEST, the first pass only
        ms(2024, 10, 28, 1, 30),  # 02:30 CET
    ]
    # from inside the repeated hour, looking back, the tick is the first pass
    assert cron.latest_at_or_before(ms(2024, 10, 27, 1, 40)) == ms(2024, 10, 27, 0, 30)


def test_fall_back_fires_a_wildcard_hour_on_both_passes() -> None:
    hourly = parse_schedule("0 * * * *", "Europe/Paris")
    assert following(hourly, ms(2024, 10, 26, 22, 30), 4) == [
        ms(2024, 10, 26, 23),  # 01:00 CEST
        ms(2024, 10, 27, 0),  # 02:00 CEST
        ms(2024, 10, 27, 1),  # 02:00 CET, an hour later
        ms(2024, 10, 27, 2),  # 03:00 CET
    ]


@pytest.mark.parametrize(
    "schedule",
    [
        "0 0 * * * 30",  # seconds first: 30 is not a day of the week
        "0 0 30 2 *",  # February 30th never comes
    ],
)
def test_a_schedule_that_cannot_run_raises_value_error(schedule: str) -> None:
    with pytest.raises(ValueError, match=r"not a cron expression|never fires"):
        parse_schedule(schedule, "UTC")


# -- missed ticks --------------------------------------------------------------------------

EVERY_MIN = Every(MIN)
NOW = ms(2024, 5, 1, 12, 0, 30)


@pytest.mark.parametrize("policy", ["skip", "once", "all"])
def test_nothing_is_missed_before_the_first_tick(policy: Any) -> None:
    assert list(missed_ticks(EVERY_MIN, None, NOW, policy, HOUR)) == []


def test_skip_fires_no_missed_tick() -> None:
    assert list(missed_ticks(EVERY_MIN, NOW - 10 * MIN, NOW, "skip", HOUR)) == []


def test_once_fires_the_latest_missed_tick() -> None:
    last = ms(2024, 5, 1, 11, 50)
    assert list(missed_ticks(EVERY_MIN, last, NOW, "once", HOUR)) == [ms(2024, 5, 1, 12, 0)]


def test_all_fires_every_missed_tick_oldest_first() -> None:
    last = ms(2024, 5, 1, 11, 57)
    assert list(missed_ticks(EVERY_MIN, last, NOW, "all", HOUR)) == [
        ms(2024, 5, 1, 11, 58),
        ms(2024, 5, 1, 11, 59),
        ms(2024, 5, 1, 12, 0),
    ]


def test_the_starting_deadline_bounds_all_and_once() -> None:
    last = ms(2024, 5, 1, 9)
    assert list(missed_ticks(EVERY_MIN, last, NOW, "all", 2 * MIN)) == [
        ms(2024, 5, 1, 11, 59),
        ms(2024, 5, 1, 12, 0),
    ]
    hourly = Every(HOUR)
    assert list(missed_ticks(hourly, last, NOW, "once", HOUR)) == [ms(2024, 5, 1, 12)]
    assert list(missed_ticks(hourly, last, NOW, "once", 10 * S)) == []  # 12:00 is 30 s late


def test_the_last_fired_tick_is_not_missed_again() -> None:
    last = ms(2024, 5, 1, 12, 0)
    for policy in ("once", "all"):
        assert list(missed_ticks(EVERY_MIN, last, NOW, policy, HOUR)) == []
        assert list(missed_ticks(EVERY_MIN, NOW + MIN, NOW, policy, HOUR)) == []


def test_a_tick_exactly_now_is_missed() -> None:
    now = ms(2024, 5, 1, 12, 1)
    assert list(missed_ticks(EVERY_MIN, now - 2 * MIN, now, "all", HOUR)) == [now - MIN, now]


def test_missed_ticks_of_a_cron_schedule_in_a_time_zone() -> None:
    nine = parse_schedule("0 9 * * 1-5", "America/New_York")  # weekdays 09:00 EDT = 13:00 UTC
    friday = ms(2024, 5, 3, 13)
    monday_noon = ms(2024, 5, 6, 16)
    assert list(missed_ticks(nine, friday - 1, monday_noon, "all", 7 * 24 * HOUR)) == [
        friday,
        ms(2024, 5, 6, 13),
    ]


# -- ids, jitter, events -------------------------------------------------------------------


def test_tick_ids_are_source_and_unix_milliseconds() -> None:
    assert tick_id("nightly", 1714564800000) == "nightly:1714564800000"
    assert rfc3339(1714564800000) == "2024-05-01T12:00:00Z"
    assert rfc3339(1714564800500) == "2024-05-01T12:00:00.500000Z"


def test_jitter_is_below_the_bound_and_the_same_in_every_process() -> None:
    delays = [jitter_delay(tick_id("s", t * S), 5.0) for t in range(200)]
    assert all(0 <= d < 5.0 for d in delays)
    assert len(set(delays)) == 200
    assert max(delays) > 4 and min(delays) < 1  # spread over the range
    assert jitter_delay("s:1000", 5.0) == jitter_delay("s:1000", 5.0)
    assert jitter_delay("s:1000", 0.0) == 0.0


@pytest.mark.parametrize(
    ("payload", "content_type", "data"),
    [
        ({"job": "report"}, "application/json", b'{"job":"report"}'),
        ("hello", "application/json", b'"hello"'),
        ("hello", "text/plain; charset=utf-8", b"hello"),
        ([1, 2], "application/vnd.x+json", b"[1,2]"),
        ({"a": 1}, "text/plain", b'{"a":1}'),
        (None, "application/json", b""),
    ],
)
def test_payload_bytes(payload: Any, content_type: str, data: bytes) -> None:
    assert payload_bytes(payload, content_type) == data


def test_a_tick_becomes_an_event() -> None:
    event = tick_event(
        "nightly", spec(schedule="*/5 * * * *", payload={"job": "report"}), 1714564800000
    )
    assert event == Event(
        {
            "specversion": "1.0",
            "id": "nightly:1714564800000",
            "source": "/eventhub/cron/nightly",
            "type": DEFAULT_TYPE,
            "subject": "*/5 * * * *",
            "time": "2024-05-01T12:00:00Z",
            "datacontenttype": "application/json",
        },
        b'{"job":"report"}',
    )


def test_event_type_content_type_and_no_payload() -> None:
    typed = tick_event("s", spec(eventType="com.example.tick", payload=None), 0)
    assert typed.type == "com.example.tick"
    assert "datacontenttype" not in typed.attributes
    assert typed.data == b""
    text = tick_event("s", spec(payload="ping", contentType="text/plain"), 0)
    assert (text.datacontenttype, text.data) == ("text/plain", b"ping")


def test_the_same_tick_is_the_same_event_in_every_process() -> None:
    one = spec(payload={"x": 1}, jitter="5s")
    assert tick_event("s", one, 7000) == tick_event("s", one, 7000)


def test_last_tick_reads_the_saved_state() -> None:
    assert last_tick(None) is None
    assert last_tick({}) is None
    assert last_tick({"lastTickMs": "x"}) is None
    assert last_tick({"lastTickMs": 42, "lastTick": "1970-01-01T00:00:00.042000Z"}) == 42


# -- the loop, with a fake clock and a fake context ---------------------------------------


class FakeContext:
    """Records deliveries and saves; cancels the connector after ``stop_after`` deliveries."""

    def __init__(self, state: dict[str, Any] | None, stop_after: int) -> None:
        self.state = state
        self.delivered: list[list[Event]] = []
        self.saved: list[dict[str, Any]] = []
        self.stop_after = stop_after
        self.ahead: dict[str, Any] | None = None

    async def load_state(self) -> dict[str, Any] | None:
        return self.state

    async def save_state(self, state: dict[str, Any]) -> None:
        self.state = state
        self.saved.append(state)

    async def deliver(self, events: Sequence[Event]) -> None:
        self.delivered.append(list(events))
        if self.ahead is not None:
            self.state = self.ahead
        if len(self.delivered) > self.stop_after:
            raise asyncio.CancelledError


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 3))
        self.now += seconds


def connector_for(**fields: Any) -> Any:
    doc = {
        "apiVersion": API_VERSION,
        "kind": "Source",
        "metadata": {"name": "tick"},
        "spec": {"type": "cron", **fields},
    }
    return parse_resource(doc)


async def run_until_cancelled(ctx: FakeContext, clock: FakeClock, **fields: Any) -> None:
    connector = CronConnector(connector_for(**fields), clock=clock, sleep=clock.sleep)
    with pytest.raises(asyncio.CancelledError):
        await connector.run(ctx)


async def test_the_loop_catches_up_then_sleeps_once_per_tick() -> None:
    ctx = FakeContext({"lastTickMs": 96_000}, stop_after=2)
    clock = FakeClock(100.25)  # ticks 97..100 were missed
    await run_until_cancelled(ctx, clock, schedule="@every 1s", missed="all")
    ids = [[e.id for e in batch] for batch in ctx.delivered]
    assert ids == [
        ["tick:97000", "tick:98000", "tick:99000", "tick:100000"],
        ["tick:101000"],
        ["tick:102000"],
    ]
    assert clock.sleeps == [0.75, 1.0]  # one sleep per tick, from the wall clock
    assert [s["lastTickMs"] for s in ctx.saved] == [100_000, 101_000]  # saved after deliver


async def test_the_loop_skips_missed_ticks_and_first_runs_wait_for_the_next_tick() -> None:
    for state in (None, {"lastTickMs": 96_000}):
        ctx = FakeContext(state, stop_after=1)
        clock = FakeClock(100.25)
        await run_until_cancelled(ctx, clock, schedule="@every 1s", missed="skip")
        assert [[e.id for e in batch] for batch in ctx.delivered] == [
            ["tick:101000"],
            ["tick:102000"],
        ]


async def test_the_loop_delays_by_the_jitter_but_keeps_the_tick_time() -> None:
    ctx = FakeContext(None, stop_after=0)
    clock = FakeClock(100.0)
    await run_until_cancelled(ctx, clock, schedule="@every 10s", jitter="3s")
    (event,) = ctx.delivered[0]
    expected = jitter_delay("tick:110000", 3.0)
    assert clock.sleeps == [round(10 + expected, 3)]
    assert event.attributes["time"] == rfc3339(110_000)


async def test_the_loop_waits_for_a_tick_after_the_saved_one() -> None:
    ctx = FakeContext({"lastTickMs": 500_000}, stop_after=0)  # saved by a host ahead of ours
    clock = FakeClock(100.5)
    await run_until_cancelled(ctx, clock, schedule="@every 1s", missed="all")
    assert ctx.delivered == [[tick_event("tick", spec(), 501_000)]]


async def test_the_loop_never_moves_the_saved_tick_back() -> None:
    ctx = FakeContext(None, stop_after=1)
    ctx.ahead = {"lastTickMs": 900_000}  # another process saves a later tick meanwhile
    clock = FakeClock(100.5)
    await run_until_cancelled(ctx, clock, schedule="@every 1s")
    assert ctx.saved == []
    assert ctx.state == {"lastTickMs": 900_000}


async def test_a_woken_early_sleep_sleeps_the_rest() -> None:
    ctx = FakeContext(None, stop_after=0)
    clock = FakeClock(100.5)

    async def short_sleep(seconds: float) -> None:
        clock.sleeps.append(round(seconds, 3))
        clock.now += seconds * 0.9  # the wall clock says it is not time yet

    connector = CronConnector(connector_for(schedule="@every 1s"), clock=clock, sleep=short_sleep)
    with pytest.raises(asyncio.CancelledError):
        await connector.run(ctx)
    assert clock.sleeps[:2] == [0.5, 0.05]
    assert ctx.delivered[0][0].id == "tick:101000"
