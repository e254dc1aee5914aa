"""Where a run goes next: choices evaluated on the spot, input mappings, the join, the end,
and the failures that stop a run (no rule true, a choice loop, a mapping without a value)."""

from __future__ import annotations

from typing import Any

import orjson

from eventhub.events import Event
from eventhub.flows.plan import MAX_STEPS, Payload, advance, join
from eventhub.flows.spec import FlowPlan, FlowSpec
from eventhub.invocations import FlowContext, Invocation


def plan(*steps: dict[str, Any]) -> FlowPlan:
    return FlowSpec.model_validate({"steps": list(steps)}).plan


def js(value: Any) -> Payload:
    return Payload(orjson.dumps(value), "application/json")


UPLOADS = plan(
    {"name": "scan", "function": "scanner", "input": "data.object"},
    {
        "name": "route",
        "choice": [{"when": "data.infected == true", "next": "quarantine"}],
        "default": "thumbs",
    },
    {
        "name": "thumbs",
        "parallel": [
            {"function": "thumb", "input": "{'size': 'small', 'key': data.key}"},
            {"function": "thumb:v2"},
        ],
        "next": "store",
    },
    {"name": "quarantine", "function": "quarantine", "end": True},
    {"name": "store", "function": "store"},
)


def test_the_first_step_gets_the_trigger_through_its_mapping() -> None:
    nxt = advance(UPLOADS, None, 0, js({"object": {"key": "a", "infected": False}}))
    assert (nxt.seq, nxt.step, nxt.kind) == (0, "scan", "function")
    [task] = nxt.tasks
    assert (task.target, task.branch, task.as_given) == ("scanner", None, False)
    assert orjson.loads(task.payload.body) == {"key": "a", "infected": False}
    assert task.payload.content_type == "application/json"


def test_a_choice_is_evaluated_there_and_then() -> None:
    clean = advance(UPLOADS, "scan", 1, js({"key": "a", "infected": False}))
    assert [(c.seq, c.step, c.next) for c in clean.chosen] == [(1, "route", "thumbs")]
    assert (clean.seq, clean.step, clean.kind) == (2, "thumbs", "parallel")
    small, large = clean.tasks
    assert orjson.loads(small.payload.body) == {"size": "small", "key": "a"}
    assert (large.target, large.branch, large.as_given) == ("thumb:v2", 1, True)
    infected = advance(UPLOADS, "scan", 1, js({"key": "a", "infected": True}))
    assert (infected.seq, infected.step) == (2, "quarantine")
    [task] = infected.tasks
    assert task.as_given and orjson.loads(task.payload.body)["infected"] is True


def test_the_end_of_the_run_carries_the_last_result() -> None:
    done = advance(UPLOADS, "quarantine", 3, js({"ok": 1}))
    assert done.output == js({"ok": 1}) and not done.tasks and done.error is None
    last = advance(UPLOADS, "store", 4, js(2))
    assert last.output == js(2)


def test_no_rule_true_and_no_default_fails_the_run() -> None:
    p = plan(
        {"name": "a", "function": "f"},
        {"name": "pick", "choice": [{"when": "data == 1", "next": "a"}]},
    )
    nxt = advance(p, "a", 1, js(2))
    assert [(c.step, c.next) for c in nxt.chosen] == [("pick", None)]
    assert nxt.error == "no rule of choice step 'pick' is true, and it has no default"


def test_a_rule_that_errors_is_not_true() -> None:
    p = plan(
        {"name": "a", "function": "f"},
        {"name": "pick", "choice": [{"when": "data.missing > 1", "next": "a"}], "default": "b"},
        {"name": "b", "function": "g"},
    )
    assert advance(p, "a", 1, js({})).step == "b"
    assert advance(p, "a", 1, Payload(b"not json", "text/plain")).step == "b"


def test_a_loop_of_choices_without_a_call_fails() -> None:
    p = plan(
        {"name": "one", "choice": [{"when": "true", "next": "two"}]},
        {"name": "two", "choice": [{"when": "true", "next": "one"}]},
    )
    nxt = advance(p, None, 0, js(None))
    assert nxt.error is not None and "loop" in nxt.error
    assert [c.step for c in nxt.chosen] == ["one", "two"]


def test_a_cycle_through_a_function_ends_at_the_step_limit() -> None:
    p = plan({"name": "work", "function": "f", "next": "work"})
    assert advance(p, "work", 7, js(1)).seq == 7
    assert "entered" in str(advance(p, "work", MAX_STEPS, js(1)).error)


def test_a_mapping_without_a_value_fails_the_run() -> None:
    p = plan({"name": "a", "function": "f", "input": "data.missing"})
    nxt = advance(p, None, 0, js({"other": 1}))
    assert nxt.tasks == [] and nxt.error is not None
    assert nxt.error.startswith("the input of step 'a' has no value:")


def test_a_step_gone_from_a_changed_flow() -> None:
    gone = advance(UPLOADS, "nope", 1, js(1))
    assert gone.error == "the flow has no step 'nope' any more" and gone.output is None


def test_payload_values_and_the_join() -> None:
    assert js({"a": 1}).value() == {"a": 1}
    assert Payload(b'{"a": 1}').value() == {"a": 1}  # no media type: JSON when it parses
    assert Payload(b"plain", "text/plain").value() == "plain"
    assert Payload(b'{"a"', "application/json").value() == '{"a"'  # not JSON after all: text
    assert Payload(b"").value() is None
    assert orjson.loads(join([{"a": 1}, "x", None]).body) == [{"a": 1}, "x", None]


def test_mapped_cel_values_become_json() -> None:
    p = plan(
        {
            "name": "a",
            "function": "f",
            "input": "{'at': timestamp('2024-05-01T12:00:00Z'), 'd': duration('90s'),"
            " 'b': b'hi', 1: [1, 2.5]}",
        }
    )
    [task] = advance(p, None, 0, js(None)).tasks
    assert orjson.loads(task.payload.body) == {
        "at": "2024-05-01T12:00:00+00:00",
        "d": "90s",
        "b": "aGk=",
        "1": [1, 2.5],
    }


def test_the_flow_context_rides_in_headers_and_dead_letters() -> None:
    context = FlowContext("uploads", "run-1", "thumbs", 2, 1, deadline_ms=123)
    event = Event({"specversion": "1.0", "id": "e", "source": "/s", "type": "t"}, b"{}")
    invocation = Invocation(id="i", function="thumb", event=event, flow=context)
    headers = invocation.headers()
    assert headers["Eh-Run"] == "run-1" and headers["Eh-Branch"] == "1"
    back = Invocation.from_message(headers, b"{}")
    assert back.flow == context
    kept = FlowContext.from_json(orjson.loads(orjson.dumps(context.to_json())))
    assert kept == FlowContext("uploads", "run-1", "thumbs", 2, 1)  # a replay has no deadline
    plain = Invocation(id="j", function="f", event=event)
    assert Invocation.from_message(plain.headers(), b"").flow is None
