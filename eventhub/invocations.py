"""An invocation: one event for one function, as it travels through JetStream.

The NATS message uses the CloudEvents NATS binding in binary content mode: the event's attributes
are ``ce-*`` headers (Content-Type for ``datacontenttype``) and its data is the message body, byte
for byte. eventhub's own headers ride beside them:

=====================  ==========================================================================
``Nats-Msg-Id``        the invocation id: JetStream drops a second publish within its window
``Eh-Function``        the function to invoke
``Eh-Binding``         the binding that matched (absent for direct invocations)
``Eh-Callback``        URL that receives the outcome (``X-Callback-Url``)
``Eh-Dead-Letter``     set on a delivery to a dead-letter function: the dead letter's id
``Eh-Ordering-Key``    set by an ordered binding: the event's ``partitionkey`` (may be empty)
``Eh-Replay-Of``       set on a replay: the dead letter it replays
``Eh-Version``         the version to call, chosen at enqueue (absent: ``latest``)
``Eh-Alias``           the alias the version was chosen through, if any
``traceparent``        W3C trace context, passed on to the function
``Eh-Attempts``        on a retry: the attempts made before this message (absent: none)
``Eh-Enqueued``        on a retry: when the invocation was first enqueued (Unix ms)
``Eh-Due``             on a message waiting in the retry schedule: when it is due (Unix ms)
``Eh-Flow``            a step of a flow run (see :mod:`eventhub.flows`): the flow's name
``Eh-Run``             the run's id
``Eh-Step``            the step's name
``Eh-Seq``             the step's place in the run (0 for the first step entered)
``Eh-Branch``          a parallel step's branch (0, 1 ...); absent for other steps
``Eh-Deadline``        a branch's timeout: no attempt starts after this (Unix ms)
=====================  ==========================================================================

Invocation ids are deterministic: the same event (source + id) matched by the same binding always
gets the same id, so a redelivered event is deduplicated by JetStream instead of invoked twice.
"""

from __future__ import annotations

import base64
import hashlib
import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from eventhub.events import Event
from eventhub.ports import DeadLetterRecord
from eventhub.versions import LATEST

_IDS = uuid.UUID("6f1c2f7e-3a0b-4c55-9a52-5e0c6b1de001")
_IDS_BYTES = _IDS.bytes

H_MSG_ID = "Nats-Msg-Id"
H_INVOCATION_ID = "Eh-Invocation-Id"  # set when the message id differs (a released message)
H_FUNCTION = "Eh-Function"
H_BINDING = "Eh-Binding"
H_CALLBACK = "Eh-Callback"
H_DEAD_LETTER = "Eh-Dead-Letter"
H_ORDERING_KEY = "Eh-Ordering-Key"
H_REPLAY_OF = "Eh-Replay-Of"
H_VERSION = "Eh-Version"
H_ALIAS = "Eh-Alias"
H_TRACEPARENT = "traceparent"
H_TRACESTATE = "tracestate"
H_ATTEMPTS = "Eh-Attempts"
H_ENQUEUED = "Eh-Enqueued"
H_DUE = "Eh-Due"
H_FLOW = "Eh-Flow"
H_RUN = "Eh-Run"
H_STEP = "Eh-Step"
H_SEQ = "Eh-Seq"
H_BRANCH = "Eh-Branch"
H_DEADLINE = "Eh-Deadline"


def event_invocation_id(event: Event, binding: str) -> str:
    """``uuid5(_IDS, source NUL id NUL binding)``, without the UUID object (a hot path)."""
    name = f"{event.source}\x00{event.id}\x00{binding}".encode()
    raw = bytearray(hashlib.sha1(_IDS_BYTES + name, usedforsecurity=False).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50  # version 5
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    x = raw.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def keyed_invocation_id(function: str, idempotency_key: str, caller: str = "") -> str:
    """The id of a direct invocation with an ``Idempotency-Key``: one per (caller's token id,
    function, key), so one caller's key never answers for another's."""
    return str(uuid.uuid5(_IDS, f"key\x00{caller}\x00{function}\x00{idempotency_key}"))


_TRACE_IDS = random.Random()  # noqa: S311 - trace ids must be unique, not secret


def new_traceparent() -> str:
    """A new W3C trace context (from a fast PRNG: a syscall per event showed in profiles)."""
    return f"00-{_TRACE_IDS.getrandbits(128):032x}-{_TRACE_IDS.getrandbits(64):016x}-01"


@dataclass(frozen=True, slots=True)
class FlowContext:
    """Where an invocation stands in a flow run: the flow, the run, the step (its name and
    place in the run) and, for a parallel step, the branch. It rides with the invocation
    through retries, redeliveries, dead letters and replays."""

    flow: str
    run: str
    step: str
    seq: int
    branch: int | None = None
    deadline_ms: int | None = None  # a branch's timeout, as a time (Unix ms)

    def headers(self) -> dict[str, str]:
        headers = {H_FLOW: self.flow, H_RUN: self.run, H_STEP: self.step, H_SEQ: str(self.seq)}
        if self.branch is not None:
            headers[H_BRANCH] = str(self.branch)
        if self.deadline_ms is not None:
            headers[H_DEADLINE] = str(self.deadline_ms)
        return headers

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> FlowContext | None:
        run = headers.get(H_RUN)
        if not run:
            return None
        branch, deadline = headers.get(H_BRANCH), headers.get(H_DEADLINE)
        return cls(
            flow=headers.get(H_FLOW, ""),
            run=run,
            step=headers.get(H_STEP, ""),
            seq=int(headers.get(H_SEQ) or 0),
            branch=int(branch) if branch else None,
            deadline_ms=int(deadline) if deadline else None,
        )

    def to_json(self) -> dict[str, object]:
        """As a dead letter keeps it (the deadline is not kept: a replay has no timeout)."""
        return {
            "flow": self.flow,
            "run": self.run,
            "step": self.step,
            "seq": self.seq,
            "branch": self.branch,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> FlowContext:
        branch = doc.get("branch")
        return cls(
            flow=str(doc["flow"]),
            run=str(doc["run"]),
            step=str(doc["step"]),
            seq=int(str(doc.get("seq") or 0)),
            branch=int(str(branch)) if branch is not None else None,
        )


@dataclass(frozen=True, slots=True)
class Invocation:
    id: str
    function: str
    event: Event
    binding: str | None = None
    callback_url: str | None = None
    dead_letter_id: str | None = None
    traceparent: str = field(default_factory=new_traceparent)
    tracestate: str | None = None
    held: bool = False  # its binding is paused: kept aside until the binding resumes
    ordering_key: str | None = None  # set for an ordered binding
    replay_of: str | None = None  # the dead letter this invocation replays
    version: str = LATEST  # the version to call (no header: latest)
    alias: str | None = None  # the alias the version was chosen through
    flow: FlowContext | None = None  # set on a step of a flow run

    def headers(self) -> dict[str, str]:
        headers = self.event.binary_headers()
        headers[H_MSG_ID] = self.id
        headers[H_FUNCTION] = self.function
        headers[H_TRACEPARENT] = self.traceparent
        if self.ordering_key is not None:
            headers[H_ORDERING_KEY] = self.ordering_key
        for name, value in (
            (H_BINDING, self.binding),
            (H_CALLBACK, self.callback_url),
            (H_DEAD_LETTER, self.dead_letter_id),
            (H_REPLAY_OF, self.replay_of),
            (H_VERSION, self.version if self.version != LATEST else None),
            (H_ALIAS, self.alias),
            (H_TRACESTATE, self.tracestate),
        ):
            if value:
                headers[name] = value
        if self.flow is not None:
            headers.update(self.flow.headers())
        return headers

    @classmethod
    def from_message(cls, headers: Mapping[str, str], data: bytes) -> Invocation:
        return cls(
            id=headers.get(H_INVOCATION_ID) or headers[H_MSG_ID],
            function=headers[H_FUNCTION],
            event=Event.from_binary_headers(headers, data),
            binding=headers.get(H_BINDING),
            callback_url=headers.get(H_CALLBACK),
            dead_letter_id=headers.get(H_DEAD_LETTER),
            traceparent=headers.get(H_TRACEPARENT) or new_traceparent(),
            tracestate=headers.get(H_TRACESTATE),
            ordering_key=headers.get(H_ORDERING_KEY),
            replay_of=headers.get(H_REPLAY_OF),
            version=headers.get(H_VERSION) or LATEST,
            alias=headers.get(H_ALIAS),
            flow=FlowContext.from_headers(headers) if H_RUN in headers else None,
        )


def to_dead_letter_function(
    record: DeadLetterRecord,
    function_url: str,
    invocation_id: str,
    *,
    traceparent: str | None = None,
    tracestate: str | None = None,
) -> Invocation:
    """The delivery of a dead letter to its dead-letter function: the original event with
    error extensions (Knative's ``knativeerror*`` are the model)."""
    last = record.attempts[-1] if record.attempts else {}
    extensions = {
        "eventhuberrorcode": record.error_code,
        "eventhuberrordest": function_url,
        "eventhuberrordata": base64.b64encode(str(last.get("response") or "").encode()).decode(),
        "eventhubattempts": str(len(record.attempts)),
        "eventhubdeadletter": record.id,
        "eventhubfunction": record.function or "",
        "eventhubreason": record.reason,
    }
    return Invocation(
        id=invocation_id,
        function=record.dead_letter_function or "",
        event=record.event.with_extensions(**extensions),
        binding=record.binding,
        dead_letter_id=record.id,
        traceparent=traceparent or new_traceparent(),
        tracestate=tracestate,
    )
