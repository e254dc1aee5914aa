"""Retry benchmark: peak shaving while a function fails, measured in one run.

Run by hand (needs NATS with JetStream, PostgreSQL and Redis)::

    python benchmarks/retries.py [--events 600] [--service-time 0.05] [--rounds 3] [--json PATH]

One ``python -m eventhub run`` child process in a fresh namespace; the functions are served by
this process, each call taking ``--service-time`` seconds (50 ms: a function that does some
work, so that ``maxConcurrency`` is what limits the rate). Two scenarios, each measured side by
side with its control in alternating rounds (fresh functions each round); the median round's
ratio is reported:

failing   ``maxConcurrency: 20``, retry ``initialDelay: 200ms``. N events POSTed at once (64 in
          flight) to a function that answers 503 to the first two calls of each event, then 200;
          the control is the same function answering 200 at once. Rate = N / (first POST to the
          last event's 200). Ideal ratio failing/control: 1/3 (three calls per event); the bar
          is 0.25.
poison    ``maxConcurrency: 5``, retry ``maxAttempts: 8``, ``initialDelay: 2s``. Five poison
          events (always 503) are posted, and once their first attempts were made, 100 healthy
          events are posted; time = first healthy POST to the last healthy event's first call.
          The control is the same 100 healthy events to a function without poison. The bar:
          with poison within 2x the time without.

Throughput counts only first successful calls (each id checked). Everything created (the
stream, the PostgreSQL schema, the Redis keys ``<namespace>:*``) is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from pipeline import Child, declare, free_port, hub_env_for, remove_namespace

EVENT_SOURCE = "/bench"


@dataclass
class Function:
    """One function's behaviour and what it saw: the calls per event id, the first 200's time."""

    failures_per_event: int = 0  # answer 503 to this many calls of each event first
    poison_prefix: str | None = None  # events whose id starts so always get 503
    calls: Counter[str] = field(default_factory=Counter)
    first_call: dict[str, float] = field(default_factory=dict)
    succeeded: dict[str, float] = field(default_factory=dict)
    awaited: set[str] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def expect(self, ids: list[str]) -> None:
        self.awaited = set(ids)
        self.done.clear()

    def answer(self, event_id: str, now: float) -> int:
        self.calls[event_id] += 1
        self.first_call.setdefault(event_id, now)
        poisoned = self.poison_prefix is not None and event_id.startswith(self.poison_prefix)
        if poisoned or self.calls[event_id] <= self.failures_per_event:
            return 503
        self.succeeded.setdefault(event_id, now)
        return 200

    def check(self, seen: dict[str, float]) -> None:
        if self.awaited and self.awaited.issubset(seen):
            self.done.set()


class Functions:
    """Every benchmark function, served at /{name} by this process."""

    def __init__(self, service_time: float) -> None:
        self.service_time = service_time
        self.by_name: dict[str, Function] = {}
        self.count_first_calls: set[str] = set()  # names whose first calls are awaited

    async def handle(self, request: web.Request) -> web.Response:
        fn = self.by_name[request.match_info["name"]]
        await request.read()
        await asyncio.sleep(self.service_time)
        status = fn.answer(request.headers.get("ce-id", ""), time.monotonic())
        fn.check(
            fn.first_call if request.match_info["name"] in self.count_first_calls else fn.succeeded
        )
        return web.Response(status=status)

    async def serve(self, port: int) -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/{name}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        return runner


@dataclass
class Hub:
    base: str
    token: str
    function_base: str

    async def function(self, name: str, spec: dict[str, Any]) -> None:
        await declare(
            self.base,
            self.token,
            "functions",
            name,
            {"url": f"{self.function_base}/{name}", **spec},
        )
        await declare(
            self.base,
            self.token,
            "bindings",
            name,
            {"source": "api", "function": name, "filter": [{"exact": {"subject": name}}]},
        )

    async def post(
        self, http: aiohttp.ClientSession, name: str, ids: list[str], in_flight: int = 64
    ) -> None:
        todo = iter(ids)

        async def worker() -> None:
            for event_id in todo:
                headers = {
                    "ce-specversion": "1.0",
                    "ce-id": event_id,
                    "ce-source": EVENT_SOURCE,
                    "ce-type": "com.example.bench",
                    "ce-subject": name,
                    "content-type": "application/json",
                    "Authorization": f"Bearer {self.token}",
                }
                async with http.post(f"{self.base}/v1/events", data=b"{}", headers=headers) as r:
                    if r.status != 202:
                        raise RuntimeError(f"POST {event_id}: {r.status} {await r.text()}")

        await asyncio.gather(*(worker() for _ in range(min(in_flight, len(ids)))))


async def _settled(fn: Function, wait: float) -> bool:
    """Whether every awaited event arrived within ``wait`` seconds."""
    try:
        await asyncio.wait_for(fn.done.wait(), wait)
    except TimeoutError:
        return False
    return True


async def failing_round(
    hub: Hub, fns: Functions, http: aiohttp.ClientSession, n: int, tag: str
) -> tuple[float, float]:
    """events/s of the control, then of the function failing twice per event."""
    rates = []
    for kind, failures in (("ok", 0), ("fail", 2)):
        name = f"{kind}-{tag}"
        fns.by_name[name] = fn = Function(failures_per_event=failures)
        await hub.function(
            name, {"maxConcurrency": 20, "retry": {"maxAttempts": 5, "initialDelay": "200ms"}}
        )
        await asyncio.sleep(1.0)  # the resources reach every part of the hub
        ids = [f"{name}-{i}" for i in range(n)]
        fn.expect(ids)
        started = time.monotonic()
        await hub.post(http, name, ids)
        if not await _settled(fn, 300):
            raise RuntimeError(f"{name}: not every event succeeded within 300 s")
        rates.append(n / (max(fn.succeeded.values()) - started))
        calls = sum(fn.calls.values())
        print(f"  {name}: {rates[-1]:.0f} events/s, {calls} calls for {n} events")
    return rates[0], rates[1]


async def poison_round(
    args: argparse.Namespace, hub: Hub, fns: Functions, http: aiohttp.ClientSession, tag: str
) -> tuple[float, float]:
    """Seconds for 100 healthy events to reach the function without poison, then with it."""
    times = []
    for kind in ("clean", "poisoned"):
        name = f"{kind}-{tag}"
        fns.by_name[name] = fn = Function(poison_prefix="poison")
        fns.count_first_calls.add(name)
        spec = {"maxConcurrency": 5, "retry": {"maxAttempts": 8, "initialDelay": "2s"}}
        await hub.function(name, spec)
        await asyncio.sleep(1.0)
        if kind == "poisoned":
            poison = [f"poison-{tag}-{i}" for i in range(5)]
            fn.expect(poison)
            await hub.post(http, name, poison)
            if not await _settled(fn, 60):
                raise RuntimeError(f"{name}: the poison events were never called")
        healthy = [f"{name}-{i}" for i in range(100)]
        fn.expect(healthy)
        started = time.monotonic()
        await hub.post(http, name, healthy)
        if await _settled(fn, args.give_up):
            times.append(max(fn.first_call[i] for i in healthy) - started)
            print(f"  {name}: 100 healthy events in {times[-1]:.2f} s")
        else:
            times.append(math.inf)
            arrived = len(fn.awaited & fn.first_call.keys())
            print(f"  {name}: {arrived} of 100 healthy events within {args.give_up:g} s")
    return times[0], times[1]


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    namespace, token = f"bench{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    fns = Functions(args.service_time)
    fport, hport = free_port(), free_port()
    runner = await fns.serve(fport)
    child = Child(
        "eventhub",
        [sys.executable, "-m", "eventhub", "run"],
        hub_env_for(args, namespace, token, hport),
    )
    failing: list[tuple[float, float]] = []
    poison: list[tuple[float, float]] = []
    try:
        base = f"http://127.0.0.1:{hport}"
        await child.ready(f"{base}/readyz")
        hub = Hub(base, token, f"http://127.0.0.1:{fport}")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=128)) as http:
            for r in range(args.rounds):
                print(f"round {r + 1}")
                failing.append(await failing_round(hub, fns, http, args.events, f"r{r}"))
                poison.append(await poison_round(args, hub, fns, http, f"r{r}"))
    finally:
        await child.stop()
        await runner.cleanup()
        await remove_namespace(args, namespace)
    fail_ratios = [f / c for c, f in failing]
    poison_ratios = [p / c for c, p in poison]
    return {
        "settings": {
            "events": args.events,
            "service_time": args.service_time,
            "rounds": args.rounds,
            "cpus": os.cpu_count(),
            "load": os.getloadavg(),
        },
        "failing": {
            "control_events_per_s": statistics.median(c for c, _ in failing),
            "failing_events_per_s": statistics.median(f for _, f in failing),
            "ratio_median": statistics.median(fail_ratios),
            "ratios": fail_ratios,
        },
        "poison": {
            "clean_s": statistics.median(c for c, _ in poison),
            "poisoned_s": statistics.median(p for _, p in poison),
            "ratio_median": statistics.median(poison_ratios),
            "ratios": poison_ratios,
        },
    }


def report(result: dict[str, Any]) -> None:
    f, p = result["failing"], result["poison"]
    print()
    print(f"load {result['settings']['load']}")
    print("| scenario | control | under failure | ratio (median round) | bar |")
    print("|---|---|---|---|---|")
    print(
        f"| failing twice per event, maxConcurrency 20 | {f['control_events_per_s']:.0f} events/s "
        f"| {f['failing_events_per_s']:.0f} events/s | {f['ratio_median']:.2f} | >= 0.25 |"
    )
    print(
        f"| 100 healthy events behind 5 poison, maxConcurrency 5 | {p['clean_s']:.2f} s "
        f"| {p['poisoned_s']:.2f} s | {p['ratio_median']:.2f} | <= 2 |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=600, help="events of the failing scenario")
    p.add_argument("--service-time", type=float, default=0.05, help="seconds each call takes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--give-up", type=float, default=120.0, help="seconds to wait for the healthy events"
    )
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    p.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = p.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        result = asyncio.run(benchmark(args))
        report(result)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as out:
                json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
