"""Soak: does the hub's memory stay flat? Half a million events through one hub process.

Run by hand (needs NATS with JetStream, PostgreSQL and Redis); it stops by itself::

    python benchmarks/soak.py [--events N] [--batch B] [--window W] [--python PATH] [--json PATH]

``python -m eventhub run`` (every role in one process) in a fresh namespace, with one Function
(``maxConcurrency`` 64) and one Binding from source ``api``, calls a no-op HTTP function served
by this process (200 at once). N events (500,000) are POSTed to ``/v1/events`` as CloudEvents
batches of B (10), a few requests in flight, and never more than W (2,000) events accepted but
not yet called: the load is steady at whatever rate the hub sustains, and nothing piles up in
JetStream or in the hub. The hub's RSS (``VmRSS`` in ``/proc/<pid>/status``) is sampled every
``--every`` seconds (2) with the number of calls the function has had by then.

Printed: the RSS at each 50,000 events, and its growth after the warm-up (the first
``--warm-up`` events, 100,000), in percent: from the RSS at the end of the warm-up to the
median of the samples of the last 10 % of the run (the median, so that one sample taken in the
middle of a burst of allocations does not decide), and the slope of a least-squares line
through every sample after the warm-up, in MiB per 100,000 events. Aim: growth under 10 %.

Invocation state in Redis expires after ``EVENTHUB_STATE_TTL`` = 300 s here (24 h by
default), so that Redis does not hold half a million keys: that is Redis's memory, not the
hub's. Every event's calls are counted, so missing and duplicate calls are reported too.
``--python`` runs the hub with another interpreter; the hub runs the source tree this script is
in (``PYTHONPATH``). Everything created is removed at the end, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import aiohttp  # noqa: E402
import pipeline  # noqa: E402

FUNCTION = "soak-fn"
BINDING = "soak-api"
BATCH = "application/cloudevents-batch+json"
STALL = 60.0  # give up after this long without a call


# ---------------------------------------------------------------------------------------------
# The no-op function


class Calls:
    """How many times each event (``soak-<n>``) was called, and the total."""

    def __init__(self, n: int) -> None:
        self.per_event = bytearray(n)
        self.total = 0
        self.changed = asyncio.Event()

    def record(self, event_id: str) -> None:
        _, _, number = event_id.rpartition("-")
        if number.isdigit() and int(number) < len(self.per_event):
            index = int(number)
            self.per_event[index] = min(255, self.per_event[index] + 1)
        self.total += 1
        self.changed.set()

    @property
    def distinct(self) -> int:
        return len(self.per_event) - self.per_event.count(0)

    @property
    def duplicates(self) -> int:
        return self.total - self.distinct


# ---------------------------------------------------------------------------------------------
# Load and samples


@dataclass
class Sample:
    at: float  # seconds since the first POST
    calls: int
    rss_mib: float


@dataclass
class Soak:
    args: argparse.Namespace
    calls: Calls
    base: str
    token: str
    pid: int
    accepted: int = 0
    refused: int = 0
    samples: list[Sample] = field(default_factory=list)

    async def load(self) -> None:
        """POST every event, a few requests in flight, at most ``window`` ahead of the calls."""
        args = self.args
        todo = iter(range(0, args.events, args.batch))
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": BATCH}

        async def worker(http: aiohttp.ClientSession) -> None:
            for first in todo:
                while self.accepted - self.calls.total > args.window:
                    self.calls.changed.clear()
                    await self.calls.changed.wait()
                ids = range(first, min(first + args.batch, args.events))
                try:
                    async with http.post(
                        f"{self.base}/v1/events", data=body(ids), headers=headers
                    ) as response:
                        await response.read()
                        ok = response.status == 202
                except (aiohttp.ClientError, OSError, TimeoutError):
                    ok = False
                if ok:
                    self.accepted += len(ids)
                else:
                    self.refused += len(ids)

        async with pipeline.session(args.concurrency) as http:
            await asyncio.gather(*(worker(http) for _ in range(args.concurrency)))

    async def sample(self, started: float) -> None:
        """Until cancelled: the hub's RSS with the calls so far, every ``--every`` s."""
        while True:
            at = time.monotonic() - started
            self.samples.append(Sample(at, self.calls.total, pipeline.rss_mib(self.pid)))
            last = self.samples[-1]
            if len(self.samples) % 15 == 1:
                rate = last.calls / at if at else 0.0
                rss = last.rss_mib
                print(
                    f"  {at:6.0f} s  {last.calls:>9,} calls  {rate:6,.0f}/s  {rss:6.1f} MiB",
                    flush=True,
                )
            await asyncio.sleep(self.args.every)

    async def run(self) -> float:
        """Returns the seconds from the first POST to the last call."""
        started = time.monotonic()
        sampler = asyncio.create_task(self.sample(started))
        try:
            await self.load()
            last, since = self.calls.total, time.monotonic()
            while self.calls.total < self.accepted and time.monotonic() - since < STALL:
                await asyncio.sleep(0.2)
                if self.calls.total != last:
                    last, since = self.calls.total, time.monotonic()
            elapsed = time.monotonic() - started
            self.samples.append(Sample(elapsed, self.calls.total, pipeline.rss_mib(self.pid)))
            return elapsed
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)


def body(ids: range) -> bytes:
    return json.dumps(
        [
            {
                "specversion": "1.0",
                "id": f"soak-{n}",
                "source": "/bench/soak",
                "type": "com.example.soak",
                "datacontenttype": "application/json",
                "data": {"n": n},
            }
            for n in ids
        ]
    ).encode()


# ---------------------------------------------------------------------------------------------
# Figures


@dataclass
class Result:
    events: int
    accepted: int
    refused: int
    calls: int
    distinct: int
    duplicates: int
    seconds: float
    curve: list[tuple[int, float]]  # (events called, RSS MiB) at each milestone
    rss_warm: float | None
    rss_end: float | None
    growth_pct: float | None
    slope_mib_per_100k: float | None


def first_at(samples: list[Sample], calls: int) -> Sample | None:
    return next((s for s in samples if s.calls >= calls), None)


def figures(soak: Soak, seconds: float) -> Result:
    args, samples = soak.args, soak.samples
    curve = []
    for milestone in range(0, args.events + 1, args.every_events):
        found = first_at(samples, max(1, milestone))
        if found is not None:
            curve.append((milestone, found.rss_mib))
    warm = first_at(samples, args.warm_up)
    after = [s for s in samples if s.calls >= args.warm_up]
    tail = [s for s in after if s.calls >= args.warm_up + 0.9 * (soak.calls.total - args.warm_up)]
    end = statistics.median(s.rss_mib for s in tail) if tail else None
    slope = None
    if len(after) >= 3 and after[-1].calls > after[0].calls:
        slope = (
            1e5
            * statistics.linear_regression(
                [s.calls for s in after], [s.rss_mib for s in after]
            ).slope
        )
    growth = 100 * (end - warm.rss_mib) / warm.rss_mib if warm and end is not None else None
    return Result(
        events=args.events,
        accepted=soak.accepted,
        refused=soak.refused,
        calls=soak.calls.total,
        distinct=soak.calls.distinct,
        duplicates=soak.calls.duplicates,
        seconds=seconds,
        curve=curve,
        rss_warm=warm.rss_mib if warm else None,
        rss_end=end,
        growth_pct=growth,
        slope_mib_per_100k=slope,
    )


def report(args: argparse.Namespace, r: Result) -> None:
    f = pipeline.fmt
    print("\nevents called   RSS MiB")
    for calls, rss in r.curve:
        print(f"{calls:>13,}   {rss:7.1f}")
    print(
        f"\n{r.calls:,} calls of {r.accepted:,} accepted events ({r.refused:,} refused,"
        f" {r.accepted - r.distinct:,} never called, {r.duplicates:,} duplicate calls)"
        f" in {r.seconds:.0f} s: {r.calls / r.seconds:,.0f} events/s"
    )
    print(f"RSS after the warm-up ({args.warm_up:,} events): {f(r.rss_warm, 1)} MiB")
    print(f"RSS at the end (median of the last 10 % of samples): {f(r.rss_end, 1)} MiB")
    print(f"growth after the warm-up: {f(r.growth_pct, 1)} %  (aim: under 10 %)")
    print(f"slope after the warm-up: {f(r.slope_mib_per_100k, 2)} MiB per 100,000 events")
    met = r.growth_pct is not None and r.growth_pct < 10 and r.distinct == r.accepted
    print(f"  memory stays flat: {'met' if met else 'NOT met'}")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n({os.cpu_count()} CPUs, load {load})")
    if args.json:
        doc = {"settings": vars(args), "result": r.__dict__}
        Path(args.json).write_text(json.dumps(doc, indent=2), encoding="utf-8")
        print(f"results written to {args.json}")


# ---------------------------------------------------------------------------------------------
# The run


async def benchmark(args: argparse.Namespace) -> Result:
    pipeline.cancel_on_signals()
    port = pipeline.free_port()
    run = pipeline.Run(
        args, f"bench{uuid.uuid4().hex[:10]}", uuid.uuid4().hex, f"http://127.0.0.1:{port}/fn"
    )
    calls = Calls(args.events)
    function = await pipeline.start_function(calls.record, port)
    print(f"namespace {run.namespace}, {args.events:,} events in batches of {args.batch}")
    try:
        hub_port = pipeline.free_port()
        env = pipeline.hub_env(run, hub_port)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env.setdefault("EVENTHUB_LOG_LEVEL", "warning")
        env["EVENTHUB_STATE_TTL"] = "300"
        child = run.child("soak-hub", [args.python, "-m", "eventhub", "run"], env)
        base = f"http://127.0.0.1:{hub_port}"
        await child.ready(f"{base}/readyz")
        spec: dict[str, Any] = {"url": run.function_url, "maxConcurrency": args.max_concurrency}
        await pipeline.declare(base, run.token, "functions", FUNCTION, spec)
        await pipeline.declare(
            base, run.token, "bindings", BINDING, {"source": "api", "function": FUNCTION}
        )
        await routed(base, run.token, calls)
        soak = Soak(args, calls, base, run.token, child.process.pid)
        print(f"hub pid {soak.pid}: RSS {pipeline.rss_mib(soak.pid):.1f} MiB before the load")
        seconds = await soak.run()
        return figures(soak, seconds)
    finally:
        await function.cleanup()
        await pipeline.clean_up(run)


async def routed(base: str, token: str, calls: Calls) -> None:
    """The Binding reaches the hub's router by NOTIFY: wait until an event is routed (a probe
    whose id is outside the counted range)."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": BATCH}
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            probe = json.dumps(
                [
                    {
                        "specversion": "1.0",
                        "id": f"probe-{uuid.uuid4()}",
                        "source": "/bench/soak",
                        "type": "com.example.soak",
                    }
                ]
            )
            async with http.post(f"{base}/v1/events", data=probe, headers=headers) as response:
                if b'"binding"' in await response.read():
                    break
            await asyncio.sleep(0.2)
        else:
            raise RuntimeError("the Binding never reached the router")
    while calls.total < 1:
        calls.changed.clear()
        await asyncio.wait_for(calls.changed.wait(), 30)
    calls.total = 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=500_000)
    p.add_argument("--batch", type=int, default=10, help="events per POST")
    p.add_argument("--concurrency", type=int, default=8, help="POSTs in flight")
    p.add_argument("--window", type=int, default=2000, help="events accepted, not yet called")
    p.add_argument("--max-concurrency", type=int, default=64, help="the Function's")
    p.add_argument("--every", type=float, default=2.0, help="seconds between RSS samples")
    p.add_argument("--every-events", type=int, default=50_000, help="events between printed RSS")
    p.add_argument("--warm-up", type=int, default=100_000, help="events before growth counts")
    p.add_argument("--python", default=sys.executable, help="the interpreter to run the hub with")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    p.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = p.parse_args()
    args.profile = None  # pipeline.Run looks at it
    if args.warm_up >= args.events:
        p.error("--warm-up must be below --events")
    return args


def main() -> None:
    args = parse_args()
    try:
        result = asyncio.run(benchmark(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    report(args, result)


if __name__ == "__main__":
    main()
