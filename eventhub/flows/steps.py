"""A step of a run as an invocation: its ids, and the event its function receives.

Ids derive from what identifies them, so that whatever is published again after a crash is the
same message, which JetStream drops: a run's id from its trigger event (source and id) and the
binding that matched it; a step invocation's from the run, the step's place in it (``seq``)
and the branch.

What a step's function receives:

- a step given its input unchanged at the start of a run (no ``input`` mapping, perhaps after
  choices) receives the trigger event itself;
- any other step receives an event of the flow: ``type`` :data:`STEP_TYPE`, ``source``
  ``/eventhub/flows/<flow>``, ``subject`` the step's name, ``id`` the invocation's, and as data
  its input: the result of the step before as it came (bytes and Content-Type), the JSON its
  mapping computed, or a parallel step's join (a JSON array).

Both carry the extensions ``eventhubflow``, ``eventhubrun`` and ``eventhubstep``; the flow's
own events also ``eventhubcauseid`` and ``eventhubcausesource`` (the trigger event's id and
source).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from eventhub.events import Event, now_rfc3339
from eventhub.flows.plan import Task
from eventhub.flows.store import Run
from eventhub.invocations import FlowContext, Invocation, new_traceparent

_IDS = uuid.UUID("3f6a1d52-8c4e-4b0f-9a7d-21e5c8b4f0a3")
STEP_TYPE = "eventhub.flow.step"


def run_id(event: Event, binding: str) -> str:
    """The same event routed by the same binding starts one run, however often it comes."""
    return str(uuid.uuid5(_IDS, f"run\x00{event.source}\x00{event.id}\x00{binding}"))


def step_invocation_id(run: str, seq: int, branch: int | None) -> str:
    return str(uuid.uuid5(_IDS, f"step\x00{run}\x00{seq}\x00{-1 if branch is None else branch}"))


@dataclass(frozen=True, slots=True)
class Origin:
    """What the invocations of the next step inherit: the trigger event (at the start of a
    run), whether they wait for a paused binding, and the trace."""

    trigger: Event | None
    traceparent: str | None
    tracestate: str | None
    held: bool = False


def step_invocation(run: Run, task: Task, origin: Origin, timeout: float | None) -> Invocation:
    """The invocation of ``task``, its function still a target (``f``, ``f:v``, ``f:alias``):
    the caller aims it at a version. A branch of a step with a ``timeout`` gets its deadline."""
    inv_id = step_invocation_id(run.id, task.seq, task.branch)
    deadline = None
    if timeout is not None and task.branch is not None:
        deadline = int((time.time() + timeout) * 1000)
    context = FlowContext(run.flow, run.id, task.step, task.seq, task.branch, deadline)
    marks = {"eventhubflow": run.flow, "eventhubrun": run.id, "eventhubstep": task.step}
    if task.as_given and origin.trigger is not None:
        event = origin.trigger.with_extensions(**marks)
    else:
        attributes = {
            "specversion": "1.0",
            "id": inv_id,
            "source": f"/eventhub/flows/{run.flow}",
            "type": STEP_TYPE,
            "subject": task.step,
            "time": now_rfc3339(),
            "eventhubcauseid": run.trigger_id,
            "eventhubcausesource": run.trigger_source,
            **marks,
        }
        if task.payload.content_type:
            attributes["datacontenttype"] = task.payload.content_type
        event = Event(attributes, task.payload.body)
    return Invocation(
        id=inv_id,
        function=task.target,
        event=event,
        binding=run.binding,
        traceparent=origin.traceparent or new_traceparent(),
        tracestate=origin.tracestate,
        held=origin.held,
        flow=context,
    )
