"""Scale of resources: does a hub with 10,000 Bindings over 1,000 Functions ingest as fast,
idle as quietly and start as quickly as one with 10 Bindings? Measured side by side in one run.

Run by hand (needs NATS with JetStream, PostgreSQL and Redis)::

    python benchmarks/scale.py [--events N] [--rounds R] [--idle S] [--python PATH] [--json PATH]

Two hubs, each in a fresh namespace (schema, stream, Redis keys), with the same shape:

small  10 Bindings over 10 Functions;
large  10,000 Bindings over 1,000 Functions (``--bindings``, ``--functions``).

How events meet bindings. Every Binding has the source ``api`` (events POSTed to
``/v1/events``), and a filter on the event type, ``exact: {type: com.example.t<k>}``, as
real deployments route by type (Knative Triggers do the same); every other Binding also has
``prefix: {subject: "orders/"}``, which the events match. Each type is named by ``--fanout``
(5) Bindings, of 5 different Functions, so an event matches 5 Bindings in both hubs (the large
hub has 2,000 types, the small one 2) and becomes 5 invocations: the same JetStream work per
event, so that the ratio shows what the size of the routing table costs. Binding ``i`` names
Function ``i mod functions`` and type ``i div fanout``; events go round the types.

The resources are declared with ``eventhub apply -f`` (one transaction, as in production) from
a generated multi-document file, before the hub starts; the time it takes is printed.

Measured:

start     ``python -m eventhub run`` (every role) started; seconds from ``Popen`` until
          ``/readyz`` answers 200, and until every Function's consumer has a pull request
          waiting (``num_waiting`` >= 1 in JetStream's consumer list): every dispatch worker
          is running. Once on a fresh stream ("first start": the hub creates the 1,000
          consumers), once more after a SIGTERM ("restart": they exist).
idle      both hubs (every role, nothing to do) left ``--settle`` s after their workers run,
          then the CPU time they use over ``--idle`` s, from ``/proc/<pid>/stat`` (utime +
          stime), in percent of one core; and their RSS.
ingest    events/s into JetStream: ``python -m eventhub run --role api`` (no dispatcher, the
          invocations stay in the stream, which is purged after each round), N events POSTed
          as CloudEvents batches (``application/cloudevents-batch+json``, ``--batch`` events a
          request, ``--concurrency`` requests in flight). An event counts once its 202 came
          back: every invocation it made has its PubAck. This is what "ingest" means for every
          door into the hub (``Ingress.submit``: routing, invocation ids, publish with PubAck);
          the HTTP API is the door with the least else in the way. The two hubs run side by
          side, measured in ``--rounds`` alternating rounds after a warm-up; the ratio is the
          median of the per-round ratios large/small.

Aims: ingest ratio large/small >= 0.9; the large hub idle under 5 % of a core; its start,
to every worker running, under 10 s.

The load generator shares the machine with the hubs: read the ratio, not the rates.
``--python`` runs the hubs with another interpreter; the hubs run the source tree this script
is in (``PYTHONPATH``), so copy the script into a snapshot to measure that. ``--profile DIR``
attaches ``py-spy`` to the large hub while it idles and while it ingests.
Everything created is removed at the end, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import aiohttp  # noqa: E402
import nats  # noqa: E402
import pipeline  # noqa: E402

NEVER = "http://127.0.0.1:9/never-called"  # nothing is dispatched in these runs
TICKS = os.sysconf("SC_CLK_TCK")
BATCH = "application/cloudevents-batch+json"


# ---------------------------------------------------------------------------------------------
# The two shapes


@dataclass(frozen=True)
class Shape:
    label: str
    functions: int
    bindings: int
    fanout: int

    @property
    def types(self) -> int:
        return self.bindings // self.fanout

    def event_type(self, k: int) -> str:
        return f"com.example.t{k % self.types}"

    def documents(self) -> list[dict[str, Any]]:
        def doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
            return {"apiVersion": "eventhub/v1", "kind": kind, "metadata": {"name": name}} | {
                "spec": spec
            }

        docs = [doc("Function", f"fn{f:04d}", {"url": NEVER}) for f in range(self.functions)]
        for i in range(self.bindings):
            filters: list[dict[str, Any]] = [{"exact": {"type": self.event_type(i // self.fanout)}}]
            if i % 2:
                filters.append({"prefix": {"subject": "orders/"}})
            spec = {"source": "api", "function": f"fn{i % self.functions:04d}", "filter": filters}
            docs.append(doc("Binding", f"b{i:05d}", spec))
        return docs


@dataclass
class Hub:
    """One shape's namespace, and the hub process running on it now."""

    shape: Shape
    run: pipeline.Run
    child: pipeline.Child | None = None
    base: str = ""

    @property
    def stream(self) -> str:
        return f"{self.run.namespace.upper()}_INVOCATIONS"

    def env(self, port: int = 0) -> dict[str, str]:
        env = pipeline.hub_env(self.run, port)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(":")
        env.setdefault("EVENTHUB_LOG_LEVEL", "warning")
        return env

    async def apply(self) -> float:
        """``eventhub apply -f`` of the shape's resources; returns the seconds it took."""
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            for doc in self.shape.documents():
                f.write("---\n" + json.dumps(doc) + "\n")
        argv = [self.run.args.python, "-m", "eventhub", "apply", "-f", f.name]
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            *argv, env=self.env(), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, err = await process.communicate()
        os.unlink(f.name)
        if process.returncode != 0:
            raise RuntimeError(f"eventhub apply failed: {err.decode()[-2000:]}")
        return time.monotonic() - started

    def start(self, *roles: str) -> float:
        """Start ``eventhub run``; returns the monotonic time just before the process exists."""
        port = pipeline.free_port()
        argv = [self.run.args.python, "-m", "eventhub", "run"]
        for role in roles:
            argv += ["--role", role]
        started = time.monotonic()
        self.child = self.run.child(
            f"{self.shape.label}-{'-'.join(roles) or 'all'}", argv, self.env(port)
        )
        self.base = f"http://127.0.0.1:{port}"
        return started

    async def stop(self) -> None:
        if self.child is not None:
            await self.child.stop()
            self.child = None

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.process.pid

    async def ready(self, wait: float = 120.0) -> float:
        """Poll ``/readyz`` every 20 ms until it answers 200; returns when it did."""
        assert self.child is not None
        deadline = time.monotonic() + wait
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.child.process.poll() is not None:
                    raise RuntimeError(f"{self.child.name} exited: {self.child.output()}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(f"{self.base}/readyz") as response:
                        if response.status == 200:
                            return time.monotonic()
                await asyncio.sleep(0.02)
        raise RuntimeError(f"{self.child.name} not ready: {self.child.output()}")

    async def workers_running(self, nc: Any, wait: float = 120.0) -> float:
        """Until every Function's consumer has a pull request waiting; returns when."""
        js = nc.jetstream(timeout=10.0)
        deadline = time.monotonic() + wait
        waiting = 0
        while time.monotonic() < deadline:
            waiting = 0
            with contextlib.suppress(Exception):  # the stream may not exist yet
                waiting = sum(
                    1
                    for c in await consumers(js, self.stream)
                    if c.name.startswith("fn-") and "_o" not in c.name and (c.num_waiting or 0) > 0
                )
            if waiting >= self.shape.functions:
                return time.monotonic()
            await asyncio.sleep(0.1)
        raise RuntimeError(f"only {waiting} of {self.shape.functions} workers pulling")


async def consumers(js: Any, stream: str) -> list[Any]:
    """Every consumer of the stream (JetStream lists 256 at a time)."""
    found: list[Any] = []
    while True:
        page = await js.consumers_info(stream, offset=len(found))
        found += page
        if len(page) < 256:
            return found


# ---------------------------------------------------------------------------------------------
# Process figures from /proc


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)


def nats_server_pid() -> int | None:
    """The local ``nats-server``, whose CPU per event is shown too (None: not found here)."""
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "nats-server":
                return int(proc.name)
    return None


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Figures:
    apply_s: float | None = None
    ready_s: float | None = None  # first start: Popen -> /readyz 200
    workers_s: float | None = None  # first start: Popen -> every worker pulling
    restart_ready_s: float | None = None
    restart_workers_s: float | None = None
    idle_cpu_pct: float | None = None
    idle_rss_mib: float | None = None
    rates: list[float] = field(default_factory=list)  # events/s per round
    hub_cpu_ms: list[float] = field(default_factory=list)  # hub CPU ms per 1,000 events
    nats_cpu_ms: list[float] = field(default_factory=list)  # NATS server CPU ms per 1,000
    invocations_per_event: float | None = None
    errors: int = 0

    @property
    def rate(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None


# ---------------------------------------------------------------------------------------------
# Start and idle


async def start_all_roles(hub: Hub, nc: Any) -> tuple[float, float]:
    started = hub.start()
    ready = await hub.ready()
    running = await hub.workers_running(nc)
    return ready - started, running - started


async def idle_cpu(hubs: list[Hub], seconds: float) -> list[tuple[float, float]]:
    """(percent of one core, RSS MiB) of each hub over ``seconds``, measured together."""
    before = [cpu_seconds(h.pid) for h in hubs]
    started = time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - started
    return [
        (100 * (cpu_seconds(h.pid) - b) / elapsed, pipeline.rss_mib(h.pid))
        for h, b in zip(hubs, before, strict=True)
    ]


async def start_and_idle(hubs: list[Hub], figures: dict[str, Figures], nc: Any) -> None:
    args = hubs[0].run.args
    for hub in hubs:  # one after the other: each has the machine to itself while it starts
        fig = figures[hub.shape.label]
        print(f"[{hub.shape.label}] first start (every role)")
        fig.ready_s, fig.workers_s = await start_all_roles(hub, nc)
        print(f"  /readyz {fig.ready_s:.2f} s, every worker pulling {fig.workers_s:.2f} s")
    print(f"[idle] settling {args.settle:g} s, then CPU over {args.idle:g} s")
    await asyncio.sleep(args.settle)
    profile = profiler(hubs[-1], "idle")
    try:
        measured = await idle_cpu(hubs, args.idle)
    finally:
        if profile is not None:
            profile.stop()
    for hub, (cpu, rss) in zip(hubs, measured, strict=True):
        figures[hub.shape.label].idle_cpu_pct, figures[hub.shape.label].idle_rss_mib = cpu, rss
        print(f"  {hub.shape.label}: {cpu:.2f} % of a core, RSS {rss:.0f} MiB")
    for hub in hubs:
        await hub.stop()
    for hub in hubs:
        fig = figures[hub.shape.label]
        print(f"[{hub.shape.label}] restart (every role)")
        fig.restart_ready_s, fig.restart_workers_s = await start_all_roles(hub, nc)
        ready, running = fig.restart_ready_s, fig.restart_workers_s
        print(f"  /readyz {ready:.2f} s, every worker pulling {running:.2f} s")
        await hub.stop()


def profiler(hub: Hub, what: str) -> pipeline.Profiler | None:
    if not hub.run.args.profile or hub.child is None:
        return None
    directory = Path(hub.run.args.profile)
    directory.mkdir(parents=True, exist_ok=True)
    profile = pipeline.Profiler(hub.child, directory)
    profile.path = directory / f"{hub.shape.label}-{what}.collapsed"
    profile.start()
    return profile


# ---------------------------------------------------------------------------------------------
# Ingest


def batch_body(shape: Shape, ids: range, prefix: str) -> bytes:
    return json.dumps(
        [
            {
                "specversion": "1.0",
                "id": f"{prefix}-{k}",
                "source": "/bench/scale",
                "type": shape.event_type(k),
                "subject": f"orders/{k}",
                "datacontenttype": "application/json",
                "data": {"n": k},
            }
            for k in ids
        ]
    ).encode()


async def ingest(
    hub: Hub,
    n: int,
    prefix: str,
    body: Callable[[Shape, range, str], bytes | str] = batch_body,
) -> tuple[float, int, int]:
    """POST n events, in batches made by ``body``; returns (events/s, invocations made, events
    refused)."""
    args = hub.run.args
    bodies = [
        body(hub.shape, range(i, min(i + args.batch, n)), prefix) for i in range(0, n, args.batch)
    ]
    headers = {"Authorization": f"Bearer {hub.run.token}", "Content-Type": BATCH}
    todo = iter(bodies)
    invocations = refused = 0

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal invocations, refused
        for body in todo:
            async with http.post(f"{hub.base}/v1/events", data=body, headers=headers) as response:
                answer = await response.read()
            if response.status == 202:
                invocations += answer.count(b'"binding"')
            else:
                refused += args.batch

    async with pipeline.session(args.concurrency) as http:
        started = time.monotonic()
        await asyncio.gather(*(worker(http) for _ in range(args.concurrency)))
        elapsed = time.monotonic() - started
    return (n - refused) / elapsed, invocations, refused


async def ingest_rounds(hubs: list[Hub], figures: dict[str, Figures], nc: Any) -> list[float]:
    args = hubs[0].run.args
    js = nc.jetstream(timeout=30.0)
    nats_pid = nats_server_pid()
    for hub in hubs:
        hub.start("api")
        await hub.ready()
        await ingest(hub, max(args.batch * args.concurrency * 4, 2000), "warm")
        await js.purge_stream(hub.stream)
    ratios: list[float] = []
    for r in range(args.rounds):
        rates: dict[str, float] = {}
        for hub in hubs:
            fig = figures[hub.shape.label]
            profile = profiler(hub, "ingest") if r == 0 and hub is hubs[-1] else None
            cpu = cpu_seconds(hub.pid), cpu_seconds(nats_pid) if nats_pid else 0.0
            try:
                rate, invocations, refused = await ingest(hub, args.events, f"r{r}")
            finally:
                if profile is not None:
                    profile.stop()
            per = 1e6 / args.events  # seconds -> ms per 1,000 events
            fig.hub_cpu_ms.append((cpu_seconds(hub.pid) - cpu[0]) * per)
            if nats_pid:
                fig.nats_cpu_ms.append((cpu_seconds(nats_pid) - cpu[1]) * per)
            await js.purge_stream(hub.stream)
            fig.rates.append(rate)
            fig.errors += refused
            fig.invocations_per_event = invocations / max(1, args.events - refused)
            rates[hub.shape.label] = rate
            print(f"[{hub.shape.label}] round {r + 1}: {rate:,.0f} events/s")
        ratios.append(rates[hubs[-1].shape.label] / rates[hubs[0].shape.label])
    for hub in hubs:
        await hub.stop()
    return ratios


# ---------------------------------------------------------------------------------------------
# The run and the report


async def benchmark(args: argparse.Namespace) -> tuple[list[Hub], dict[str, Figures], list[float]]:
    pipeline.cancel_on_signals()
    shapes = [
        Shape("small", args.small_functions, args.small_bindings, args.fanout),
        Shape("large", args.functions, args.bindings, args.fanout),
    ]
    hubs = [
        Hub(s, pipeline.Run(args, f"bench{uuid.uuid4().hex[:10]}", uuid.uuid4().hex, NEVER))
        for s in shapes
    ]
    figures = {s.label: Figures() for s in shapes}
    ratios: list[float] = []
    nc = await nats.connect(args.nats_url, name="bench-scale")
    try:
        for hub in hubs:
            fig = figures[hub.shape.label]
            fig.apply_s = await hub.apply()
            shape = hub.shape
            print(
                f"[{shape.label}] namespace {hub.run.namespace}: {shape.functions} Functions,"
                f" {shape.bindings} Bindings applied in {fig.apply_s:.1f} s"
            )
        if not args.skip_start:
            await start_and_idle(hubs, figures, nc)
        if args.rounds:
            ratios = await ingest_rounds(hubs, figures, nc)
    finally:
        await nc.close()
        for hub in hubs:
            await pipeline.clean_up(hub.run)
    return hubs, figures, ratios


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def report(
    args: argparse.Namespace, hubs: list[Hub], figures: dict[str, Figures], ratios: list[float]
) -> None:
    f = pipeline.fmt
    rows = [
        ("Functions / Bindings", lambda h, x: f"{h.shape.functions:,} / {h.shape.bindings:,}"),
        ("eventhub apply, s", lambda h, x: f(x.apply_s, 1)),
        ("first start: /readyz 200, s", lambda h, x: f(x.ready_s, 2)),
        ("first start: every worker pulling, s", lambda h, x: f(x.workers_s, 2)),
        ("restart: /readyz 200, s", lambda h, x: f(x.restart_ready_s, 2)),
        ("restart: every worker pulling, s", lambda h, x: f(x.restart_workers_s, 2)),
        ("idle CPU, % of one core", lambda h, x: f(x.idle_cpu_pct, 2)),
        ("idle RSS, MiB", lambda h, x: f(x.idle_rss_mib)),
        ("ingest, events/s (median round)", lambda h, x: f(x.rate)),
        ("ingest: hub CPU ms per 1,000 events", lambda h, x: f(median(x.hub_cpu_ms))),
        ("ingest: NATS server CPU ms per 1,000", lambda h, x: f(median(x.nats_cpu_ms))),
        ("invocations per event", lambda h, x: f(x.invocations_per_event, 2)),
        ("events refused", lambda h, x: str(x.errors)),
    ]
    lines = [["", *(h.shape.label for h in hubs)]]
    lines += [[name, *(cell(h, figures[h.shape.label]) for h in hubs)] for name, cell in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    print()
    for line in lines:
        print(
            "  ".join(
                [
                    line[0].ljust(widths[0]),
                    *(c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)),
                ]
            )
        )
    large = figures[hubs[-1].shape.label]
    ratio = statistics.median(ratios) if ratios else None
    print()
    rounds = ", ".join(f"{r:.3f}" for r in ratios)
    print(f"ingest ratio large/small, median of rounds: {f(ratio, 3)}  (rounds: {rounds})")
    checks = [
        ("ingest ratio >= 0.9", ratio is not None and ratio >= 0.9),
        ("large hub idle CPU < 5 %", large.idle_cpu_pct is not None and large.idle_cpu_pct < 5),
        ("large hub first start < 10 s", large.workers_s is not None and large.workers_s < 10),
    ]
    for name, ok in checks:
        print(f"  {name}: {'met' if ok else 'NOT met'}")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\n({os.cpu_count()} CPUs, load {load}; {args.events:,} events a round in batches of"
        f" {args.batch}, {args.concurrency} requests in flight)"
    )
    if args.profile:
        for path in sorted(Path(args.profile).glob("*.collapsed")):
            pipeline.summarize_profile(path)
    if args.json:
        doc = {
            "settings": {k: v for k, v in vars(args).items() if isinstance(v, int | float | str)},
            "figures": {k: v.__dict__ | {"rate": v.rate} for k, v in figures.items()},
            "ingestRatio": ratio,
            "roundRatios": ratios,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2), encoding="utf-8")
        print(f"\nresults written to {args.json}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--functions", type=int, default=1000)
    p.add_argument("--bindings", type=int, default=10_000)
    p.add_argument("--small-functions", type=int, default=10)
    p.add_argument("--small-bindings", type=int, default=10)
    p.add_argument("--fanout", type=int, default=5, help="Bindings each event matches")
    p.add_argument("--events", type=int, default=10_000, help="events per ingest round")
    p.add_argument("--batch", type=int, default=10, help="events per POST")
    p.add_argument("--concurrency", type=int, default=8, help="POSTs in flight")
    p.add_argument("--rounds", type=int, default=3, help="alternating ingest rounds (0: none)")
    p.add_argument("--settle", type=float, default=15.0, help="seconds before idle is measured")
    p.add_argument("--idle", type=float, default=30.0, help="seconds of idle measured")
    p.add_argument("--skip-start", action="store_true", help="measure ingest only")
    p.add_argument("--python", default=sys.executable, help="the interpreter to run hubs with")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--profile", help="py-spy the large hub; collapsed stacks go here")
    p.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    p.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = p.parse_args()
    if args.profile and shutil.which("py-spy") is None:
        p.error("--profile needs py-spy on PATH (pip install py-spy)")
    if args.bindings % args.fanout or args.small_bindings % args.fanout:
        p.error("--fanout must divide the numbers of Bindings")
    return args


def main() -> None:
    args = parse_args()
    try:
        hubs, figures, ratios = asyncio.run(benchmark(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    report(args, hubs, figures, ratios)


if __name__ == "__main__":
    main()
