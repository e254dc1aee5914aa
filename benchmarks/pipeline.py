"""Pipeline benchmark: how close eventhub comes to the raw ceiling, measured in one run.

Run by hand (needs NATS with JetStream, PostgreSQL and Redis)::

    python benchmarks/pipeline.py [--events N] [--rate R] [--concurrency C] [--json PATH]

Every scenario ends at the same no-op HTTP function, served by this process: it answers 200 at
once and records, per call, ``time.monotonic()`` and the ``ce-id`` header. Measured:

(a) direct    the function called by an aiohttp client at concurrency C: the HTTP ceiling;
(b) jetstream N small messages published with PubAck (C workers), then consumed and acked
              (eventhub's continuous pull, :class:`eventhub.queue.Puller`), then both at once;
(c) minimal   the least a JetStream-buffered pipeline can do, in a child process: an aiohttp
              endpoint that publishes the body (ce-* headers kept) and answers 202 after the
              PubAck, and a dispatcher that pulls with eventhub's ``Puller`` technique (the same
              class, the same request-as-much-as-there-is-room loop, ``max_ack_pending`` = C),
              POSTs to the function and acks. Nothing else;
(d) eventhub  ``python -m eventhub run`` in a child process, in a fresh namespace, with a
              Function (maxConcurrency C) and a Binding from source ``api``; N CloudEvents
              POSTed (binary mode) to ``/v1/events``;
(e) latency   (c) and (d) at a fixed open-loop rate R for ``--duration`` seconds: p50/p99 of
              (arrival at the function - 202 received) and of (arrival - POST sent).

Throughput counts from the first POST until the function has received every accepted event
(each id checked; duplicates counted). The load generator and the function share this process,
so their timestamps share one clock, and the pipelines run in child processes so that they do
not share its event loop. Absolute numbers on a shared, noisy machine mean little; what this
reports are the ratios eventhub/minimal and eventhub/direct, taken in the same run against the
ceilings measured minutes apart on the same machine.

Reading the results: this process does the same work per event in (a), (c) and (d) (one
client POST, one function request), so (a) is also the ceiling of the harness. Each pipeline is
one Python process on one event loop, so on a busy machine its throughput is set by its CPU
time per event; the ratios compare exactly that. "ans" latencies can be ~0 or negative: the
dispatcher may call the function before the 202 has reached the client.

Everything created (JetStream streams, the PostgreSQL schema, the Redis keys ``<namespace>:*``)
is removed at the end, and the child processes are stopped, also on Ctrl-C or an error.
``--profile DIR`` attaches ``py-spy`` to each pipeline child during its throughput run and
prints where its time went (collapsed stacks are kept in DIR).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import nats
import nats.errors
import nats.js.errors
import redis.asyncio as aioredis
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

from eventhub.queue import END, Puller

FUNCTION = "bench-fn"
BINDING = "bench-api"
MINIMAL_CONSUMER = "fn"
PULL_EXPIRES = 30.0  # as eventhub.dispatcher
PULL_HEARTBEAT = 5.0
WARM_UP_EVENTS = 1000
SCRIPT = os.path.abspath(__file__)
STALL = 30.0  # give up waiting for deliveries after this long without one


# ---------------------------------------------------------------------------------------------
# The no-op function and what it saw


@dataclass
class Recorder:
    """First arrival time of each ``ce-id``, how many times each came, and which are awaited."""

    first: dict[str, float] = field(default_factory=dict)
    count: Counter[str] = field(default_factory=Counter)
    pending: set[str] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def expect(self, ids: list[str]) -> None:
        self.pending = {i for i in ids if i not in self.first}
        self.done.clear()
        self._check()

    def forget(self, event_id: str) -> None:
        """The POST of this event failed: it is not awaited."""
        self.pending.discard(event_id)
        self._check()

    def record(self, event_id: str, at: float) -> None:
        self.count[event_id] += 1
        if event_id not in self.first:
            self.first[event_id] = at
            self.pending.discard(event_id)
            self._check()

    def _check(self) -> None:
        if not self.pending:
            self.done.set()

    async def wait_done(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.done.wait()
        return self.done.is_set()

    async def wait(self, stall: float = STALL) -> None:
        """Until every awaited event arrived, or none arrived for ``stall`` seconds."""
        last, since = len(self.pending), time.monotonic()
        while not await self.wait_done(0.5) and time.monotonic() - since < stall:
            if len(self.pending) != last:
                last, since = len(self.pending), time.monotonic()


async def start_function(on_call: Callable[[str], None], port: int) -> web.AppRunner:
    """The no-op function at ``/fn``: 200 at once, ``on_call(ce-id)`` for every call."""

    async def handle(request: web.Request) -> web.Response:
        on_call(request.headers.get("ce-id", ""))
        return web.Response()

    app = web.Application()
    app.router.add_post("/fn", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    return runner


# ---------------------------------------------------------------------------------------------
# The load generator


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)

    def request(self, event_id: str) -> tuple[dict[str, str], bytes]:
        headers = {
            "ce-specversion": "1.0",
            "ce-id": event_id,
            "ce-source": "/bench",
            "ce-type": "com.example.bench",
            "content-type": "application/json",
            **self.headers,
        }
        return headers, json.dumps({"id": event_id}).encode()


@dataclass
class Sample:
    sent: float
    answered: float
    ok: bool


def session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit), timeout=aiohttp.ClientTimeout(total=60)
    )


async def post(
    http: aiohttp.ClientSession, target: Target, event_id: str, recorder: Recorder
) -> Sample:
    headers, body = target.request(event_id)
    sent = time.monotonic()
    try:
        async with http.post(target.url, data=body, headers=headers) as response:
            await response.read()
            ok = 200 <= response.status < 300
    except (aiohttp.ClientError, OSError, TimeoutError):
        ok = False
    if not ok:
        recorder.forget(event_id)
    return Sample(sent, time.monotonic(), ok)


async def closed_loop(
    target: Target, ids: list[str], concurrency: int, recorder: Recorder
) -> dict[str, Sample]:
    """POST every id with ``concurrency`` requests in flight."""
    samples: dict[str, Sample] = {}
    todo = iter(ids)

    async def worker(http: aiohttp.ClientSession) -> None:
        for event_id in todo:
            samples[event_id] = await post(http, target, event_id, recorder)

    async with session(concurrency) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return samples


async def open_loop(
    target: Target, ids: list[str], rate: float, recorder: Recorder
) -> dict[str, Sample]:
    """POST id i at start + i/rate, whether or not the earlier ones were answered."""
    samples: dict[str, Sample] = {}

    async def one(http: aiohttp.ClientSession, event_id: str) -> None:
        samples[event_id] = await post(http, target, event_id, recorder)

    tasks = []
    async with session(1024) as http:
        start = time.monotonic()
        for i, event_id in enumerate(ids):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(http, event_id)))
        await asyncio.gather(*tasks)
    return samples


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Row:
    name: str
    events: int
    rate: float | None = None  # events/s: first POST -> last event received by the function
    ingest_rate: float | None = None  # events/s: first POST -> last POST answered
    p50_answered_ms: float | None = None  # arrival - 202 received
    p99_answered_ms: float | None = None
    p50_sent_ms: float | None = None  # arrival - POST sent
    p99_sent_ms: float | None = None
    missing: int = 0
    duplicates: int = 0
    errors: int = 0


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, in milliseconds."""
    if not values:
        return None
    ordered = sorted(values)
    return 1000 * ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def row_of(name: str, samples: dict[str, Sample], recorder: Recorder, latency: bool) -> Row:
    accepted = [i for i, s in samples.items() if s.ok]
    arrived = [i for i in accepted if i in recorder.first]
    start = min(s.sent for s in samples.values())
    last_answer = max(s.answered for s in samples.values())
    row = Row(name, len(samples), errors=len(samples) - len(accepted))
    row.missing = len(accepted) - len(arrived)
    row.duplicates = sum(recorder.count[i] - 1 for i in arrived)
    row.ingest_rate = len(accepted) / (last_answer - start)
    if arrived:
        row.rate = len(arrived) / (max(recorder.first[i] for i in arrived) - start)
    if latency:
        after_answer = [recorder.first[i] - samples[i].answered for i in arrived]
        after_send = [recorder.first[i] - samples[i].sent for i in arrived]
        row.p50_answered_ms, row.p99_answered_ms = (
            percentile(after_answer, q) for q in (0.5, 0.99)
        )
        row.p50_sent_ms, row.p99_sent_ms = (percentile(after_send, q) for q in (0.5, 0.99))
    return row


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


HEAD = (
    "scenario",
    "events",
    "ev/s",
    "ingest/s",
    "p50 ans",
    "p99 ans",
    "p50 sent",
    "p99 sent",
    "missing",
    "dup",
    "err",
)


def cells(r: Row) -> list[str]:
    latencies = (r.p50_answered_ms, r.p99_answered_ms, r.p50_sent_ms, r.p99_sent_ms)
    return [
        r.name,
        str(r.events),
        fmt(r.rate),
        fmt(r.ingest_rate),
        *(fmt(v, 1) for v in latencies),
        str(r.missing),
        str(r.duplicates),
        str(r.errors),
    ]


def print_table(rows: list[Row], ratios: dict[str, float | None]) -> None:
    lines = [list(HEAD), *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEAD))]
    print()
    for line in lines:
        _, *rest = (c.rjust(w) for c, w in zip(line, widths, strict=True))
        print("  ".join([line[0].ljust(widths[0]), *rest]))
    print("\n(ev/s: first POST -> last event at the function; ingest/s: until the last answer;")
    print(" latencies in ms: 'ans' = arrival - 202 received, 'sent' = arrival - POST sent)\n")
    for name, value in ratios.items():
        print(f"{name:46} {fmt(value, 3 if 'ratio' in name else 1)}")


def ratios_of(rows: dict[str, Row]) -> dict[str, float | None]:
    def rate(name: str) -> float | None:
        return rows[name].rate if name in rows else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    out: dict[str, float | None] = {
        "throughput ratio eventhub/minimal": ratio(rate("eventhub"), rate("minimal")),
        "throughput ratio eventhub/direct": ratio(rate("eventhub"), rate("direct")),
        "throughput ratio minimal/direct": ratio(rate("minimal"), rate("direct")),
    }
    eh, mini = rows.get("eventhub @rate"), rows.get("minimal @rate")
    for key in ("p50_answered_ms", "p99_answered_ms", "p50_sent_ms", "p99_sent_ms"):
        a: float | None = getattr(eh, key, None)
        b: float | None = getattr(mini, key, None)
        out[f"eventhub - minimal, {key} (ms)"] = a - b if a is not None and b is not None else None
    return out


# ---------------------------------------------------------------------------------------------
# Scenarios driven over HTTP: (a), (c), (d), (e)


def ids_for(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


async def throughput(
    target: Target, n: int, concurrency: int, recorder: Recorder, round_no: int = 0
) -> Row:
    ids = ids_for(f"{target.name}-tput{round_no}", n)
    recorder.expect(ids)
    samples = await closed_loop(target, ids, concurrency, recorder)
    await recorder.wait()
    return row_of(target.name, samples, recorder, latency=False)


async def at_rate(target: Target, rate: float, duration: float, recorder: Recorder) -> Row:
    ids = ids_for(f"{target.name}-rate", int(rate * duration))
    recorder.expect(ids)
    samples = await open_loop(target, ids, rate, recorder)
    await recorder.wait()
    return row_of(f"{target.name} @rate", samples, recorder, latency=True)


async def warm_up(target: Target, concurrency: int, recorder: Recorder) -> None:
    """Post single events until one arrives (routes and consumers are set up asynchronously),
    then a batch, so that connections and caches are warm for the measured runs."""
    deadline = time.monotonic() + 60
    for probe in range(10_000):
        ids = [f"{target.name}-probe-{probe}"]
        recorder.expect(ids)
        await closed_loop(target, ids, 1, recorder)
        if await recorder.wait_done(0.5):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target.name}: no event reached the function in 60 s")
    ids = ids_for(f"{target.name}-warm", WARM_UP_EVENTS)
    recorder.expect(ids)
    await closed_loop(target, ids, concurrency, recorder)
    await recorder.wait()


# ---------------------------------------------------------------------------------------------
# (b) JetStream alone


def raw_stream(namespace: str) -> tuple[str, str]:
    return f"{namespace.upper()}_RAW", f"{namespace}.raw.msg"


def work_queue(name: str, subject: str) -> api.StreamConfig:
    """Configured like eventhub's stream: file storage, work-queue retention."""
    return api.StreamConfig(
        name=name,
        subjects=[subject],
        retention=api.RetentionPolicy.WORK_QUEUE,
        discard=api.DiscardPolicy.NEW,
        storage=api.StorageType.FILE,
    )


def pull_consumer(name: str, subject: str, max_ack_pending: int) -> api.ConsumerConfig:
    return api.ConsumerConfig(
        durable_name=name,
        filter_subject=subject,
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=30.0,
        max_ack_pending=max_ack_pending,
        max_deliver=-1,
        max_waiting=512,
    )


async def publish_n(js: JetStreamContext, subject: str, n: int, concurrency: int) -> None:
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:
            await js.publish(subject, b'{"n":%d}' % i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def consume_n(nc: NATS, stream: str, n: int, batch: int) -> None:
    """Pull and ack n messages, ``batch`` per pull request, each handled as it arrives."""
    puller = Puller(nc, stream, MINIMAL_CONSUMER)
    await puller.open()
    got = 0
    try:
        while got < n:
            await puller.request(min(batch, n - got), expires=5.0, heartbeat=1.0)
            for _ in range(min(batch, n - got)):
                msg = await puller.next(wait=5.0)
                if msg is END or msg is None:
                    break
                await msg.ack()
                got += 1
    finally:
        await puller.close()


async def timed(name: str, n: int, *coros: Any) -> Row:
    start = time.monotonic()
    await asyncio.gather(*coros)
    return Row(name, n, rate=n / (time.monotonic() - start))


async def jetstream_alone(nc: NATS, namespace: str, n: int, concurrency: int) -> list[Row]:
    js = nc.jetstream(timeout=10.0)
    stream, subject = raw_stream(namespace)
    await js.add_stream(work_queue(stream, subject))
    await js.add_consumer(stream, pull_consumer(MINIMAL_CONSUMER, subject, concurrency))
    print(f"[jetstream] publish {n}, consume {n}, then both at once")
    return [
        await timed("jetstream publish", n, publish_n(js, subject, n, concurrency)),
        await timed("jetstream consume+ack", n, consume_n(nc, stream, n, concurrency)),
        await timed(
            "jetstream pub & consume",
            n,
            publish_n(js, subject, n, concurrency),
            consume_n(nc, stream, n, concurrency),
        ),
    ]


# ---------------------------------------------------------------------------------------------
# (c) The minimal pipeline, run in a child process by ``--serve-minimal PORT``


def minimal_stream(namespace: str) -> tuple[str, str]:
    return f"{namespace.upper()}_MINIMAL", f"{namespace}.minimal.fn"


async def minimal_ingest(js: JetStreamContext, subject: str, port: int) -> web.AppRunner:
    async def events(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {
            k.lower(): v
            for k, v in request.headers.items()
            if k.lower().startswith("ce-") or k.lower() == "content-type"
        }
        await js.publish(subject, body, headers=headers)
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/events", events)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    return runner


async def minimal_deliver(http: aiohttp.ClientSession, url: str, msg: Msg) -> None:
    try:
        async with http.post(url, data=msg.data, headers=msg.headers) as response:
            await response.content.read(1024)
            ok = response.status < 300
    except (aiohttp.ClientError, OSError, TimeoutError):
        ok = False
    await (msg.ack() if ok else msg.nak())


async def minimal_dispatch(
    nc: NATS, http: aiohttp.ClientSession, stream: str, url: str, concurrency: int
) -> None:
    """eventhub's FunctionWorker loop without the rest: request as many messages as there is
    room for, hand each to a task as it arrives, at most ``concurrency`` in flight."""
    puller = Puller(nc, stream, MINIMAL_CONSUMER)
    await puller.open()
    in_flight: set[asyncio.Task[None]] = set()
    room = asyncio.Event()

    def done(task: asyncio.Task[None]) -> None:
        in_flight.discard(task)
        room.set()

    while True:
        while len(in_flight) >= concurrency:
            room.clear()
            await room.wait()
        wanted = concurrency - len(in_flight)
        await puller.request(wanted, expires=PULL_EXPIRES, heartbeat=PULL_HEARTBEAT)
        while wanted > 0:
            msg = await puller.next(wait=PULL_HEARTBEAT * 3)
            if msg is END or msg is None:
                break
            wanted -= 1
            task = asyncio.create_task(minimal_deliver(http, url, msg))
            in_flight.add(task)
            task.add_done_callback(done)


async def serve_minimal(args: argparse.Namespace) -> None:
    nc = await nats.connect(args.nats_url, name="bench-minimal")
    js = nc.jetstream(timeout=10.0)
    stream, subject = minimal_stream(args.namespace)
    await js.add_stream(work_queue(stream, subject))
    await js.add_consumer(stream, pull_consumer(MINIMAL_CONSUMER, subject, args.concurrency))
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=0))
    dispatcher = asyncio.create_task(
        minimal_dispatch(nc, http, stream, args.function_url, args.concurrency)
    )
    runner = await minimal_ingest(js, subject, args.serve_minimal)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    dispatcher.cancel()
    await asyncio.wait([dispatcher])
    await http.close()
    await nc.close()


# ---------------------------------------------------------------------------------------------
# Child processes and the profiler


def rss_mib(pid: int) -> float:
    """A process's resident memory, from /proc (0 when it says none)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Child:
    """A child process in its own session (Ctrl-C reaches only us; we stop it in order)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept for the post-mortem
            prefix=f"bench-{name}-", suffix=".log", delete=False
        )
        self.process = subprocess.Popen(
            argv, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self) -> str:
        return Path(self.log.name).read_text(encoding="utf-8", errors="replace")[-3000:]

    async def stop(self, wait: float = 15.0) -> None:
        """SIGTERM, then SIGKILL; the log is deleted after a clean exit. The event loop keeps
        running meanwhile, so the function still answers the calls of a hub draining."""
        if self.log.closed:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.process.wait, wait)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)
        self._close_log()

    def _close_log(self) -> None:
        self.log.close()
        if self.process.returncode == 0:
            Path(self.log.name).unlink(missing_ok=True)
        else:
            print(f"{self.name} exited with {self.process.returncode}, log: {self.log.name}")

    async def ready(self, url: str, wait: float = 60.0) -> None:
        deadline = time.monotonic() + wait
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited: {self.output()}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(url) as response:
                        if response.status < 500:
                            return
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready: {self.output()}")


class Profiler:
    """``py-spy record`` attached to a child for the duration of one run."""

    def __init__(self, child: Child, directory: Path) -> None:
        self.child = child
        self.path = directory / f"{child.name}.collapsed"
        self.spy: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = ["py-spy", "record", "--pid", str(self.child.process.pid), "--format", "raw"]
        argv += ["--rate", "100", "--output", str(self.path)]
        self.spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.spy is not None and self.spy.poll() is None:
            self.spy.send_signal(signal.SIGINT)
            self.spy.wait(30)
        self.spy = None


def summarize_profile(path: Path, top: int = 20) -> None:
    """Print the frames most often at the top of the stack (self) and on it (inclusive,
    leaving out the event loop's own frames, which are on nearly every stack)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f.rsplit(" (", 1)[0] + " " + _short(f) for f in stack.split(";")]
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    loop = max(inclusive.values(), default=0) * 0.9
    print(f"\n--- {path}: {total} samples (CPU only, 100/s)")
    for title, counter in (("self", own), ("inclusive", inclusive)):
        print(f"  top {title}:")
        ranked = [(f, n) for f, n in counter.most_common() if title == "self" or n < loop]
        for frame, n in ranked[:top]:
            print(f"    {100 * n / total:5.1f}%  {frame}")


def _short(frame: str) -> str:
    where = frame.rsplit(" (", 1)[-1].rstrip(")")
    return "(" + "/".join(where.split(":")[0].split("/")[-2:]) + ")"


# ---------------------------------------------------------------------------------------------
# Setting up and tearing down


@dataclass
class Run:
    args: argparse.Namespace
    namespace: str
    token: str
    function_url: str
    recorder: Recorder = field(default_factory=Recorder)
    children: list[Child] = field(default_factory=list)
    round_ratios: list[float] = field(default_factory=list)

    def child(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        process = Child(name, argv, env)
        self.children.append(process)
        return process

    def profiler(self, child: Child) -> Profiler | None:
        if not self.args.profile:
            return None
        Path(self.args.profile).mkdir(parents=True, exist_ok=True)
        return Profiler(child, Path(self.args.profile))


async def start_minimal(run: Run) -> tuple[Target, Child]:
    port, args = free_port(), run.args
    argv = [sys.executable, SCRIPT, "--serve-minimal", str(port)]
    argv += ["--namespace", run.namespace, "--function-url", run.function_url]
    argv += ["--concurrency", str(args.concurrency), "--nats-url", args.nats_url]
    child = run.child("minimal", argv)
    await child.ready(f"http://127.0.0.1:{port}/")
    return Target("minimal", f"http://127.0.0.1:{port}/events"), child


def hub_env(run: Run, port: int) -> dict[str, str]:
    return hub_env_for(run.args, run.namespace, run.token, port)


def hub_env_for(args: argparse.Namespace, namespace: str, token: str, port: int) -> dict[str, str]:
    """The environment of an ``eventhub run`` child: the services of ``args``, a namespace of
    its own, and one token with the admin and events scopes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTHUB_")}
    env.update(
        EVENTHUB_DATABASE_URL=args.database_url,
        EVENTHUB_NATS_URL=args.nats_url,
        EVENTHUB_REDIS_URL=args.redis_url,
        EVENTHUB_NAMESPACE=namespace,
        EVENTHUB_HOST="127.0.0.1",
        EVENTHUB_PORT=str(port),
        EVENTHUB_TOKENS=json.dumps({token: ["admin", "events"]}),
        EVENTHUB_SHUTDOWN_TIMEOUT="5",
    )
    return env


async def declare(base_url: str, token: str, kind: str, name: str, spec: dict[str, Any]) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.put(
            f"{base_url}/v1/{kind}/{name}",
            json={"spec": spec},
            headers={"Authorization": f"Bearer {token}"},
        ) as response,
    ):
        if response.status not in (200, 201):
            raise RuntimeError(f"PUT {kind}/{name}: {response.status} {await response.text()}")


async def start_eventhub(run: Run) -> tuple[Target, Child]:
    port, args = free_port(), run.args
    argv = [sys.executable, "-m", "eventhub", "run"]
    child = run.child("eventhub", argv, hub_env(run, port))
    base = f"http://127.0.0.1:{port}"
    await child.ready(f"{base}/readyz")
    spec = {"url": run.function_url, "maxConcurrency": args.concurrency}
    await declare(base, run.token, "functions", FUNCTION, spec)
    await declare(base, run.token, "bindings", BINDING, {"source": "api", "function": FUNCTION})
    auth = {"Authorization": f"Bearer {run.token}"}
    return Target("eventhub", f"{base}/v1/events", auth), child


async def clean_up(run: Run) -> None:
    for child in run.children:
        await child.stop()
    ns = run.namespace
    await remove_namespace(run.args, ns, [raw_stream(ns)[0], minimal_stream(ns)[0]])


async def remove_namespace(
    args: argparse.Namespace, ns: str, streams: list[str] | None = None
) -> None:
    """Delete what a hub in namespace ``ns`` made (its stream, schema and Redis keys), and the
    other ``streams`` given."""
    streams = [*(streams or []), f"{ns.upper()}_INVOCATIONS"]
    with _warn("JetStream"):
        nc = await nats.connect(args.nats_url)
        js = nc.jetstream()
        for stream in streams:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(stream)
        await nc.close()
    with _warn("PostgreSQL"):
        conn = await asyncpg.connect(args.database_url)
        await conn.execute(f'drop schema if exists "{ns}" cascade')
        await conn.close()
    with _warn("Redis"):
        client = aioredis.from_url(args.redis_url)
        keys = [k async for k in client.scan_iter(match=f"{ns}:*", count=1000)]
        for i in range(0, len(keys), 1000):
            await client.delete(*keys[i : i + 1000])
        await client.aclose()


@contextlib.contextmanager
def _warn(what: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        print(f"clean-up of {what} failed: {exc!r}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Main


def cancel_on_signals() -> None:
    """SIGINT/SIGTERM cancel the run, whose clean-up then runs; further signals are ignored
    until it is done. (Set here because a shell may start a background job ignoring SIGINT.)"""
    task, loop = asyncio.current_task(), asyncio.get_running_loop()
    assert task is not None

    def on_signal() -> None:
        if task.cancelling():
            print("cleaning up, please wait", file=sys.stderr)
        else:
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)


async def benchmark(args: argparse.Namespace) -> tuple[list[Row], list[float]]:
    cancel_on_signals()
    port = free_port()
    run = Run(
        args, f"bench{uuid.uuid4().hex[:10]}", uuid.uuid4().hex, f"http://127.0.0.1:{port}/fn"
    )
    recorder = run.recorder
    function = await start_function(lambda i: recorder.record(i, time.monotonic()), port)
    print(f"namespace {run.namespace}, function at {run.function_url}")
    try:
        return await scenarios(run), run.round_ratios
    finally:
        await function.cleanup()
        await clean_up(run)


def report(args: argparse.Namespace, rows: list[Row], round_ratios: list[float]) -> None:
    ratios = ratios_of({r.name: r for r in rows})
    if round_ratios:
        ratios["median per-round ratio eventhub/minimal"] = statistics.median(round_ratios)
    print_table(rows, ratios)
    if args.profile:
        for path in sorted(Path(args.profile).glob("*.collapsed")):
            summarize_profile(path)
    if args.json:
        doc = {"settings": _settings(args), "rows": [dataclasses.asdict(r) for r in rows]}
        doc["ratios"] = ratios
        Path(args.json).write_text(json.dumps(doc, indent=2), encoding="utf-8")
        print(f"\nresults written to {args.json}")


async def scenarios(run: Run) -> list[Row]:
    args = run.args
    direct = Target("direct", run.function_url)
    await warm_up(direct, args.concurrency, run.recorder)
    print(f"[direct] {args.events} calls at concurrency {args.concurrency}")
    rows = [await throughput(direct, args.events, args.concurrency, run.recorder)]
    nc = await nats.connect(args.nats_url, name="bench")
    try:
        rows += await jetstream_alone(nc, run.namespace, args.events, args.concurrency)
    finally:
        await nc.close()
    pipelines = [await start_minimal(run), await start_eventhub(run)]
    return rows + await alternate(run, pipelines)


async def alternate(run: Run, pipelines: list[tuple[Target, Child]]) -> list[Row]:
    """Both pipelines run side by side, measured in turns, ``--rounds`` times: noise that
    comes and goes on a shared machine then hits both alike. The row named after a pipeline
    holds its median round; the ratio is the median of the per-round ratios."""
    args, rows = run.args, []
    for target, _ in pipelines:
        await warm_up(target, args.concurrency, run.recorder)
    rounds: dict[str, list[Row]] = {target.name: [] for target, _ in pipelines}
    for i in range(args.rounds):
        for target, child in pipelines:
            print(f"[{target.name}] round {i + 1}: {args.events} events at {args.concurrency}")
            profile = run.profiler(child) if i == 0 else None
            if profile is not None:
                profile.start()
            try:
                row = await throughput(
                    target, args.events, args.concurrency, run.recorder, round_no=i
                )
            finally:
                if profile is not None:
                    profile.stop()
            rounds[target.name].append(row)
    for results in rounds.values():
        ordered = sorted(results, key=lambda r: r.rate or 0.0)
        rows.append(ordered[len(ordered) // 2])
    pairs = zip(rounds["eventhub"], rounds["minimal"], strict=True)
    per_round = [e.rate / m.rate for e, m in pairs if e.rate and m.rate]
    run.round_ratios = per_round
    for target, _ in pipelines:
        print(f"[{target.name}] latency, {args.rate:g} events/s for {args.duration:g} s")
        rows.append(await at_rate(target, args.rate, args.duration, run.recorder))
    return rows


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("events", "rate", "concurrency", "duration")
    return {k: getattr(args, k) for k in keys} | {"cpus": os.cpu_count(), "load": os.getloadavg()}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=20_000, help="events per throughput run")
    p.add_argument("--rate", type=float, default=500.0, help="events/s of the latency runs")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of each latency run")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight; maxConcurrency")
    p.add_argument("--rounds", type=int, default=3, help="alternating throughput rounds")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--profile", help="py-spy the pipeline children; collapsed stacks go here")
    p.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    p.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--serve-minimal", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--namespace", help=argparse.SUPPRESS)
    p.add_argument("--function-url", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.profile and shutil.which("py-spy") is None:
        p.error("--profile needs py-spy on PATH (pip install py-spy)")
    return args


def main() -> None:
    args = parse_args()
    try:
        if args.serve_minimal:
            asyncio.run(serve_minimal(args))
            return
        rows, round_ratios = asyncio.run(benchmark(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    report(args, rows, round_ratios)


if __name__ == "__main__":
    main()
