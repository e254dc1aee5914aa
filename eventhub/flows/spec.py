"""The Flow resource: functions chained into runs by steps.

::

    kind: Flow
    metadata: {name: uploads}
    spec:
      steps:                        # a step without `next` goes on to the one listed after it
        - name: scan
          function: scanner         # a target: f, f:version, f:alias
          input: "data.object"      # optional: what the step receives, from the result before
        - name: route
          choice:
            - {when: "data.infected == true", next: quarantine}
          default: thumbs           # optional: no rule true and no default fails the run
        - name: thumbs
          parallel:                 # every branch at once; the join is a JSON array
            - {function: thumb-small}
            - {function: thumb-large, input: "data"}
          timeout: 30s              # a branch is given up at its next attempt past this
          onBranchFailure: fail     # or continue: the join carries the branch's error
          next: store
        - {name: quarantine, function: quarantine, end: true}
        - {name: store, function: store}

The models check each field's shape; :func:`problems` checks the flow as a whole, each problem
at its field: names declared twice, a step with none or several of ``function``, ``choice`` and
``parallel`` (or a field that does not apply to its kind), ``next``/``default`` naming no step,
expressions that do not compile (with their position), and steps the first one cannot reach
(cycles are allowed: a run is bounded by :data:`eventhub.flows.plan.MAX_STEPS`). That a named
function exists is the store's check, when the flow is written.

This module imports nothing of :mod:`eventhub.resources`, which imports it.
"""

from __future__ import annotations

import functools
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from eventhub.errors import FieldProblem
from eventhub.flows.expr import (
    Condition,
    ExpressionError,
    Mapping,
    compile_condition,
    compile_mapping,
)
from eventhub.units import parse_duration

_NAME = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
STEP_NAME = rf"^{_NAME}$"
TARGET = rf"^{_NAME}(:{_NAME})?$"  # as eventhub.resources.TARGET_PATTERN
MAX_DECLARED_STEPS = 200
MAX_BRANCHES = 64
KINDS = ("function", "choice", "parallel")

Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Spec(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class BranchSpec(_Spec):
    function: str = Field(pattern=TARGET)
    input: str | None = None


class ChoiceRule(_Spec):
    when: str
    next: str = Field(pattern=STEP_NAME)


class StepSpec(_Spec):
    name: str = Field(pattern=STEP_NAME)
    function: str | None = Field(default=None, pattern=TARGET)
    choice: list[ChoiceRule] | None = Field(default=None, min_length=1)
    parallel: list[BranchSpec] | None = Field(default=None, min_length=1, max_length=MAX_BRANCHES)
    input: str | None = None
    default: str | None = Field(default=None, pattern=STEP_NAME)
    timeout: Duration | None = None
    on_branch_failure: Literal["fail", "continue"] | None = None
    next: str | None = Field(default=None, pattern=STEP_NAME)
    end: bool = False

    @field_validator("timeout")
    @classmethod
    def _positive(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ValueError("must be positive")
        return value

    @property
    def kind(self) -> str:
        """function, choice or parallel (valid steps have exactly one)."""
        if self.choice is not None:
            return "choice"
        return "parallel" if self.parallel is not None else "function"

    @property
    def continues_on_failure(self) -> bool:
        return self.on_branch_failure == "continue"


class FlowSpec(_Spec):
    steps: list[StepSpec] = Field(min_length=1, max_length=MAX_DECLARED_STEPS)

    @functools.cached_property
    def plan(self) -> FlowPlan:
        """The flow compiled for running (valid specs only: see :func:`problems`)."""
        return FlowPlan(self)


class FlowPlan:
    """A valid flow, ready to run: steps by name, what follows each, expressions compiled."""

    def __init__(self, spec: FlowSpec) -> None:
        self.steps = {step.name: step for step in spec.steps}
        self.first = spec.steps[0].name
        self._after: dict[str, str | None] = {}
        order = [step.name for step in spec.steps]
        for index, step in enumerate(spec.steps):
            if step.next is not None:
                self._after[step.name] = step.next
            elif step.end or index + 1 == len(order):
                self._after[step.name] = None
            else:
                self._after[step.name] = order[index + 1]
        self.conditions: dict[tuple[str, int], Condition] = {}
        self.mappings: dict[tuple[str, int | None], Mapping] = {}
        for index, step in enumerate(spec.steps):
            base = f"spec.steps[{index}]"
            for k, rule in enumerate(step.choice or ()):
                self.conditions[(step.name, k)] = compile_condition(
                    rule.when, f"{base}.choice[{k}].when"
                )
            if step.input is not None:
                self.mappings[(step.name, None)] = compile_mapping(step.input, f"{base}.input")
            for b, branch in enumerate(step.parallel or ()):
                if branch.input is not None:
                    self.mappings[(step.name, b)] = compile_mapping(
                        branch.input, f"{base}.parallel[{b}].input"
                    )

    def after(self, step: str) -> str | None:
        """The step a function or parallel step goes on to; None: the run ends there."""
        return self._after.get(step)


def targets(spec: FlowSpec) -> list[tuple[str, str]]:
    """Every function target with the field that names it."""
    found: list[tuple[str, str]] = []
    for i, step in enumerate(spec.steps):
        if step.function is not None:
            found.append((f"spec.steps[{i}].function", step.function))
        for b, branch in enumerate(step.parallel or ()):
            found.append((f"spec.steps[{i}].parallel[{b}].function", branch.function))
    return found


# Fields that belong to one kind of step only, and the kinds they are refused on.
_ONLY_ON = {
    "input": ("input", ("function",)),
    "default": ("default", ("choice",)),
    "timeout": ("timeout", ("parallel",)),
    "on_branch_failure": ("onBranchFailure", ("parallel",)),
    "next": ("next", ("function", "parallel")),
    "end": ("end", ("function", "parallel")),
}
_HINTS = {
    ("input", "parallel"): " (give each branch its input)",
    ("input", "choice"): " (a choice passes its input on unchanged)",
    ("next", "choice"): " (a choice goes where its rules say, or to its default)",
    ("end", "choice"): " (a choice goes where its rules say, or to its default)",
}


def problems(spec: FlowSpec) -> list[FieldProblem]:
    """What is wrong with a flow as a whole, each problem at its field (empty: it is valid)."""
    found: list[FieldProblem] = []
    seen: dict[str, int] = {}
    for i, step in enumerate(spec.steps):
        if step.name in seen:
            found.append(
                FieldProblem(
                    f"spec.steps[{i}].name",
                    f"'{step.name}' is declared twice (spec.steps[{seen[step.name]}] too)",
                )
            )
        else:
            seen[step.name] = i
    for i, step in enumerate(spec.steps):
        found.extend(_step_problems(i, step, seen))
    if not found:
        found.extend(_unreachable(spec))
    return found


def _step_problems(i: int, step: StepSpec, names: dict[str, int]) -> list[FieldProblem]:
    base = f"spec.steps[{i}]"
    given = [k for k in KINDS if getattr(step, k) is not None]
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        message = f"has {what}: give exactly one of function, choice or parallel"
        return [FieldProblem(base, message)]
    kind = given[0]
    found: list[FieldProblem] = []
    for attribute, (field, kinds) in _ONLY_ON.items():
        value = getattr(step, attribute)
        if value is None or value is False or kind in kinds:
            continue
        hint = _HINTS.get((field, kind), "")
        found.append(FieldProblem(f"{base}.{field}", f"does not apply to a {kind} step{hint}"))
    if step.next is not None and step.end:
        found.append(FieldProblem(f"{base}.end", "a step with next does not end the run"))
    references = [(f"{base}.next", step.next), (f"{base}.default", step.default)]
    references += [(f"{base}.choice[{k}].next", r.next) for k, r in enumerate(step.choice or ())]
    for path, name in references:
        if name is not None and name not in names:
            found.append(FieldProblem(path, f"no step is named '{name}'"))
    found.extend(_expression_problems(base, step))
    return found


def _expression_problems(base: str, step: StepSpec) -> list[FieldProblem]:
    found: list[FieldProblem] = []
    checks: list[tuple[str, str, bool]] = [
        (f"{base}.choice[{k}].when", rule.when, True) for k, rule in enumerate(step.choice or ())
    ]
    if step.input is not None:
        checks.append((f"{base}.input", step.input, False))
    checks += [
        (f"{base}.parallel[{b}].input", branch.input, False)
        for b, branch in enumerate(step.parallel or ())
        if branch.input is not None
    ]
    for path, text, condition in checks:
        try:
            if condition:
                compile_condition(text, path)
            else:
                compile_mapping(text, path)
        except ExpressionError as exc:
            found.append(FieldProblem(exc.path, exc.message))
    return found


def successors(spec: FlowSpec, index: int) -> list[str]:
    """The steps a run may go to from ``spec.steps[index]``."""
    step = spec.steps[index]
    if step.choice is not None:
        following = [rule.next for rule in step.choice]
        return following + ([step.default] if step.default is not None else [])
    if step.next is not None:
        return [step.next]
    if step.end or index + 1 == len(spec.steps):
        return []
    return [spec.steps[index + 1].name]


def _unreachable(spec: FlowSpec) -> list[FieldProblem]:
    index = {step.name: i for i, step in enumerate(spec.steps)}
    reached = {0}
    waiting = [0]
    while waiting:
        for name in successors(spec, waiting.pop()):
            if index[name] not in reached:
                reached.add(index[name])
                waiting.append(index[name])
    first = spec.steps[0].name
    return [
        FieldProblem(
            f"spec.steps[{i}]",
            f"step '{step.name}' cannot be reached from the first step '{first}'",
        )
        for i, step in enumerate(spec.steps)
        if i not in reached
    ]
