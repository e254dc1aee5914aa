"""What each route of the HTTP API takes and answers, for ``/openapi.json``.

One :class:`Op` per handler. The path, method, path parameters and scope of each operation are
not written here: :mod:`eventhub.api.openapi` reads them from the router and from the
``@requires`` mark of the handler. Problem answers are listed by status; 401 and 403 are added to
every operation that needs a token. ``{Kind}`` in a schema name stands for the resource kind of
the path (``Function``, ``Source``, ``Binding``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eventhub.api import (
    deadletters,
    flows,
    health,
    ingress,
    resources,
    rollouts,
    stats,
    ui,
    webhooks,
)
from eventhub.resources import NAME_PATTERN

Schema = dict[str, Any]


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # "query" or "header"
    schema: Schema
    description: str = ""
    required: bool = False

    def render(self) -> Schema:
        out: Schema = {"name": self.name, "in": self.where, "schema": self.schema}
        if self.description:
            out["description"] = self.description
        if self.required:
            out["required"] = True
        return out


@dataclass(frozen=True)
class Op:
    summary: str
    tag: str
    # status -> (media type -> schema name or inline schema); None: no body.
    ok: dict[int, dict[str, str | Schema] | None]
    problems: tuple[int, ...] = ()
    body: dict[str, str | Schema] | None = None
    body_required: bool = True
    params: tuple[Param, ...] = ()
    description: str = ""
    ok_headers: dict[int, dict[str, str]] = field(default_factory=dict)
    # For a route without a hub scope that checks a credential of its own: the scheme's name.
    security: str | None = None
    # Path parameters that differ from PATH_PARAMS.
    path_params: dict[str, Schema] = field(default_factory=dict)


_JSON = "application/json"
_ANY_BODY: dict[str, str | Schema] = {
    "application/json": {},
    "text/plain": {"type": "string"},
    "application/octet-stream": {"type": "string", "format": "binary"},
}
_TRACE = (
    Param("traceparent", "header", {"type": "string"}, "W3C trace context, passed on"),
    Param("tracestate", "header", {"type": "string"}),
)
_INVOKE_HEADERS = (
    Param(
        "Idempotency-Key",
        "header",
        {"type": "string", "minLength": 1, "maxLength": 256},
        "the same key (per function) within the state TTL returns the same invocation",
    ),
    Param(
        "X-Callback-Url",
        "header",
        {"type": "string", "format": "uri"},
        "an absolute http(s) URL that receives the outcome",
    ),
    *_TRACE,
)
_CE_HEADERS = tuple(
    Param(f"ce-{attr}", "header", {"type": "string"}, "binary content mode: " + note)
    for attr, note in (
        ("specversion", "1.0; required in binary mode"),
        ("id", "required in binary mode"),
        ("source", "required in binary mode"),
        ("type", "required in binary mode"),
        ("subject", "optional"),
        ("time", "optional, RFC 3339"),
    )
)
_FILTERS = (
    Param("function", "query", {"type": "string"}),
    Param("version", "query", {"type": "string"}),
    Param("binding", "query", {"type": "string"}),
    Param("source", "query", {"type": "string"}),
    Param("status", "query", {"enum": ["dead", "replaying", "resolved"]}),
    Param("errorCode", "query", {"type": "string"}),
    Param("reason", "query", {"type": "string"}),
    Param("since", "query", {"type": "string", "format": "date-time"}),
    Param("until", "query", {"type": "string", "format": "date-time"}),
    Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}),
    Param("cursor", "query", {"type": "string"}, "the nextCursor of the previous page"),
)

OPERATIONS: dict[Callable[..., Any], Op] = {
    health.healthz: Op("The process is up", "health", {200: {_JSON: "Health"}}),
    health.readyz: Op(
        "Each dependency answers",
        "health",
        {200: {_JSON: "Readiness"}, 503: {_JSON: "Readiness"}},
    ),
    health.metrics: Op("Prometheus metrics", "health", {200: {"text/plain": {"type": "string"}}}),
    ingress.post_events: Op(
        "Publish CloudEvents",
        "events",
        {202: {_JSON: "EventsAccepted"}},
        (400, 413, 415, 503),
        body={
            "application/cloudevents+json": "CloudEvent",
            "application/cloudevents-batch+json": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/CloudEvent"},
            },
            **_ANY_BODY,
        },
        params=(*_CE_HEADERS, *_TRACE),
        description=(
            "Structured (application/cloudevents+json), batch (application/cloudevents-batch+json)"
            " or binary mode (ce-* headers, any body and content type). Answered 202 once every"
            " invocation is in JetStream; a bad item rejects the whole batch."
        ),
    ),
    ingress.post_invocation: Op(
        "Invoke a function asynchronously",
        "invocations",
        {202: {_JSON: "InvocationQueued"}},
        (400, 404, 413, 503),
        body=_ANY_BODY,
        body_required=False,
        params=_INVOKE_HEADERS,
        description="Any body and content type: the function receives them unchanged.",
        ok_headers={202: {"Location": "/v1/invocations/{id}"}},
    ),
    ingress.post_async_function: Op(
        "Invoke a function asynchronously (OpenFaaS-compatible)",
        "invocations",
        {202: None},
        (400, 404, 413, 503),
        body=_ANY_BODY,
        body_required=False,
        params=_INVOKE_HEADERS,
        ok_headers={202: {"X-Call-Id": "the invocation id"}},
    ),
    ingress.get_invocation: Op(
        "An invocation's status", "invocations", {200: {_JSON: "Invocation"}}, (404, 503)
    ),
    resources.list_resources: Op(
        "List {kind}", "resources", {200: {_JSON: "ResourceList"}}, (503,)
    ),
    resources.get_resource: Op("Get a {Kind}", "resources", {200: {_JSON: "Resource"}}, (404, 503)),
    resources.put_resource: Op(
        "Create or replace a {Kind}",
        "resources",
        {200: {_JSON: "Resource"}, 201: {_JSON: "Resource"}},
        (400, 413, 503),
        body={_JSON: "{Kind}Document", "application/yaml": "{Kind}Document"},
        description="JSON, or YAML with any other content type. 201 created, 200 replaced.",
    ),
    resources.delete_resource: Op(
        "Delete a {Kind}",
        "resources",
        {204: None},
        (404, 409, 503),
        description="409 while another resource still refers to it.",
    ),
    resources.pause_resource: Op(
        "Pause a {Kind}", "resources", {200: {_JSON: "Resource"}}, (404, 503)
    ),
    resources.resume_resource: Op(
        "Resume a {Kind}", "resources", {200: {_JSON: "Resource"}}, (404, 503)
    ),
    resources.source_status: Op(
        "A Source's connector state",
        "resources",
        {200: {_JSON: "SourceStatus"}},
        (404, 409, 503),  # 409: the stored Source no longer validates
    ),
    resources.function_status: Op(
        "A Function's backlog",
        "resources",
        {200: {_JSON: "FunctionStatus"}},
        (404, 409, 503),  # 409: the stored Function no longer validates
    ),
    stats.function_stats: Op(
        "A Function's calls, failures, latency and backlog, per version",
        "resources",
        {200: {_JSON: "FunctionStats"}},
        (404, 503),
        description=(
            "Summed over every hub process: the last 5 minutes (1-second buckets), hour and"
            " 24 hours (1-minute buckets), in total and per version; the backlog is now."
        ),
    ),
    webhooks.post_webhook: Op(
        "MinIO webhook notification target",
        "sources",
        {200: {_JSON: "WebhookAccepted"}},
        (400, 401, 404, 413, 503),
        body={_JSON: {"type": "object", "properties": {"Records": {"type": "array"}}}},
        body_required=False,
        description="Authenticated by the Source's own authToken, not by a hub token.",
        security="sourceToken",
    ),
    deadletters.list_dead_letters: Op(
        "List dead letters",
        "dead-letters",
        {200: {_JSON: "DeadLetterPage"}},
        (400, 503),
        params=_FILTERS,
    ),
    deadletters.stats: Op(
        "Dead-letter counts", "dead-letters", {200: {_JSON: "DeadLetterStats"}}, (503,)
    ),
    deadletters.get_dead_letter: Op(
        "One dead letter", "dead-letters", {200: {_JSON: "DeadLetter"}}, (404, 503)
    ),
    deadletters.replay: Op(
        "Replay dead letters",
        "dead-letters",
        {200: {_JSON: "ReplayPreview"}, 202: {_JSON: "ReplayStarted"}},
        (400, 409, 413, 503),
        body={_JSON: "ReplayRequest"},
        description="200 with a preview when dryRun, else 202 with the job.",
        ok_headers={202: {"Location": "/v1/replay-jobs/{id}"}},
    ),
    deadletters.purge: Op(
        "Delete dead letters",
        "dead-letters",
        {200: {_JSON: "Purged"}},
        (400, 413, 503),
        body={_JSON: "PurgeRequest"},
    ),
    deadletters.resend: Op(
        "Send a dead letter to its dead-letter function again",
        "dead-letters",
        {200: {_JSON: "DeadLetter"}},
        (404, 409, 503),
    ),
    deadletters.list_jobs: Op(
        "Recent replay jobs", "dead-letters", {200: {_JSON: "ReplayJobList"}}, (503,)
    ),
    deadletters.get_job: Op(
        "One replay job", "dead-letters", {200: {_JSON: "ReplayJob"}}, (404, 503)
    ),
    deadletters.cancel_job: Op(
        "Stop a replay job", "dead-letters", {200: {_JSON: "ReplayJob"}}, (404, 503)
    ),
    rollouts.start: Op(
        "Start a canary rollout on an alias",
        "rollouts",
        {201: {_JSON: "Rollout"}},
        (400, 404, 409, 413, 503),
        body={_JSON: "RolloutRequest"},
        description=(
            "The alias must point at exactly one version (the stable one); `to` is another"
            " version of the function. 409 while another rollout runs (or is paused) on the"
            " alias."
        ),
        ok_headers={201: {"Location": "/v1/rollouts/{id}"}},
    ),
    rollouts.list_rollouts: Op(
        "Rollouts, newest first",
        "rollouts",
        {200: {_JSON: "RolloutList"}},
        (400, 503),
        params=(
            Param("function", "query", {"type": "string"}),
            Param(
                "state",
                "query",
                {"enum": ["running", "paused", "promoted", "rolled-back", "aborted"]},
            ),
            Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 500}),
        ),
    ),
    rollouts.get_rollout: Op(
        "One rollout, with each step's figures", "rollouts", {200: {_JSON: "Rollout"}}, (404, 503)
    ),
    rollouts.pause: Op(
        "Pause a rollout: the canary keeps its weight, nothing is judged",
        "rollouts",
        {200: {_JSON: "Rollout"}},
        (404, 409, 503),
    ),
    rollouts.resume: Op(
        "Resume a paused rollout: its step starts over",
        "rollouts",
        {200: {_JSON: "Rollout"}},
        (404, 409, 503),
    ),
    rollouts.abort: Op(
        "Abort a rollout: the alias goes back to the stable version",
        "rollouts",
        {200: {_JSON: "Rollout"}},
        (400, 404, 409, 413, 503),
        body={_JSON: "RolloutAbort"},
        body_required=False,
    ),
    flows.list_runs: Op(
        "A flow's runs, newest first",
        "flows",
        {200: {_JSON: "FlowRunList"}},
        (400, 404, 503),
        params=(
            Param("status", "query", {"enum": ["running", "succeeded", "failed"]}),
            Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 500}),
        ),
        description="404 when the flow is not declared and has no runs.",
    ),
    flows.get_run: Op(
        "One run of a flow, with every step it entered",
        "flows",
        {200: {_JSON: "FlowRunDetail"}},
        (400, 404, 503),
        description="The id, or its start when no other run's id starts the same way.",
    ),
    ui.page: Op("The dead-letter web page", "ui", {200: {"text/html": {"type": "string"}}}),
    ui.asset: Op(
        "A file of the web page",
        "ui",
        {
            200: {
                "text/html": {"type": "string"},
                "text/javascript": {"type": "string"},
                "text/css": {"type": "string"},
            }
        },
        (404,),
        path_params={"name": {"type": "string", "examples": ["index.html"]}},
    ),
}

# Path parameters, by name: what the handlers accept (anything else is a 404).
PATH_PARAMS: dict[str, Schema] = {
    "name": {"type": "string", "pattern": NAME_PATTERN, "examples": ["hello"]},
    "id": {"type": "string"},
}
