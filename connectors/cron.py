"""Cron source: one event per tick of a schedule, exactly once across every hub process.

There is no transport: a *tick* (a time the schedule fires) plays the part of a message.

=================  ===============================================================================
transport notion   cron
=================  ===============================================================================
ack                after ``ctx.deliver`` returned, the tick is saved as the source's last tick
                   (``ctx.save_state``; never moved backwards)
nack, redelivery   a tick that passed without being saved (hub down, killed between tick and save,
                   source throttled past the next tick) is *missed*; ``missed`` decides:
                   ``skip`` never fires it, ``once`` fires the latest missed tick, ``all`` fires
                   each missed tick, oldest first. ``startingDeadline`` bounds both: a tick older
                   than that is never fired late
reject             never: a tick always becomes an event (the spec is checked when declared)
duplicates         every ingest process fires every tick; the event id is
                   ``<source>:<tick unix ms>`` (arq's cron job ids), so the invocation id, hence
                   ``Nats-Msg-Id``, is the same in every process and JetStream keeps one
=================  ===============================================================================

Schedules (``spec.schedule``): 5 fields (minute hour day-of-month month day-of-week), 6 fields
with *seconds first* (Quartz, robfig/cron ``WithSeconds``), the ``@hourly``... macros, or
``@every <duration>``, whose ticks are the multiples of the interval since the Unix epoch, so
that every process computes the same ticks (``timezone`` does not apply to it). Cron ticks are
computed in ``timezone`` (croniter + zoneinfo): on a spring-forward day a time in the skipped
hour fires at the first valid time after it (02:30 -> 03:00); in the repeated hour of a
fall-back day an expression with fixed seconds, minutes and hours (``30 2 * * *``) fires once,
at the first occurrence, while one with ``*`` in these fields (``0 * * * *``) fires on both,
which are really an hour apart (Vixie cron's rule).

``jitter`` delays each on-time fire by a pseudo-random amount below it, derived from the tick id
so that every process waits the same (N random draws would shrink it to their minimum). The
event keeps the scheduled time. Late fires (missed ticks) are not delayed further.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo

import orjson
import structlog
from croniter import croniter

from connectors.common import Message, wrap
from eventhub.events import Event, canonical
from eventhub.resources import Resource
from eventhub.sourcespecs import CronSpec, cron_expression

log = structlog.get_logger(__name__)

DEFAULT_TYPE = "eventhub.cron.tick"
_BATCH = 100  # late ticks delivered (and saved) per ctx.deliver call
_JSON_MEDIA = re.compile(r"^(application|text)/([a-z0-9\-.]+\+)?json$")
Policy = Literal["skip", "once", "all"]


class Schedule(Protocol):
    """Ticks as Unix milliseconds."""

    def next_after(self, ms: int) -> int: ...

    def latest_at_or_before(self, ms: int) -> int: ...


@dataclass(frozen=True)
class Every:
    """``@every <interval>``: the multiples of the interval since the Unix epoch."""

    interval_ms: int

    def next_after(self, ms: int) -> int:
        return (ms // self.interval_ms + 1) * self.interval_ms

    def latest_at_or_before(self, ms: int) -> int:
        return ms // self.interval_ms * self.interval_ms


@dataclass(frozen=True)
class Cron:
    """A cron expression in a time zone (6 fields: seconds first)."""

    expression: str
    zone: ZoneInfo

    @property
    def _time_fields(self) -> list[str]:
        fields = self.expression.split()
        return fields[:3] if len(fields) == 6 else fields[:2]

    def next_after(self, ms: int) -> int:
        tick = self._step(ms, forward=True)
        while self._repeated(tick):
            tick = self._step(tick, forward=True)
        return tick

    def latest_at_or_before(self, ms: int) -> int:
        tick = self._step(ms + 1, forward=False)
        while self._repeated(tick):
            tick = self._step(tick, forward=False)
        return tick

    def _step(self, ms: int, *, forward: bool) -> int:
        """The first tick strictly after (or before) ``ms``."""
        start = datetime.fromtimestamp(ms / 1000, self.zone)
        ticks = croniter(
            self.expression, start, second_at_beginning=len(self.expression.split()) == 6
        )
        while True:
            tick = _unix_ms(ticks.get_next(datetime) if forward else ticks.get_prev(datetime))
            if (tick > ms) if forward else (tick < ms):  # a guard: croniter rounds to seconds
                return tick

    def _repeated(self, ms: int) -> bool:
        """A fixed-time tick in the second pass of a wall time a DST fall-back repeats."""
        if any(f.startswith("*") for f in self._time_fields):
            return False
        local = datetime.fromtimestamp(ms / 1000, self.zone)
        return local.replace(fold=0).timestamp() != local.timestamp()


def parse_schedule(text: str, timezone: str) -> Schedule:
    """The schedule of ``spec.schedule``; ValueError for an expression croniter cannot run."""
    expression = cron_expression(text)
    if isinstance(expression, float):
        return Every(max(1, round(expression * 1000)))
    schedule = Cron(expression, ZoneInfo(timezone))
    try:
        schedule.next_after(0)
    except (ValueError, TypeError) as exc:  # every croniter error is one of these
        raise ValueError(f"schedule '{text}' cannot be computed: {exc}") from exc
    return schedule


def missed_ticks(
    schedule: Schedule, last: int | None, now: int, policy: Policy, deadline_ms: int
) -> Iterator[int]:
    """The ticks in ``(last, now]`` to fire late, oldest first: none for ``skip`` or when no
    tick was ever fired (``last`` None), the latest for ``once``, each for ``all``; never one
    older than ``now - deadline_ms``."""
    if last is None or policy == "skip":
        return
    oldest = max(last + 1, now - deadline_ms)
    if policy == "once":
        tick = schedule.latest_at_or_before(now)
        if tick >= oldest:
            yield tick
        return
    tick = schedule.next_after(oldest - 1)
    while tick <= now:
        yield tick
        tick = schedule.next_after(tick)


def tick_id(source: str, tick: int) -> str:
    return f"{source}:{tick}"


def jitter_delay(event_id: str, jitter: float) -> float:
    """Seconds in ``[0, jitter)``, the same in every process for one tick."""
    if jitter <= 0:
        return 0.0
    digest = hashlib.sha256(event_id.encode()).digest()
    return jitter * int.from_bytes(digest[:8], "big") / 2**64


def payload_bytes(payload: Any, content_type: str) -> bytes:
    """JSON for a JSON content type; a string payload as UTF-8 under any other one."""
    if payload is None:
        return b""
    media = content_type.split(";", 1)[0].strip().lower()
    if isinstance(payload, str) and not _JSON_MEDIA.match(media):
        return payload.encode("utf-8")
    return orjson.dumps(payload)


def tick_event(source: str, spec: CronSpec, tick: int) -> Event:
    data = payload_bytes(spec.payload, spec.content_type)
    message = Message(
        payload=data,
        id=tick_id(source, tick),
        source=f"/eventhub/cron/{source}",
        content_type=spec.content_type if data else None,
        subject=spec.schedule,
        time=rfc3339(tick),
    )
    return wrap(message, spec.event_type or DEFAULT_TYPE)


def rfc3339(tick: int) -> str:
    return canonical(datetime.fromtimestamp(tick / 1000, UTC))


def last_tick(state: dict[str, Any] | None) -> int | None:
    value = (state or {}).get("lastTickMs")
    return value if isinstance(value, int) else None


class Context(Protocol):
    """The part of :class:`eventhub.sources.SourceContext` the cron source uses."""

    async def deliver(self, events: Sequence[Event]) -> None: ...

    async def load_state(self) -> dict[str, Any] | None: ...

    async def save_state(self, state: dict[str, Any]) -> None: ...


class CronConnector:
    def __init__(
        self,
        resource: Resource,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._name = resource.name
        self._spec: CronSpec = resource.model
        self._clock = clock
        self._sleep = sleep

    async def run(self, ctx: Context) -> None:
        """Fire ticks until cancelled. Each loop: fire the missed ticks the policy keeps, then
        sleep once, by the wall clock, until the next tick (plus its jitter) and fire it."""
        spec = self._spec
        schedule = parse_schedule(spec.schedule, spec.timezone)
        deadline_ms = round(spec.starting_deadline * 1000)
        last = last_tick(await ctx.load_state())
        while True:
            now = self._now()  # one reading for both: a tick between two would be lost
            late = missed_ticks(schedule, last, now, spec.missed, deadline_ms)
            while batch := list(itertools.islice(late, _BATCH)):  # lazily: `all` may be many
                log.info("cron_late", source=self._name, ticks=len(batch), policy=spec.missed)
                last = await self._fire(ctx, batch)
            tick = schedule.next_after(now if last is None else max(now, last))
            delay = jitter_delay(tick_id(self._name, tick), spec.jitter)
            await self._sleep_until(tick / 1000 + delay)
            last = await self._fire(ctx, [tick])

    async def _fire(self, ctx: Context, ticks: Sequence[int]) -> int:
        await ctx.deliver([tick_event(self._name, self._spec, t) for t in ticks])
        latest = ticks[-1]
        # Every process saves every tick: never move the shared state back behind a faster one.
        stored = last_tick(await ctx.load_state())
        if stored is None or stored < latest:
            await ctx.save_state({"lastTickMs": latest, "lastTick": rfc3339(latest)})
        return latest

    async def _sleep_until(self, due: float) -> None:
        """One sleep, computed from the wall clock; again only if woken before ``due`` (the
        loop's monotonic clock and the wall clock drift apart, or the clock was set back)."""
        while (remaining := due - self._clock()) > 0:
            await self._sleep(remaining)

    def _now(self) -> int:
        return int(self._clock() * 1000)


def _unix_ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


def connector(resource: Resource) -> CronConnector:
    return CronConnector(resource)
