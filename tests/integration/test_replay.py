"""Replaying dead letters: same event, replay extensions, rate, redirect, resume after kill -9,
one replay at a time; purge and retention."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from eventhub.events import Event
from eventhub.ports import DeadLetterRecord, dead_letter_id
from tests.support import FunctionServer, HubProcess, RunningHub


async def seed(hub: RunningHub, function: str, count: int, age: timedelta = timedelta()) -> None:
    """Store dead letters of ``function`` directly (as the dispatcher does)."""
    assert hub.hub is not None
    now = datetime.now(UTC) - age
    for i in range(count):
        inv = f"{function}-inv-{i}"
        event = Event(
            {"specversion": "1.0", "id": f"{function}-e{i}", "source": "/seed", "type": "t"},
            b'{"n": %d}' % i,
        )
        await hub.hub.dead_letters.store(
            DeadLetterRecord(
                id=dead_letter_id(inv),
                invocation_id=inv,
                function=function,
                binding=None,
                event=event,
                reason="attempts-exhausted",
                error_code="http-500",
                error_message="boom",
                attempts=[{"attempt": 1, "status": 500}],
                enqueued_at=now,
                failed_at=now + timedelta(milliseconds=i),
                dead_letter_function=None,
            )
        )


async def api(hub: RunningHub, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with hub.http.request(
        method, hub.base_url + path, json=body, headers=hub.auth()
    ) as response:
        return response.status, await response.json(content_type=None)


async def wait_job(hub: RunningHub, job_id: str, wait: float = 60) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        _, job = await api(hub, "GET", f"/v1/replay-jobs/{job_id}")
        if job["status"] in ("done", "cancelled", "failed"):
            return job  # type: ignore[no-any-return]
        assert asyncio.get_running_loop().time() < deadline, job
        await asyncio.sleep(0.2)


async def test_a_replay_keeps_the_event_and_resolves_or_appends(
    hub: RunningHub, function: FunctionServer
) -> None:
    function.respond("flaky", 400)  # the first replay fails (non-retryable), the next succeeds
    await hub.function("flaky", function.url("flaky"))
    await seed(hub, "flaky", 1)
    [letter] = await hub.dead_letters(function="flaky")

    status, body = await api(hub, "POST", "/v1/dead-letters/replay", {"ids": [letter["id"]]})
    assert status == 202
    job = await wait_job(hub, body["job"]["id"])
    [call] = await function.wait_for(1, "flaky")
    assert call.ce["id"] == "flaky-e0" and call.ce["source"] == "/seed"  # the same event
    assert call.body == b'{"n": 0}'
    assert call.ce["eventhubreplay"] == job["id"] and call.ce["eventhubreplaycount"] == "1"
    letter = await _wait_letter(hub, letter["id"], lambda d: d["status"] == "dead")
    assert [a.get("status") for a in letter["attempts"]] == [500, 400]  # appended, one row
    assert len(await hub.dead_letters(function="flaky")) == 1

    status, body = await api(hub, "POST", "/v1/dead-letters/replay", {"ids": [letter["id"]]})
    assert status == 202
    await function.wait_for(2, "flaky")
    letter = await _wait_letter(hub, letter["id"], lambda d: d["status"] == "resolved")
    assert letter["replayCount"] == 2
    job = await wait_job(hub, body["job"]["id"])
    assert (job["published"], job["succeeded"]) == (1, 1)


async def test_redirect_dry_run_and_one_replay_at_a_time(
    hub: RunningHub, function: FunctionServer
) -> None:
    function.delays["fixed"] = 1.0
    await hub.function("broken", function.url("broken"))
    await hub.function("fixed", function.url("fixed"))
    await seed(hub, "broken", 3)
    status, preview = await api(
        hub, "POST", "/v1/dead-letters/replay", {"filter": {"function": "broken"}, "dryRun": True}
    )
    assert status == 200 and preview["count"] == 3 and len(preview["sample"]) == 3
    assert all(d["status"] == "dead" for d in await hub.dead_letters(function="broken"))
    _, jobs = await api(hub, "GET", "/v1/replay-jobs")
    assert jobs["items"] == []  # the dry run changed nothing

    body = {"filter": {"function": "broken"}, "to": "fixed", "rate": "100/s"}
    status, created = await api(hub, "POST", "/v1/dead-letters/replay", body)
    assert status == 202
    await function.wait_for(1, "fixed")
    letters = await hub.dead_letters(function="broken", status="replaying")
    assert letters  # while the redirected calls run, a second replay is refused
    status, problem = await api(hub, "POST", "/v1/dead-letters/replay", {"ids": [letters[0]["id"]]})
    assert status == 409 and letters[0]["id"] in problem["detail"]
    await wait_job(hub, created["job"]["id"])
    calls = await function.wait_for(3, "fixed")
    assert sorted(c.ce["id"] for c in calls) == ["broken-e0", "broken-e1", "broken-e2"]
    assert function.calls_to("broken") == []
    status, _ = await api(hub, "POST", "/v1/dead-letters/replay", {"ids": ["x"], "to": "nope"})
    assert status == 400


async def test_replay_rate_is_never_exceeded(hub: RunningHub, function: FunctionServer) -> None:
    """Pacing is checked where eventhub does it, at publication: the times JetStream stored the
    replayed messages at, while the function holds every call (so none is acked and removed).
    Arrival times at the function would also measure dispatch, which a busy machine bunches."""
    assert hub.hub is not None
    rate, count = 50, 500
    gate = function.gates["paced"] = asyncio.Event()
    try:
        await hub.function("paced", function.url("paced"), maxConcurrency=50, timeout="120s")
        await hub.wait_routed("paced")
        await seed(hub, "paced", count)
        asked = datetime.now(UTC)
        body = {"filter": {"function": "paced"}, "rate": f"{rate}/s"}
        status, created = await api(hub, "POST", "/v1/dead-letters/replay", body)
        assert status == 202
        job = await wait_job(hub, created["job"]["id"], wait=90)
        assert (job["status"], job["published"]) == ("done", count)
        stored = await _stored_times(hub, hub.hub.settings.subject_for("paced"))
        assert len(stored) == count
        # Each publish waits for its PubAck before the next one starts, and starts in a slot
        # 1/rate after the one before; after falling behind, the runner takes one late slot at
        # once (next = max(next + 1/rate, now - 1/rate)). So, whatever the load: the k-th
        # message is stored no sooner than k/rate after the job was asked for (10 ms allowed
        # between JetStream's clock and ours), and no window of 1 s holds more than rate + 3.
        for k, at in enumerate(stored):
            assert (at - asked).total_seconds() >= k / rate - 0.01, (k, at, asked)
        window = timedelta(seconds=1)
        for i, start in enumerate(stored):
            assert sum(1 for t in stored[i : i + rate + 10] if t - start < window) <= rate + 3
    finally:
        gate.set()  # the held calls are answered, even after a failure
    calls = await function.wait_for(count, "paced", wait=60)
    assert len({c.ce["id"] for c in calls}) == count


async def _stored_times(hub: RunningHub, subject: str) -> list[datetime]:
    """When JetStream stored each message on ``subject`` still in the stream, in order."""
    assert hub.hub is not None
    js, stream = hub.hub.queue.js, hub.hub.queue.stream
    state = (await js.stream_info(stream)).state
    times = []
    for seq in range(state.first_seq, state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        if msg.subject == subject and msg.time is not None:
            times.append(msg.time)
    return sorted(times)


@pytest.mark.slow
async def test_a_replay_killed_midway_resumes_without_duplicates_or_gaps(
    settings_factory: Callable[..., HubProcess], function: FunctionServer, hub: RunningHub
) -> None:
    await hub.function("resumed", function.url("resumed"))
    await seed(hub, "resumed", 60)
    await hub.hub.stop()  # type: ignore[union-attr]  # only the child processes replay now
    first = settings_factory()
    await first.ready()
    async with aiohttp.ClientSession() as http:
        other = RunningHub(None, first.base_url, first.token, http)
        body = {"filter": {"function": "resumed"}, "rate": "20/s"}
        status, created = await api(other, "POST", "/v1/dead-letters/replay", body)
        assert status == 202
        await function.wait_for(15, "resumed")
        first.kill()
        second = settings_factory()
        await second.ready()
        other = RunningHub(None, second.base_url, second.token, http)
        job = await wait_job(other, created["job"]["id"], wait=90)  # after the lease (30 s)
    assert job["status"] == "done" and job["published"] == 60
    calls = await function.wait_for(60, "resumed", wait=20)
    ids = [c.ce["id"] for c in calls]
    assert sorted(set(ids)) == sorted(f"resumed-e{i}" for i in range(60))  # nothing skipped
    # At least once: only a call in flight at the kill may come twice.
    assert len(ids) - len(set(ids)) <= 1


async def test_purge_and_retention_remove_what_they_should(hub: RunningHub) -> None:
    assert hub.hub is not None
    await seed(hub, "old", 5, age=timedelta(days=40))
    await seed(hub, "new", 5)
    status, body = await api(
        hub, "POST", "/v1/dead-letters/purge", {"filter": {"function": "new"}, "dryRun": True}
    )
    assert (status, body) == (200, {"count": 5})
    [one] = await hub.dead_letters(function="new", limit="1")
    status, body = await api(hub, "POST", "/v1/dead-letters/purge", {"ids": [one["id"]]})
    assert (status, body) == (200, {"purged": 1})
    assert len(await hub.dead_letters(function="new")) == 4
    removed = await hub.hub.dead_letters.apply_retention(30 * 86400, 0)
    assert removed == 5 and await hub.dead_letters(function="old") == []
    removed = await hub.hub.dead_letters.apply_retention(0, 2)  # keep the newest 2
    assert removed == 2
    left = await hub.dead_letters(function="new")
    assert [d["event"]["id"] for d in left] == ["new-e3", "new-e2"]  # e4 was purged


async def test_stats_count_by_function_and_error(hub: RunningHub) -> None:
    await seed(hub, "a", 3)
    await seed(hub, "b", 2)
    status, stats = await api(hub, "GET", "/v1/dead-letters/stats")
    assert status == 200 and stats["total"] == 5
    assert stats["byFunction"] == [{"function": "a", "count": 3}, {"function": "b", "count": 2}]
    assert {(e["function"], e["errorCode"], e["count"]) for e in stats["byError"]} == {
        ("a", "http-500", 3),
        ("b", "http-500", 2),
    }
    assert sum(h["count"] for h in stats["hourly"]) == 5


async def _wait_letter(
    hub: RunningHub, dl_id: str, ready: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        _, doc = await api(hub, "GET", f"/v1/dead-letters/{dl_id}")
        if ready(doc):
            return doc  # type: ignore[no-any-return]
        assert asyncio.get_running_loop().time() < deadline, doc
        await asyncio.sleep(0.1)


async def test_a_second_replay_of_the_same_dead_letter_is_refused_at_once(
    hub: RunningHub, function: FunctionServer
) -> None:
    await hub.function("twice", function.url("twice"))
    await seed(hub, "twice", 2)
    letters = await hub.dead_letters(function="twice")
    ids = [d["id"] for d in letters]
    body = {"ids": ids, "rate": "1/s"}  # slow: the second is still pending when asked again
    status, first = await api(hub, "POST", "/v1/dead-letters/replay", body)
    assert status == 202
    status, problem = await api(hub, "POST", "/v1/dead-letters/replay", {"ids": ids[1:]})
    assert status == 409 and ids[1] in problem["detail"]
    status, _ = await api(hub, "POST", f"/v1/replay-jobs/{first['job']['id']}/cancel")
    assert status == 200
    # Cancelled: what it had not published yet is free again, and can be replayed.
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        statuses = {d["status"] for d in await hub.dead_letters(function="twice")}
        if "replaying" not in statuses:
            break
        assert asyncio.get_running_loop().time() < deadline, statuses
        await asyncio.sleep(0.2)
    status, _ = await api(hub, "POST", "/v1/dead-letters/replay", {"ids": ids[1:]})
    assert status == 202


async def test_replay_and_purge_bodies_are_checked(hub: RunningHub) -> None:
    await seed(hub, "strict", 1)
    for path, body, field in [
        ("/v1/dead-letters/purge", {"filtre": {"function": "x"}, "dryRun": True}, "filtre"),
        ("/v1/dead-letters/purge", {"dryRun": True}, "ids"),
        ("/v1/dead-letters/purge", {"ids": ["not-an-id"]}, "ids"),
        ("/v1/dead-letters/replay", {"filter": {"function": 3}}, "filter.function"),
        ("/v1/dead-letters/replay", {"filter": {}, "rate": "fast"}, "rate"),
        ("/v1/dead-letters/replay", {"filter": {}, "dry_run": True}, "dry_run"),
    ]:
        status, problem = await api(hub, "POST", path, body)
        assert status == 400, (path, body, problem)
        assert problem["errors"][0]["field"] == field, problem
    status, _ = await api(hub, "GET", "/v1/replay-jobs/not-a-uuid")
    assert status == 404
    status, problem = await api(hub, "GET", "/v1/dead-letters?fucntion=x")
    assert status == 400 and problem["errors"][0]["field"] == "fucntion"
    assert len(await hub.dead_letters(function="strict")) == 1  # nothing was purged


async def test_a_replay_outcome_counts_once(hub: RunningHub, function: FunctionServer) -> None:
    assert hub.hub is not None
    await hub.function("once", function.url("once"))
    await seed(hub, "once", 1)
    [letter] = await hub.dead_letters(function="once")
    status, created = await api(hub, "POST", "/v1/dead-letters/replay", {"ids": [letter["id"]]})
    assert status == 202
    job = await wait_job(hub, created["job"]["id"])
    await _wait_letter(hub, letter["id"], lambda d: d["status"] == "resolved")
    # A redelivered outcome (a lost ack) changes nothing and counts nothing.
    assert await hub.hub.dead_letters.replay_finished(letter["id"], True, [{}], None) is None
    _, job = await api(hub, "GET", f"/v1/replay-jobs/{job['id']}")
    assert (job["succeeded"], job["failed"]) == (1, 0)
    doc = await _wait_letter(hub, letter["id"], lambda d: True)
    assert len(doc["attempts"]) == 2
