"""Where a run goes next: a pure function of the flow, the step just finished and its result.

:func:`advance` starts from the step after the one that finished (or from the first step),
evaluates choice steps there and then (they call nothing), and stops at the first step that
calls functions (a function step: one task; a parallel step: one task per branch), at the end
of the run (its output), or at a failure (no choice rule true and no default, a choice loop,
an input mapping without a value, too many steps). Each step a run enters takes the next
sequence number (``seq``), so a step entered twice (a cycle) is two records, and every id
derived from (run, seq, branch) is new.

A payload is a result as received (its bytes and media type); expressions see it as JSON
(:meth:`Payload.value`). A step without an input mapping receives the payload unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import orjson

from eventhub.flows.expr import MappingFailed, to_json_bytes
from eventhub.flows.spec import FlowPlan

MAX_STEPS = 1000  # steps one run may enter (cycles included): a runaway loop ends here
JSON = "application/json"
_JSON_MEDIA = re.compile(r"(?:application|text)/(?:[^/;\s]+\+)?json\s*(?:;.*)?", re.I | re.S)


@dataclass(frozen=True, slots=True)
class Payload:
    """A step's input or result: bytes and their media type, as they came."""

    body: bytes
    content_type: str | None = None

    def value(self) -> object:
        """As expressions see it: JSON parsed when the media type is JSON (or absent) and the
        body parses; any other body as text; no body: null."""
        if not self.body:
            return None
        if self.content_type is None or _JSON_MEDIA.fullmatch(self.content_type):
            try:
                return orjson.loads(self.body)
            except orjson.JSONDecodeError:
                pass
        return self.body.decode("utf-8", "replace")

    @classmethod
    def of_json(cls, value: object) -> Payload:
        return cls(to_json_bytes(value), JSON)


@dataclass(frozen=True, slots=True)
class Chosen:
    """A choice step evaluated: the step it chose (None: no rule was true, no default)."""

    seq: int
    step: str
    next: str | None


@dataclass(frozen=True, slots=True)
class Task:
    """One invocation to make: a function step's, or one branch of a parallel step's.
    ``as_given``: no mapping changed the payload the advance started from."""

    seq: int
    step: str
    branch: int | None
    target: str
    payload: Payload
    as_given: bool


@dataclass
class Next:
    """What a run does next: the choices made on the way, then tasks (the step entered at
    ``seq``), or the end (``output``), or a failure (``error``)."""

    chosen: list[Chosen] = field(default_factory=list)
    seq: int = 0
    step: str | None = None
    kind: str | None = None  # function | parallel
    tasks: list[Task] = field(default_factory=list)
    output: Payload | None = None
    error: str | None = None


def advance(plan: FlowPlan, finished: str | None, seq: int, payload: Payload) -> Next:
    """The next step after ``finished`` (None: the run starts), entered at ``seq``, given the
    result ``payload``."""
    nxt = Next(seq=seq)
    if finished is not None and finished not in plan.steps:
        nxt.error = f"the flow has no step '{finished}' any more"
        return nxt
    name = plan.first if finished is None else plan.after(finished)
    visited: set[str] = set()
    while True:
        if name is None:
            nxt.output = payload
            return nxt
        step = plan.steps.get(name)
        if step is None:
            nxt.error = f"the flow has no step '{name}' any more"
            return nxt
        if seq >= MAX_STEPS:
            nxt.error = f"the run entered {MAX_STEPS} steps: a loop that does not end?"
            return nxt
        if step.choice is None:
            break
        if name in visited:
            nxt.error = f"choice step '{name}' was reached again without a call: a loop"
            return nxt
        visited.add(name)
        data = payload.value()
        chosen = next(
            (
                rule.next
                for k, rule in enumerate(step.choice)
                if plan.conditions[(name, k)].evaluate(data)
            ),
            step.default,
        )
        nxt.chosen.append(Chosen(seq, name, chosen))
        seq += 1
        if chosen is None:
            nxt.error = f"no rule of choice step '{name}' is true, and it has no default"
            return nxt
        name = chosen
    nxt.seq, nxt.step, nxt.kind = seq, name, step.kind
    try:
        if step.parallel is None:
            assert step.function is not None  # noqa: S101 - a valid step has one kind
            nxt.tasks = [_task(plan, seq, name, None, step.function, payload)]
        else:
            nxt.tasks = [
                _task(plan, seq, name, b, branch.function, payload)
                for b, branch in enumerate(step.parallel)
            ]
    except MappingFailed as exc:
        nxt.tasks = []
        nxt.error = f"the input of step '{name}' has no value: {exc}"
    return nxt


def _task(
    plan: FlowPlan, seq: int, step: str, branch: int | None, target: str, payload: Payload
) -> Task:
    mapping = plan.mappings.get((step, branch))
    if mapping is None:
        return Task(seq, step, branch, target, payload, as_given=True)
    try:
        mapped = Payload.of_json(mapping.evaluate(payload.value()))
    except TypeError as exc:  # orjson's: a value JSON cannot hold
        raise MappingFailed(str(exc)) from None
    return Task(seq, step, branch, target, mapped, as_given=False)


def join(results: list[object]) -> Payload:
    """A parallel step's result: every branch's, in the order declared, as one JSON array."""
    return Payload.of_json(results)
