"""Hostile input against real services: messages too large for NATS, headers that are not UTF-8,
control characters and NUL in attributes and in function responses, PostgreSQL and Redis away.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web
from pydantic import SecretStr
from yarl import URL

from eventhub.settings import Settings
from eventhub.sizes import INGRESS_RESERVE
from tests.conftest import TOKEN
from tests.integration.test_connector_rabbitmq import (  # noqa: F401 - the amqp fixture
    Broker,
    amqp,
    source_spec,
)
from tests.support import FunctionServer, RunningHub, start_hub

MIB = 1024 * 1024


async def request(
    hub: RunningHub, method: str, path: str, body: bytes = b"", **headers: str
) -> tuple[int, dict[str, str], Any]:
    async with hub.http.request(
        method, hub.base_url + path, data=body, headers={**hub.auth(), **headers}
    ) as response:
        raw = await response.read()
        doc = orjson.loads(raw) if raw and "json" in response.content_type else raw
        return response.status, dict(response.headers), doc


async def raw_request(port: int, method: str, path: str, headers: list[bytes]) -> tuple[int, Any]:
    """Send header bytes exactly as given (aiohttp's client would refuse or encode them)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", *headers]
    lines += [f"Authorization: Bearer {TOKEN}".encode(), b"Content-Length: 2", b"Connection: close"]
    writer.write(b"\r\n".join(lines) + b"\r\n\r\n{}")
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), orjson.loads(body)


def binary_event(event_id: str, **extra: str) -> dict[str, str]:
    return {
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-source": "/test",
        "ce-type": "com.example.test",
        "Content-Type": "application/octet-stream",
        **extra,
    }


async def test_an_invocation_too_large_for_nats_gets_413_and_the_connection_stays(
    hub: RunningHub, function: FunctionServer
) -> None:
    await hub.function("fn", function.url("fn"))
    await hub.bind("all-to-fn", "fn")
    await hub.wait_routed("fn")
    assert hub.hub is not None
    nc = hub.hub.services.nc
    limit = nc.max_payload - INGRESS_RESERVE
    reconnects = nc.stats["reconnects"]
    big = b"x" * (MIB - 300)  # under nats-py's own check and the API's max body size

    status, headers, problem = await request(hub, "POST", "/v1/functions/fn/invocations", big)
    assert status == 413, problem
    assert headers["Content-Type"].startswith("application/problem+json")
    assert f"limit of {limit} bytes" in problem["detail"]
    assert problem["errors"] == [{"field": "body", "message": f"must fit in {limit} bytes"}]
    status, _, problem = await request(hub, "POST", "/v1/events", big, **binary_event("big-1"))
    assert status == 413 and f"limit of {limit} bytes" in problem["detail"], problem
    assert "event 'big-1'" in problem["detail"]

    # The connection was never dropped: the next requests go through on it.
    status, _, accepted = await request(hub, "POST", "/v1/functions/fn/invocations", b"small")
    assert status == 202, accepted
    await hub.wait_status(accepted["id"], "succeeded")
    fits = b"y" * (limit - 4096)  # leaves room for the invocation's headers
    status, _, accepted = await request(hub, "POST", "/v1/functions/fn/invocations", fits)
    assert status == 202, accepted
    await hub.wait_status(accepted["id"], "succeeded")
    assert any(call.body == fits for call in function.calls_to("fn"))
    assert nc.is_connected and nc.stats["reconnects"] == reconnects

    # Above the API's max body size: the same problem document, naming that limit.
    status, headers, problem = await request(
        hub, "POST", "/v1/functions/fn/invocations", b"z" * (MIB + 1)
    )
    assert status == 413 and headers["Content-Type"].startswith("application/problem+json")
    assert f"larger than {MIB} bytes" in problem["detail"]


async def amqp_source_to_fn(
    broker: Broker, hub: RunningHub, function: FunctionServer, source: str, **spec: Any
) -> tuple[str, str]:
    """Function ``fn`` (with ``spec``) bound to a RabbitMQ source named ``source`` that reads a
    new queue bound to a new exchange; returns (queue, exchange) once the source consumes."""
    queue, exchange = broker.names()
    declare = {"exchange": exchange, "routingKeys": ["#"], "durable": False}
    await hub.function("fn", function.url("fn"), **spec)
    await hub.put("sources", source, source_spec(queue, declare=declare))
    await hub.bind(f"{source}-to-fn", "fn", source=source)
    await broker.wait_counts(queue, consumers=1)
    return queue, exchange


async def test_a_connector_message_too_large_for_nats_becomes_a_source_dead_letter(
    amqp: Broker,  # noqa: F811 - the fixture
    hub: RunningHub,
    function: FunctionServer,
) -> None:
    queue, exchange = await amqp_source_to_fn(amqp, hub, function, "big")
    big = b"b" * (MIB - 300)  # below the source's maxMessageSize (1 MiB), above what NATS takes
    await amqp.publish(exchange, "k", big, message_id="too-big", content_type="text/plain")
    await amqp.publish(exchange, "k", b"normal", message_id="normal", content_type="text/plain")

    calls = await function.wait_for(1, "fn")
    assert calls[0].body == b"normal"
    letters = await hub.wait_dead_letters(1, source="big")
    assert letters[0]["errorCode"] == "too-large" and letters[0]["reason"] == "rejected"
    assert "limit of" in letters[0]["errorMessage"]
    assert letters[0]["event"]["id"] == "too-big"
    await amqp.wait_counts(queue, ready=0, consumers=1)  # both acknowledged
    assert hub.hub is not None and hub.hub.services.nc.is_connected
    assert len(function.calls_to("fn")) == 1


async def test_headers_that_are_not_utf8_get_400_naming_the_header(hub: RunningHub) -> None:
    assert hub.hub is not None and hub.hub.port is not None
    port = hub.hub.port
    await hub.function("fn", "http://127.0.0.1:9/fn")
    await hub.bind("all-to-fn", "fn")
    await hub.wait_routed("fn")
    event = [b"ce-specversion: 1.0", b"ce-id: e-1", b"ce-source: /s", b"Content-Type: text/plain"]
    cases = [
        ("/v1/events", [*event, b"ce-type: com.acc.\xff\xfe"], "ce-type"),
        ("/v1/functions/fn/invocations", [b"Idempotency-Key: k\xff"], "Idempotency-Key"),
        ("/v1/functions/fn/invocations", [b"Content-Type: text/\xe9\xff"], "Content-Type"),
        ("/v1/functions/fn/invocations", [b"X-Callback-Url: http://a/\xff"], "X-Callback-Url"),
        ("/v1/sources/s/webhook", [b"X-Minio: \xc3\x28"], "X-Minio"),
    ]
    for path, headers, name in cases:
        status, problem = await raw_request(port, "POST", path, headers)
        assert status == 400, (path, problem)
        assert problem["errors"] == [{"field": name, "message": "is not UTF-8 text"}], problem


async def test_control_characters_in_attributes_get_400_naming_the_attribute(
    hub: RunningHub,
) -> None:
    status, _, problem = await request(
        hub, "POST", "/v1/events", b"x", **binary_event("c-1", **{"ce-type": "a%00b"})
    )
    assert status == 400 and problem["errors"][0]["field"] == "ce-type", problem
    structured = {
        "specversion": "1.0",
        "id": "c-2",
        "source": "/s",
        "type": "t",
        "datacontenttype": "text/plain\u0001",
        "data": "x",
    }
    body = orjson.dumps(structured)
    ctype = "application/cloudevents+json"
    status, _, problem = await request(hub, "POST", "/v1/events", body, **{"Content-Type": ctype})
    assert status == 400 and problem["errors"][0]["field"] == "datacontenttype", problem
    batch = orjson.dumps([{**structured, "datacontenttype": "text/plain", "subject": "a\x00"}])
    ctype = "application/cloudevents-batch+json"
    status, _, problem = await request(hub, "POST", "/v1/events", batch, **{"Content-Type": ctype})
    assert status == 400 and problem["errors"][0]["field"] == "[0].subject", problem


@contextlib.asynccontextmanager
async def odd_function() -> AsyncIterator[str]:
    """/nul answers 422 with binary bytes and NUL; /gzip a gzip-compressed 400."""

    async def nul(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=422, body=b"\x00\x01\xff\xfebinary\x00")

    async def gzipped(request: web.Request) -> web.Response:
        await request.read()
        body = gzip.compress(b"compressed error text")
        return web.Response(status=400, body=body, headers={"Content-Encoding": "gzip"})

    app = web.Application()
    app.router.add_post("/nul", nul)
    app.router.add_post("/gzip", gzipped)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def test_binary_and_compressed_error_bodies_do_not_stop_the_dead_letter(
    hub: RunningHub,
) -> None:
    async with odd_function() as base:
        await hub.function("nul", f"{base}/nul")
        await hub.function("gz", f"{base}/gzip")
        await hub.wait_routed("gz")
        _, _, first = await request(hub, "POST", "/v1/functions/nul/invocations", b"a")
        _, _, second = await request(hub, "POST", "/v1/functions/gz/invocations", b"b")
        nul = await hub.wait_dead_letters(1, function="nul")
        gz = await hub.wait_dead_letters(1, function="gz")
    assert nul[0]["errorCode"] == "http-422" and nul[0]["invocationId"] == first["id"]
    response = nul[0]["attempts"][0]["response"]
    assert "binary" in response and "\x00" not in response
    assert gz[0]["attempts"][0]["response"] == "compressed error text"
    history = await hub.invocation(second["id"])
    assert history["history"][0]["response"] == "compressed error text"


async def test_nul_in_attributes_is_stored_and_replayed_as_sent(
    amqp: Broker,  # noqa: F811 - the fixture
    hub: RunningHub,
    function: FunctionServer,
) -> None:
    function.respond("fn", 400)  # the first call fails for good, the replay succeeds
    _, exchange = await amqp_source_to_fn(amqp, hub, function, "nul")
    await amqp.publish(
        exchange, "k", b"\x00data\x00", message_id="m-nul", headers={"note": "a\x00b"}
    )
    letters = await hub.wait_dead_letters(1, function="fn")
    assert letters[0]["event"]["note"] == "a\x00b"
    status, _, _ = await request(
        hub,
        "POST",
        "/v1/dead-letters/replay",
        orjson.dumps({"ids": [letters[0]["id"]]}),
        **{"Content-Type": "application/json"},
    )
    assert status in (200, 201, 202)
    calls = await function.wait_for(2, "fn")
    assert calls[1].body == calls[0].body == b"\x00data\x00"
    assert unquote(calls[1].ce["note"]) == unquote(calls[0].ce["note"])
    assert unquote(calls[1].ce["id"]) == "m-nul"


async def test_a_header_the_http_client_refuses_makes_a_final_dead_letter(
    amqp: Broker,  # noqa: F811 - the fixture
    hub: RunningHub,
    function: FunctionServer,
) -> None:
    _, exchange = await amqp_source_to_fn(amqp, hub, function, "ctl", retry={"maxAttempts": 5})
    await amqp.publish(exchange, "k", b"bad", message_id="ctl-1", content_type="text/plain\x01")
    await amqp.publish(exchange, "k", b"good", message_id="ctl-2", content_type="text/plain")
    letters = await hub.wait_dead_letters(1, function="fn")
    assert letters[0]["errorCode"] == "invalid-request", letters[0]
    assert letters[0]["reason"] == "non-retryable"
    assert len(letters[0]["attempts"]) == 1
    calls = await function.wait_for(1, "fn")
    assert [c.body for c in calls] == [b"good"]


class Proxy:
    """A TCP relay to a real service, that the test can take away (an outage)."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()
            self._writers.discard(writer)


def port_of(url: SecretStr) -> int:
    return URL(url.get_secret_value()).port or 0


def via(url: SecretStr, proxy: Proxy) -> SecretStr:
    return SecretStr(str(URL(url.get_secret_value()).with_host("127.0.0.1").with_port(proxy.port)))


async def test_postgres_or_redis_down_gets_503_with_retry_after(settings: Settings) -> None:
    pg, rd = Proxy(port_of(settings.database_url)), Proxy(port_of(settings.redis_url))
    await pg.start()
    await rd.start()
    proxied = settings.model_copy(
        update={
            "database_url": via(settings.database_url, pg),
            "redis_url": via(settings.redis_url, rd),
        }
    )
    try:
        async with start_hub(proxied, TOKEN) as hub:
            status, _, _ = await request(hub, "GET", "/v1/dead-letters")
            assert status == 200
            await pg.stop()
            await rd.stop()
            for path, named in (
                (f"/v1/invocations/{uuid.uuid4()}", "Redis"),
                ("/v1/dead-letters", "PostgreSQL"),
                ("/v1/functions", "PostgreSQL"),
            ):
                deadline = time.monotonic() + 20
                status, headers, problem = await request(hub, "GET", path)
                while status == 200 and time.monotonic() < deadline:  # a cached answer
                    await asyncio.sleep(0.2)
                    status, headers, problem = await request(hub, "GET", path)
                assert status == 503, (path, status, problem)
                assert int(headers["Retry-After"]) > 0
                assert problem["title"] == "Dependency unavailable", problem
                assert problem["detail"].startswith(f"{named} is unavailable"), problem
    finally:
        await pg.stop()
        await rd.stop()


async def test_a_dead_letter_function_delivery_that_cannot_fit_is_recorded_not_retried(
    hub: RunningHub, function: FunctionServer
) -> None:
    # The delivery to a dead-letter function names the failed function's URL in an extension:
    # with a URL longer than the ingress reserve and an event near the limit, it cannot fit.
    function.respond("fn", 400)
    long_url = function.url("fn") + "?pad=" + "a" * (INGRESS_RESERVE + 1024)
    await hub.function("dl", function.url("dl"))
    await hub.function("fn", long_url, retry={"maxAttempts": 1}, deadLetter={"function": "dl"})
    await hub.wait_routed("fn")
    assert hub.hub is not None
    body = b"x" * (hub.hub.services.nc.max_payload - INGRESS_RESERVE - 2048)
    status, _, doc = await request(
        hub, "POST", "/v1/functions/fn/invocations", body, **{"Content-Type": "text/plain"}
    )
    assert status == 202, doc

    async def recorded() -> dict[str, Any]:
        while True:
            letters = await hub.dead_letters(function="fn")
            if letters and letters[0]["deadLetterFunction"]["status"] != "pending":
                return letters[0]
            await asyncio.sleep(0.2)

    letter = await asyncio.wait_for(recorded(), 30)
    assert letter["deadLetterFunction"]["status"] == "failed"
    assert letter["deadLetterFunction"]["error"].startswith("too-large")
    await asyncio.sleep(1.0)  # nothing comes back: the message was acknowledged
    (again,) = await hub.dead_letters(function="fn")  # the function's server refused the URL
    assert (
        len(again["attempts"]) == 1 and again["deadLetterFunction"] == letter["deadLetterFunction"]
    )
    assert function.calls_to("dl") == []


async def test_attributes_too_large_for_jetstream_headers_get_413_and_large_ones_retry(
    hub: RunningHub, function: FunctionServer
) -> None:
    # JetStream stores at most 64 KiB of headers, whatever max_payload allows.
    function.respond("fn", 503)  # the first call fails: the retry must fit as well
    await hub.function("fn", function.url("fn"), retry={"initialDelay": "50ms"})
    await hub.bind("all-to-fn", "fn")
    await hub.wait_routed("fn")
    structured = {"Content-Type": "application/cloudevents+json"}

    def event(event_id: str, ext: int) -> bytes:
        doc = {"specversion": "1.0", "id": event_id, "source": "/t", "type": "com.example.t"}
        return orjson.dumps({**doc, "bigext": "e" * ext})

    status, _, doc = await request(hub, "POST", "/v1/events", event("big", 65100), **structured)
    assert status == 413, doc
    assert doc["errors"][0]["field"] == "headers" and "NATS headers" in doc["detail"]
    binary = {f"ce-ext{i}": "e" * 8000 for i in range(10)}
    status, _, doc = await request(hub, "POST", "/v1/events", b"{}", **binary_event("b", **binary))
    assert status == 413, doc
    near = {f"ce-ext{i}": "e" * 8000 for i in range(7)}  # 56,000 bytes: fits, retries too
    status, _, doc = await request(hub, "POST", "/v1/events", b"{}", **binary_event("ok", **near))
    assert status == 202, doc
    calls = await function.wait_for(2, "fn")
    assert [len(c.headers["ce-ext6"]) for c in calls] == [8000, 8000]


async def test_a_nul_in_a_path_or_query_parameter_is_404_or_400_naming_it(
    hub: RunningHub,
) -> None:
    status, _, doc = await request(hub, "GET", "/v1/functions/%00")
    assert status == 404, doc
    status, _, doc = await request(hub, "GET", "/v1/dead-letters?function=%00")
    assert status == 400, doc
    assert doc["errors"] == [{"field": "function", "message": "must not hold a NUL character"}]
