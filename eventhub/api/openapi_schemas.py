"""The component schemas of ``/openapi.json``.

The resource specs are generated from the pydantic models that validate them
(:mod:`eventhub.resources`, :mod:`eventhub.sourcespecs`), so a field added to a model appears
here by itself. The human units those models parse before validating (durations, sizes, rates)
are described as what a caller writes (``30s``, ``1MiB``, ``50/s``), not as the number they
become. The answers' schemas are written by hand: they name the fields every answer carries and
allow more, so that a field added to an answer is not a breaking change of the document.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from dlq.store import STATUSES
from eventhub.resources import API_VERSION, NAME_PATTERN, SPEC_ADAPTERS, Kind
from eventhub.units import parse_duration, parse_size

Schema = dict[str, Any]

DURATION: Schema = {
    "description": "seconds, or a duration such as 250ms, 30s, 1m30s, 2h, 7d",
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$"},
    ],
}
SIZE: Schema = {
    "description": "bytes, or a size such as 512KiB or 1MB",
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": "^[0-9]+(B|KB|KiB|MB|MiB|GB|GiB)?$"},
    ],
}
RATE: Schema = {
    "description": "calls per period, spaced evenly: 50/s, 600/m, 10/5s",
    "anyOf": [
        {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?/[0-9]*(ms|s|m|h|d)$"},
        {"type": "null"},
    ],
}


class _Written(GenerateJsonSchema):
    """JSON Schema of what a user writes: a unit parsed before validation is shown as text."""

    def function_before_schema(
        self, schema: core_schema.BeforeValidatorFunctionSchema
    ) -> JsonSchemaValue:
        function = schema["function"]["function"]
        if function is parse_duration:
            return dict(DURATION)
        if function is parse_size:
            return dict(SIZE)
        if getattr(function, "__name__", "") == "_parse_rate":
            return dict(RATE)
        return super().function_before_schema(schema)


def _spec(kind: Kind) -> tuple[Schema, dict[str, Schema]]:
    """A kind's spec schema, with its ``$defs`` moved to the components."""
    ref = "#/components/schemas/{model}"
    schema = SPEC_ADAPTERS[kind].json_schema(
        by_alias=True, ref_template=ref, schema_generator=_Written
    )
    defs = schema.pop("$defs", {})
    return schema, defs


def _document(kind: Kind, spec: Schema) -> Schema:
    return {
        "type": "object",
        "description": f"a {kind.value}; metadata.name, if given, must be the path's name",
        "required": ["spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": API_VERSION},
            "kind": {"const": kind.value},
            "metadata": {"$ref": "#/components/schemas/Metadata"},
            "spec": spec,
            "status": {"type": "object", "description": "read-only: ignored when written"},
        },
    }


def _obj(required: list[str], **properties: Schema) -> Schema:
    return {"type": "object", "required": required, "properties": properties}


_STR: Schema = {"type": "string"}
_INT: Schema = {"type": "integer"}
_TIME: Schema = {"type": "string", "format": "date-time"}
_OPT_STR: Schema = {"type": ["string", "null"]}
_OPT_NUM: Schema = {"type": ["number", "null"], "minimum": 0}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _list(name: str) -> Schema:
    return {"type": "array", "items": _ref(name)}


_CLOUD_EVENT: Schema = {
    "type": "object",
    "description": "a CloudEvent 1.0 in the JSON event format",
    "required": ["specversion", "id", "source", "type"],
    "properties": {
        "specversion": {"const": "1.0"},
        "id": {"type": "string", "minLength": 1},
        "source": {"type": "string", "minLength": 1},
        "type": {"type": "string", "minLength": 1},
        "subject": _STR,
        "time": _TIME,
        "datacontenttype": _STR,
        "dataschema": _STR,
        "data": {},
        "data_base64": {"type": "string", "contentEncoding": "base64"},
    },
}

_FIXED: dict[str, Schema] = {
    "Problem": {
        "type": "object",
        "description": "an RFC 9457 problem document",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": _STR,
            "title": _STR,
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": _STR,
            "errors": {
                "type": "array",
                "items": _obj(["field", "message"], field=_STR, message=_STR),
            },
        },
    },
    "Metadata": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "pattern": NAME_PATTERN},
            "labels": {"type": "object", "additionalProperties": _STR},
        },
    },
    "Resource": _obj(
        ["apiVersion", "kind", "metadata", "spec"],
        apiVersion={"const": API_VERSION},
        kind={"enum": [k.value for k in Kind]},
        metadata=_obj(["name"], name=_STR, labels={"type": "object"}),
        spec={"type": "object", "description": "as it was written"},
        status=_obj(["paused"], paused={"type": "boolean"}),
    ),
    "ResourceList": _obj(["items"], items=_list("Resource")),
    "CloudEvent": _CLOUD_EVENT,
    "EventsAccepted": _obj(
        ["accepted", "invocations"],
        accepted=_INT,
        invocations={
            "type": "array",
            "items": _obj(
                ["id", "function", "binding", "eventId"],
                id=_STR,
                function=_STR,
                binding=_STR,
                eventId=_STR,
            ),
        },
    ),
    "InvocationQueued": _obj(
        ["id", "function", "version", "status"],
        id=_STR,
        function=_STR,
        version=_STR,
        status={"const": "queued"},
    ),
    "Invocation": _obj(
        ["id", "status", "attempts", "history"],
        id=_STR,
        status={"enum": ["queued", "running", "retrying", "succeeded", "dead-lettered", "failed"]},
        function=_STR,
        attempts=_INT,
        lastStatus={"type": ["integer", "null"]},
        lastError=_OPT_STR,
        history={"type": "array", "items": {"type": "object"}},
    ),
    "FunctionStatus": _obj(
        ["name", "paused", "maxConcurrency", "queued", "inFlight", "retrying"],
        name=_STR,
        paused={"type": "boolean"},
        maxConcurrency=_INT,
        queued=_INT,
        inFlight=_INT,
        retrying=_INT,
    ),
    "StatsFigures": _obj(
        [
            "invocations",
            "successes",
            "failures",
            "retries",
            "deadLetters",
            "errorRate",
            "p50Ms",
            "p95Ms",
            "p99Ms",
        ],
        invocations=_INT,
        successes=_INT,
        failures=_INT,
        retries=_INT,
        deadLetters=_INT,
        errorRate={"type": "number", "minimum": 0, "maximum": 1},
        p50Ms=_OPT_NUM,
        p95Ms=_OPT_NUM,
        p99Ms=_OPT_NUM,
    ),
    "StatsWindow": _obj(
        ["seconds", "total", "versions"],
        seconds=_INT,
        total=_ref("StatsFigures"),
        versions={"type": "object", "additionalProperties": _ref("StatsFigures")},
    ),
    "FunctionStats": _obj(
        ["name", "backlog", "windows"],
        name=_STR,
        backlog=_obj(
            ["queued", "inFlight", "retrying", "oldestWaitingSeconds"],
            queued=_INT,
            inFlight=_INT,
            retrying=_INT,
            oldestWaitingSeconds=_OPT_NUM,
        ),
        windows=_obj(["5m", "1h", "24h"], **{w: _ref("StatsWindow") for w in ("5m", "1h", "24h")}),
    ),
    "SourceStatus": _obj(
        ["name", "type", "paused", "state", "processes"],
        name=_STR,
        type=_STR,
        paused={"type": "boolean"},
        state=_STR,
        processes={"type": "array", "items": {"type": "object"}},
    ),
    "DeadLetter": _obj(
        ["id", "status", "reason", "attempts", "event"],
        id=_STR,
        function=_OPT_STR,
        version=_STR,
        binding=_OPT_STR,
        source=_OPT_STR,
        status={"enum": list(STATUSES)},
        reason=_STR,
        errorCode=_OPT_STR,
        attempts={"type": "array", "items": {"type": "object"}},
        failedAt=_TIME,
        deadLetterFunction={"type": "object"},
        event={"type": "object"},
        flow={
            "anyOf": [
                _obj(
                    ["flow", "run", "step", "seq"],
                    flow=_STR,
                    run=_STR,
                    step=_STR,
                    seq=_INT,
                    branch={"type": ["integer", "null"]},
                ),
                {"type": "null"},
            ],
            "description": "a flow step's: where it stood in its run (a replay goes on from it)",
        },
    ),
    "DeadLetterPage": _obj(["items", "nextCursor"], items=_list("DeadLetter"), nextCursor=_OPT_STR),
    "DeadLetterStats": _obj(
        ["total", "byFunction", "byError", "hourly"],
        total=_INT,
        oldest={"type": ["string", "null"]},
        newest={"type": ["string", "null"]},
        byFunction={"type": "array", "items": {"type": "object"}},
        byError={"type": "array", "items": {"type": "object"}},
        hourly={"type": "array", "items": {"type": "object"}},
    ),
    "DeadLetterFilter": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "function": _STR,
            "version": _STR,
            "binding": _STR,
            "source": _STR,
            "status": {"enum": list(STATUSES)},
            "errorCode": _STR,
            "reason": _STR,
            "since": _TIME,
            "until": _TIME,
        },
    },
    "ReplayRequest": {
        "type": "object",
        "description": "either ids or filter; to: another function; rate: 50/s by default",
        "additionalProperties": False,
        "properties": {
            "ids": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "uuid"}},
            "filter": _ref("DeadLetterFilter"),
            "to": _STR,
            "rate": {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?/[0-9]*(ms|s|m|h|d)$"},
            "dryRun": {"type": "boolean"},
        },
    },
    "PurgeRequest": {
        "type": "object",
        "description": "either ids or filter",
        "additionalProperties": False,
        "properties": {
            "ids": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "uuid"}},
            "filter": _ref("DeadLetterFilter"),
            "dryRun": {"type": "boolean"},
        },
    },
    "ReplayPreview": _obj(["count", "sample"], count=_INT, sample={"type": "array"}),
    "ReplayJob": _obj(
        ["id", "status", "total", "processed"],
        id=_STR,
        status=_STR,
        to=_OPT_STR,
        rate={"type": "number"},
        total=_INT,
        processed=_INT,
        published=_INT,
        skipped=_INT,
        succeeded=_INT,
        failed=_INT,
        error=_OPT_STR,
        createdAt=_STR,
        updatedAt=_STR,
    ),
    "ReplayStarted": _obj(["job"], job=_ref("ReplayJob")),
    "ReplayJobList": _obj(["items"], items=_list("ReplayJob")),
    "Purged": {
        "oneOf": [
            _obj(["purged"], purged=_INT),
            _obj(["count"], count=_INT),
        ]
    },
    "RolloutRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": ["alias", "to"],
        "properties": {
            "alias": {**_STR, "description": "points at exactly one version: the stable one"},
            "to": {**_STR, "description": "the canary: another version of the function"},
            "steps": {
                "type": "array",
                "description": "the canary's weight at each step, increasing; 10, 25, 50, 100",
                "minItems": 1,
                "maxItems": 20,
                "items": {"type": "integer", "minimum": 1, "maximum": 100},
            },
            "interval": {**DURATION, "description": "each step lasts at least this; 1m"},
            "analysis": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "maxErrorRate": {"type": "number", "minimum": 0, "maximum": 1},
                    "maxLatencyRatio": {"type": "number", "minimum": 1, "maximum": 1000},
                    "minCalls": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
                },
            },
            "onRollback": {"enum": ["stable", "dead-letter"]},
        },
    },
    "RolloutAbort": {
        "type": "object",
        "additionalProperties": False,
        "properties": {"reason": {"type": "string", "maxLength": 500}},
    },
    "RolloutFigures": _obj(
        ["calls", "errors", "errorRate", "p95Ms"],
        calls=_INT,
        errors=_INT,
        errorRate={"type": "number", "minimum": 0, "maximum": 1},
        p95Ms=_OPT_NUM,
    ),
    "RolloutStep": _obj(
        ["step", "weight", "startedAt", "endedAt", "verdict", "canary", "stable", "reason"],
        step=_INT,
        weight=_INT,
        startedAt=_TIME,
        endedAt=_TIME,
        verdict={"enum": ["held", "broke", "paused", "aborted"]},
        canary={"anyOf": [_ref("RolloutFigures"), {"type": "null"}]},
        stable={"anyOf": [_ref("RolloutFigures"), {"type": "null"}]},
        baseline={
            "enum": ["step", "rollout", None],
            "description": "the stable figures compared: the step's, or since the rollout began",
        },
        reason=_OPT_STR,
    ),
    "Rollout": _obj(
        [
            "id",
            "function",
            "alias",
            "stable",
            "canary",
            "steps",
            "interval",
            "analysis",
            "onRollback",
            "state",
            "step",
            "weight",
            "stepStartedAt",
            "reason",
            "history",
            "createdAt",
            "updatedAt",
        ],
        id=_STR,
        function=_STR,
        alias=_STR,
        stable=_STR,
        canary=_STR,
        steps={"type": "array", "items": _INT},
        interval={"type": "number", "description": "seconds"},
        analysis=_obj(
            ["maxErrorRate", "maxLatencyRatio", "minCalls"],
            maxErrorRate={"type": "number"},
            maxLatencyRatio={"type": "number"},
            minCalls=_INT,
        ),
        onRollback={"enum": ["stable", "dead-letter"]},
        state={"enum": ["running", "paused", "promoted", "rolled-back", "aborted"]},
        step={"type": "integer", "description": "index into steps"},
        weight={"type": "integer", "minimum": 0, "maximum": 100, "description": "the canary's"},
        stepStartedAt=_TIME,
        reason=_OPT_STR,
        history=_list("RolloutStep"),
        createdAt=_TIME,
        updatedAt=_TIME,
    ),
    "RolloutList": _obj(["items"], items=_list("Rollout")),
    "FlowRun": _obj(
        ["id", "flow", "status", "triggerEventId", "startedAt", "updatedAt", "endedAt"],
        id=_STR,
        flow=_STR,
        binding=_OPT_STR,
        status={"enum": ["running", "succeeded", "failed"]},
        triggerEventId=_STR,
        triggerEvent=_obj(["id", "source", "type"], id=_STR, source=_STR, type=_STR),
        error=_OPT_STR,
        output={**_OPT_STR, "description": "the first KiB of the run's output"},
        startedAt=_TIME,
        updatedAt=_TIME,
        endedAt={"type": ["string", "null"], "format": "date-time"},
    ),
    "FlowStep": _obj(
        ["seq", "name", "kind", "branch", "status", "attempts", "queuedAt"],
        seq={"type": "integer", "description": "its place in the run, from 0"},
        name=_STR,
        kind={"enum": ["function", "choice", "parallel", "branch"]},
        branch={"type": ["integer", "null"], "description": "a parallel step's branch"},
        status={"enum": ["running", "succeeded", "failed"]},
        function=_OPT_STR,
        version=_OPT_STR,
        attempts=_INT,
        queuedAt=_TIME,
        startedAt={"type": ["string", "null"], "format": "date-time"},
        endedAt={"type": ["string", "null"], "format": "date-time"},
        durationMs=_OPT_NUM,
        output={**_OPT_STR, "description": "the first KiB of its result"},
        error=_OPT_STR,
        deadLetterId=_OPT_STR,
    ),
    "FlowRunDetail": {
        "allOf": [
            _ref("FlowRun"),
            _obj(["steps"], steps=_list("FlowStep")),
        ]
    },
    "FlowRunList": _obj(["items"], items=_list("FlowRun")),
    "WebhookAccepted": _obj(["accepted"], accepted=_INT),
    "Health": _obj(["status"], status={"const": "ok"}),
    "Readiness": _obj(
        ["status", "checks"],
        status={"enum": ["ready", "not ready"]},
        checks={"type": "object", "additionalProperties": _STR},
    ),
}


def components() -> dict[str, Schema]:
    """Every component schema: the fixed ones, then one document and spec per resource kind."""
    schemas = dict(_FIXED)
    for kind in Kind:
        spec, defs = _spec(kind)
        schemas.update(defs)
        schemas[f"{kind.value}Spec"] = spec
        schemas[f"{kind.value}Document"] = _document(kind, _ref(f"{kind.value}Spec"))
    return schemas
