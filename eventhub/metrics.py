"""Prometheus metrics, one registry per hub process (served at ``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_in = Counter(
            "eventhub_events_in", "Events accepted, by source", ["source"], registry=r
        )
        self.events_unrouted = Counter(
            "eventhub_events_unrouted",
            "Events accepted that matched no binding, by source",
            ["source"],
            registry=r,
        )
        self.invocations_enqueued = Counter(
            "eventhub_invocations_enqueued",
            "Invocations durably enqueued, by function",
            ["function"],
            registry=r,
        )
        self.invocations = Counter(
            "eventhub_invocations",
            "Invocation attempts by version and outcome (succeeded, retried, dead_lettered)",
            ["function", "version", "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "eventhub_invocation_duration_seconds",
            "Duration of one HTTP call to a function, by version",
            ["function", "version"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.retries = Counter(
            "eventhub_retries",
            "Attempts that will be retried, by version",
            ["function", "version"],
            registry=r,
        )
        self.dead_letters = Counter(
            "eventhub_dead_letters",
            "Dead letters stored, by function and reason",
            ["function", "reason"],
            registry=r,
        )
        self.replays = Counter(
            "eventhub_replays",
            "Dead-letter replays, by stage (started, succeeded, failed)",
            ["stage"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "eventhub_queue_depth",
            "Invocations waiting or in flight, by function",
            ["function"],
            registry=r,
        )
        self.retries_waiting = Gauge(
            "eventhub_retries_waiting",
            "Invocations waiting in the retry schedule for their next attempt, by function",
            ["function"],
            registry=r,
        )
        self.source_events = Counter(
            "eventhub_source_events", "Events taken from a source", ["source"], registry=r
        )
        self.source_errors = Counter(
            "eventhub_source_errors",
            "Source errors, by kind (connection, rejected)",
            ["source", "kind"],
            registry=r,
        )
        self.source_lag = Gauge(
            "eventhub_source_lag",
            "Messages in the transport not yet taken (where the transport tells)",
            ["source"],
            registry=r,
        )
        self.source_last_event = Gauge(
            "eventhub_source_last_event_timestamp_seconds",
            "When the source last delivered an event (time since = now - this)",
            ["source"],
            registry=r,
        )
        self.source_throttled = Gauge(
            "eventhub_source_throttled",
            "1 while the source waits for room (high-water mark or full buffer)",
            ["source"],
            registry=r,
        )
        self.invalid_resources = Gauge(
            "eventhub_invalid_resources",
            "Stored resources that do not validate, and that routing skips, by kind",
            ["kind"],
            registry=r,
        )
        self.http_rejected = Counter(
            "eventhub_http_rejected",
            "Requests refused, by HTTP status",
            ["status"],
            registry=r,
        )
        self.flow_runs = Counter(
            "eventhub_flow_runs",
            "Flow runs by status reached (started, succeeded, failed)",
            ["flow", "status"],
            registry=r,
        )
        self.flow_steps = Counter(
            "eventhub_flow_steps",
            "Flow steps ended, by step and status (succeeded, failed); branches count apart",
            ["flow", "step", "status"],
            registry=r,
        )
        self.combinations = Counter(
            "eventhub_combinations",
            "Combination bindings: fired; timed_out (a key's events outlived the window before"
            " the condition held); uncorrelated (an event without a correlation key)",
            ["binding", "outcome"],
            registry=r,
        )
        self.rollout_weight = Gauge(
            "eventhub_rollout_weight",
            "Each version's weight in an alias under its latest rollout (0-100)",
            ["function", "alias", "version"],
            registry=r,
        )
