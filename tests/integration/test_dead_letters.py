"""GET /v1/dead-letters: filters and keyset pagination over the real PostgreSQL store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson

from eventhub.events import Event
from eventhub.ports import DeadLetterRecord, dead_letter_id
from tests.support import RunningHub

T0 = datetime(2026, 1, 1, tzinfo=UTC)


async def _seed(hub: RunningHub, count: int) -> None:
    assert hub.hub is not None
    for i in range(count):
        event = Event({"specversion": "1.0", "id": f"e{i}", "source": "/seed", "type": "t"}, b"{}")
        inv = f"inv-{i}"
        await hub.hub.dead_letters.store(
            DeadLetterRecord(
                id=dead_letter_id(inv),
                invocation_id=inv,
                function="even" if i % 2 == 0 else "odd",
                binding=f"b{i % 3}",
                event=event,
                reason="attempts-exhausted",
                error_code="http-500",
                error_message="boom",
                attempts=[{"attempt": 1, "status": 500}],
                enqueued_at=T0,
                failed_at=T0 + timedelta(minutes=i),
                dead_letter_function=None,
            )
        )


async def test_filters_and_pagination(hub: RunningHub) -> None:
    await _seed(hub, 130)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query = {"limit": "50", **({"cursor": cursor} if cursor else {})}
        async with hub.http.get(
            f"{hub.base_url}/v1/dead-letters", params=query, headers=hub.auth()
        ) as r:
            body = await r.json()
        seen += [item["event"]["id"] for item in body["items"]]
        pages += 1
        cursor = body["nextCursor"]
        if not cursor:
            break
    assert pages == 3
    assert seen == [f"e{i}" for i in reversed(range(130))]  # newest first, no gaps, no repeats

    odd = await hub.dead_letters(function="odd", limit="500")
    assert len(odd) == 65 and all(d["function"] == "odd" for d in odd)
    b1 = await hub.dead_letters(binding="b1", limit="500")
    assert len(b1) == len([i for i in range(130) if i % 3 == 1])
    window = await hub.dead_letters(
        since=(T0 + timedelta(minutes=10)).isoformat(),
        until=(T0 + timedelta(minutes=20)).isoformat(),
    )
    assert sorted(d["event"]["id"] for d in window) == sorted(f"e{i}" for i in range(10, 20))
    assert await hub.dead_letters(status="resolved") == []
    assert len(await hub.dead_letters(status="dead", limit="500")) == 130


async def test_bad_filters_name_the_parameter(hub: RunningHub) -> None:
    for query, field in [
        ({"status": "zombie"}, "status"),
        ({"limit": "0"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"since": "yesterday"}, "since"),
        ({"cursor": "!!!"}, "cursor"),
    ]:
        async with hub.http.get(
            f"{hub.base_url}/v1/dead-letters", params=query, headers=hub.auth()
        ) as r:
            assert r.status == 400, query
            assert (await r.json())["errors"][0]["field"] == field
    async with hub.http.get(f"{hub.base_url}/v1/dead-letters/not-a-uuid", headers=hub.auth()) as r:
        assert r.status == 404


async def test_filters_and_pagination_over_thousands(hub: RunningHub) -> None:
    assert hub.hub is not None
    rows = []
    for i in range(3000):
        inv = f"bulk-{i}"
        function = ("a", "b", "c")[i % 3]
        code = "http-500" if i % 2 else "timeout"
        attributes = orjson.dumps(
            {"specversion": "1.0", "id": f"e{i}", "source": "/s", "type": "t"}
        )
        rows.append(
            (
                dead_letter_id(inv),
                inv,
                function,
                f"{function}-bind",
                "/s",
                f"e{i}",
                "t",
                attributes.decode(),
                b"{}",
                "attempts-exhausted",
                code,
                "x",
                "[]",
                T0,
                T0 + timedelta(seconds=i),
            )
        )
    async with hub.hub.services.pool.acquire() as conn:
        await conn.executemany(
            "insert into dead_letters (id, invocation_id, function, binding, event_source,"
            " event_id, event_type, attributes, data, reason, error_code, error_message,"
            " attempts, enqueued_at, failed_at) values ($1, $2, $3, $4, $5, $6, $7, $8::jsonb,"
            " $9, $10, $11, $12, $13::jsonb, $14, $15)",
            rows,
        )
    seen: list[str] = []
    cursor = None
    while True:
        query = {"function": "b", "errorCode": "http-500", "limit": "500"}
        if cursor:
            query["cursor"] = cursor
        async with hub.http.get(
            f"{hub.base_url}/v1/dead-letters", params=query, headers=hub.auth()
        ) as r:
            body = await r.json()
        seen += [d["event"]["id"] for d in body["items"]]
        cursor = body["nextCursor"]
        if not cursor:
            break
    expected = [f"e{i}" for i in reversed(range(3000)) if i % 3 == 1 and i % 2 == 1]
    assert seen == expected  # 500 of 3000, newest first, across pages, no gaps or repeats
    window = await hub.dead_letters(
        function="a",
        since=(T0 + timedelta(seconds=600)).isoformat(),
        until=(T0 + timedelta(seconds=900)).isoformat(),
        limit="500",
    )
    assert len(window) == 100
