"""Payload filters: what a ``cel`` filter on the event's data costs, against the same bindings
filtered on attributes alone, measured side by side in one run.

Run by hand (the ingest part needs NATS with JetStream, PostgreSQL and Redis)::

    python benchmarks/payload_filters.py [--events N] [--rounds R] [--routing-only] [--json PATH]

Two shapes, the same but for the payload filter:

attributes  ``--bindings`` (50) Bindings over ``--functions`` (10) Functions, on source ``api``,
            each filtered by event type (``exact: {type: ...}``, and every other one also by
            ``prefix: {subject: "orders/"}``), as in ``scale.py``: each type is named by
            ``--fanout`` (5) Bindings, so an event matches 5 of them.
payload     the same Bindings, each with one more filter expression,
            ``cel: "<--expression>"``, which every event here matches: both shapes make the
            same invocations, so the difference is the filter's own cost (the payload parsed
            once per event, the expression evaluated by 5 Bindings).

Events are orders of about 300 bytes of JSON (``datacontenttype: application/json``): an
amount, a customer, three items, a shipping address.

Measured:

routing    in this process, ``Routes.match`` over ``--routing-events`` prepared events, µs per
           event, in ``--rounds`` alternating rounds (median). This isolates what the filter
           adds to the hub's routing path: a Scope per event, one JSON parse, 5 evaluations.
ingest     events/s into JetStream, as ``scale.py`` measures it: ``eventhub run --role api``
           (no dispatcher; the stream is purged after each round), N events POSTed as
           CloudEvents batches (``--batch`` a request, ``--concurrency`` requests in flight);
           an event counts once its 202 came back (every invocation has its PubAck). The two
           hubs run side by side, in alternating rounds after a warm-up; the ratio is the
           median of the per-round ratios payload/attributes.
one        per evaluation of the expression on one payload: eventhub's compiled closures,
           and cel-python's own runners (interpreted; transpiled to Python), with the
           conversion of the parsed JSON to cel-python's value types that they need: why
           eventhub compiles cel-python's parse tree itself (see eventhub/expressions.py).

Aim: ingest ratio payload/attributes >= 0.8. The load generator shares the machine with the
hubs: read the ratios, not the rates; the machine's load is printed with the results.
Everything created is removed at the end, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import timeit
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import nats  # noqa: E402
import orjson  # noqa: E402
import pipeline  # noqa: E402
import scale  # noqa: E402

from eventhub.events import Event  # noqa: E402
from eventhub.expressions import compile_expression  # noqa: E402
from eventhub.resources import parse_resource  # noqa: E402
from eventhub.routing import Routes  # noqa: E402

EXPRESSION = "data.amount > 100 && data.customer.tier in ['gold', 'silver']"
BATCH = "application/cloudevents-batch+json"


@dataclass(frozen=True)
class PayloadShape(scale.Shape):
    """scale.py's shape, each Binding with ``cel: expression`` added when one is given."""

    expression: str | None = None

    def documents(self) -> list[dict[str, Any]]:
        docs = super().documents()
        if self.expression is not None:
            for doc in docs:
                if doc["kind"] == "Binding":
                    doc["spec"]["filter"].append({"cel": self.expression})
        return docs


def order(k: int) -> dict[str, Any]:
    return {
        "orderId": f"o-{k}",
        "amount": 150 + k % 50,
        "currency": "EUR",
        "customer": {"id": f"c-{k % 997}", "tier": "gold" if k % 2 else "silver", "country": "DE"},
        "items": [
            {"sku": f"sku-{k % 7}", "qty": 1 + k % 3, "price": 25.0},
            {"sku": "sku-gift", "qty": 1, "price": 0.0},
            {"sku": f"sku-{k % 11}", "qty": 2, "price": 12.5},
        ],
        "shipping": {"method": "express", "address": {"city": "Berlin", "zip": "10115"}},
    }


def event_doc(shape: scale.Shape, k: int, prefix: str) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"{prefix}-{k}",
        "source": "/bench/payload",
        "type": shape.event_type(k),
        "subject": f"orders/{k}",
        "datacontenttype": "application/json",
        "data": order(k),
    }


# ---------------------------------------------------------------------------------------------
# Routing, in this process


def routes_of(shape: scale.Shape) -> Routes:
    return Routes.build([parse_resource(doc) for doc in shape.documents()])


def routing_rounds(shapes: list[PayloadShape], args: argparse.Namespace) -> dict[str, list[float]]:
    """µs per event of ``Routes.match`` for each shape, in alternating rounds."""
    routes = {s.label: routes_of(s) for s in shapes}
    events = [
        Event(
            {k: v for k, v in event_doc(shapes[0], k, "r").items() if k != "data"},
            orjson.dumps(order(k)),
        )
        for k in range(args.routing_events)
    ]
    matched = {label: sum(len(r.match("api", e)) for e in events) for label, r in routes.items()}
    if len(set(matched.values())) != 1:
        raise RuntimeError(f"the shapes route differently: {matched}")
    times: dict[str, list[float]] = {s.label: [] for s in shapes}
    for _ in range(args.rounds):
        for shape in shapes:
            match = routes[shape.label].match
            started = time.perf_counter()
            for event in events:
                match("api", event)
            times[shape.label].append((time.perf_counter() - started) * 1e6 / len(events))
    return times


def one_evaluation(expression: str) -> dict[str, float]:
    """µs per evaluation of ``expression`` on one order, by eventhub and by cel-python."""
    import logging

    import celpy
    from celpy.adapter import json_to_cel

    logging.getLogger("celpy").setLevel(logging.CRITICAL)
    data = order(1)
    attributes = {"type": "com.example.t0", "id": "e1"}
    compiled = compile_expression(expression)

    def per_call(f: Any, n: int) -> float:
        return min(timeit.repeat(f, number=n, repeat=3)) * 1e6 / n

    figures = {"eventhub": per_call(lambda: compiled.evaluate_data(data, attributes), 20_000)}
    body = orjson.dumps(data)
    figures[f"parse the payload ({len(body)} bytes)"] = per_call(lambda: orjson.loads(body), 20_000)
    activation = {"data": json_to_cel(data)}
    figures["cel-python: convert the payload"] = per_call(lambda: json_to_cel(data), 2_000)
    limit = sys.getrecursionlimit()
    for name, runner in [
        ("interpreted", celpy.InterpretedRunner),
        ("transpiled", celpy.CompiledRunner),
    ]:
        celpy.CELParser.CEL_PARSER = None  # its parser is built for one runner's tree class
        environment = celpy.Environment(runner_class=runner)
        program = environment.program(environment.compile(expression))
        figures[f"cel-python {name}"] = per_call(lambda p=program: p.evaluate(activation), 500)
    celpy.CELParser.CEL_PARSER = None
    sys.setrecursionlimit(limit)
    return figures


# ---------------------------------------------------------------------------------------------
# Ingest, through two hubs


@dataclass
class Figures:
    rates: list[float] = field(default_factory=list)
    hub_cpu_ms: list[float] = field(default_factory=list)
    invocations_per_event: float | None = None
    refused: int = 0


def batch_of_orders(shape: scale.Shape, ids: range, prefix: str) -> str:
    return json.dumps([event_doc(shape, k, prefix) for k in ids])


async def ingest(hub: scale.Hub, n: int, prefix: str) -> tuple[float, int, int]:
    """POST n order events; returns (events/s, invocations made, events refused)."""
    return await scale.ingest(hub, n, prefix, body=batch_of_orders)


async def ingest_rounds(hubs: list[scale.Hub], figures: dict[str, Figures]) -> list[float]:
    args = hubs[0].run.args
    nc = await nats.connect(args.nats_url, name="bench-payload-filters")
    js = nc.jetstream(timeout=30.0)
    ratios: list[float] = []
    try:
        for hub in hubs:
            await hub.apply()
            hub.start("api")
            await hub.ready()
            await ingest(hub, max(args.batch * args.concurrency * 4, 2000), "warm")
            await js.purge_stream(hub.stream)
        for r in range(args.rounds):
            rates: dict[str, float] = {}
            for hub in hubs if r % 2 == 0 else hubs[::-1]:
                fig = figures[hub.shape.label]
                cpu = scale.cpu_seconds(hub.pid)
                rate, invocations, refused = await ingest(hub, args.events, f"r{r}")
                fig.hub_cpu_ms.append((scale.cpu_seconds(hub.pid) - cpu) * 1e6 / args.events)
                await js.purge_stream(hub.stream)
                fig.rates.append(rate)
                fig.refused += refused
                fig.invocations_per_event = invocations / max(1, args.events - refused)
                rates[hub.shape.label] = rate
                print(f"[{hub.shape.label}] round {r + 1}: {rate:,.0f} events/s")
            ratios.append(rates["payload"] / rates["attributes"])
    finally:
        await nc.close()
        for hub in hubs:
            await hub.stop()
    return ratios


async def run_hubs(
    shapes: list[PayloadShape], args: argparse.Namespace
) -> tuple[dict[str, Figures], list[float]]:
    pipeline.cancel_on_signals()
    hubs = [
        scale.Hub(
            s, pipeline.Run(args, f"bench{uuid.uuid4().hex[:10]}", uuid.uuid4().hex, scale.NEVER)
        )
        for s in shapes
    ]
    figures = {s.label: Figures() for s in shapes}
    try:
        ratios = await ingest_rounds(hubs, figures)
    finally:
        for hub in hubs:
            await pipeline.clean_up(hub.run)
    return figures, ratios


# ---------------------------------------------------------------------------------------------
# The run and the report


def report(
    args: argparse.Namespace,
    routing: dict[str, list[float]],
    one: dict[str, float],
    figures: dict[str, Figures] | None,
    ratios: list[float],
) -> dict[str, Any]:
    f = pipeline.fmt
    attributes, payload = (statistics.median(routing[k]) for k in ("attributes", "payload"))
    print(f"\nexpression: cel: {args.expression!r}")
    print(f"{args.bindings} Bindings over {args.functions} Functions, {args.fanout} per event")
    print("\nrouting, µs per event (median of rounds)")
    print(f"  attributes only   {attributes:8.2f}")
    print(f"  with payload      {payload:8.2f}   (+{payload - attributes:.2f} µs per event)")
    print("\none evaluation, µs")
    for name, value in one.items():
        print(f"  {name:34} {value:9.2f}")
    doc: dict[str, Any] = {"routingUs": routing, "oneEvaluationUs": one}
    ratio = statistics.median(ratios) if ratios else None
    if figures:
        print("\ningest, events/s (median round)        attributes      payload")
        row = [f(statistics.median(figures[k].rates)) for k in ("attributes", "payload")]
        print(f"  events/s                           {row[0]:>12} {row[1]:>12}")
        cpu = [f(statistics.median(figures[k].hub_cpu_ms)) for k in ("attributes", "payload")]
        print(f"  hub CPU ms per 1,000 events        {cpu[0]:>12} {cpu[1]:>12}")
        per = [f(figures[k].invocations_per_event, 2) for k in ("attributes", "payload")]
        print(f"  invocations per event              {per[0]:>12} {per[1]:>12}")
        refused = [str(figures[k].refused) for k in ("attributes", "payload")]
        print(f"  events refused                     {refused[0]:>12} {refused[1]:>12}")
        rounds = ", ".join(f"{r:.3f}" for r in ratios)
        print(f"\ningest ratio payload/attributes, median of rounds: {f(ratio, 3)} ({rounds})")
        print(f"  ratio >= 0.8: {'met' if ratio is not None and ratio >= 0.8 else 'NOT met'}")
        doc |= {"figures": {k: v.__dict__ for k, v in figures.items()}, "ingestRatio": ratio}
        doc["roundRatios"] = ratios
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    rounds = f"{args.events:,} events a round, {args.rounds} rounds"
    print(f"\n({os.cpu_count()} CPUs, load {load}; {rounds})")
    doc["load"] = os.getloadavg()
    return doc


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--expression", default=EXPRESSION, help="the payload filter")
    p.add_argument("--functions", type=int, default=10)
    p.add_argument("--bindings", type=int, default=50)
    p.add_argument("--fanout", type=int, default=5, help="Bindings each event matches")
    p.add_argument("--events", type=int, default=10_000, help="events per ingest round")
    p.add_argument("--routing-events", type=int, default=20_000, help="events per routing round")
    p.add_argument("--batch", type=int, default=10, help="events per POST")
    p.add_argument("--concurrency", type=int, default=8, help="POSTs in flight")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    p.add_argument("--routing-only", action="store_true", help="no hubs: routing and one")
    p.add_argument("--python", default=sys.executable, help="the interpreter to run hubs with")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    p.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = p.parse_args()
    args.baseline, args.profile = None, None  # read by pipeline.clean_up and scale.Hub
    if args.bindings % args.fanout:
        p.error("--fanout must divide the number of Bindings")
    return args


def main() -> None:
    args = parse_args()
    shapes = [
        PayloadShape("attributes", args.functions, args.bindings, args.fanout),
        PayloadShape("payload", args.functions, args.bindings, args.fanout, args.expression),
    ]
    routing = routing_rounds(shapes, args)
    one = one_evaluation(args.expression)
    figures, ratios = None, []
    if not args.routing_only:
        try:
            figures, ratios = asyncio.run(run_hubs(shapes, args))
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("interrupted", file=sys.stderr)
            sys.exit(130)
    doc = report(args, routing, one, figures, ratios)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2), encoding="utf-8")
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
