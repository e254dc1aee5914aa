"""Callback destinations: the address policy, the URL check, and the send-time guard."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
import structlog
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from pydantic import ValidationError

from eventhub import callbacks as callbacks_module
from eventhub.api.context import caller_id
from eventhub.callbackpolicy import CallbackPolicy, check
from eventhub.callbacks import Callbacks
from eventhub.errors import InvalidInput, Unavailable
from eventhub.events import Event
from eventhub.invocations import Invocation, keyed_invocation_id
from eventhub.retry import Outcome
from eventhub.settings import Settings

NOBODY = CallbackPolicy.of(())


class FakeResolver(AbstractResolver):
    """Answers every name with fixed addresses, or raises ``error``."""

    def __init__(self, *addresses: str, error: OSError | None = None) -> None:
        self.addresses = addresses
        self.error = error
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        if self.error is not None:
            raise self.error
        return [
            ResolveResult(
                hostname=host,
                host=a,
                port=port,
                family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for a in self.addresses
        ]

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.100.100.200", None),  # shared address space (a cloud's metadata)
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", None),
        ("255.255.255.255", None),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("fd00:ec2::254", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback (in IPv6 form)"),
        ("::ffff:169.254.169.254", "link-local (in IPv6 form)"),
        ("2002:7f00:1::", "loopback (in IPv6 form)"),  # 6to4
        ("64:ff9b::a9fe:a9fe", "link-local (in IPv6 form)"),  # NAT64
    ],
)
def test_internal_addresses_are_refused(address: str, kind: str | None) -> None:
    # None: refused, under a name that differs between Python versions
    refusal = NOBODY.refusal(address)
    assert refusal is not None
    article = "an" if kind and kind[0] in "aeiou" else "a"
    assert kind is None or refusal == f"{article} {kind} address"


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert NOBODY.refusal(address) is None


def test_the_allow_list_takes_networks_and_host_names() -> None:
    policy = CallbackPolicy.of(["127.0.0.1", "10.0.0.0/8", "hooks.internal", "*.svc.local"])
    assert policy.refusal("127.0.0.1") is None
    assert policy.refusal("127.0.0.2") == "a loopback address"
    assert policy.refusal("10.9.9.9") is None
    assert policy.refusal("::ffff:10.9.9.9") is None
    assert policy.refusal("192.168.0.1") == "a private address"
    assert policy.host_allowed("hooks.internal")
    assert policy.host_allowed("HOOKS.internal.")
    assert policy.host_allowed("a.svc.local")
    assert not policy.host_allowed("svc.local")
    assert not policy.host_allowed("hooks.internal.evil.com")


def test_settings_read_the_allow_list_from_a_comma_separated_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EVENTHUB_CALLBACK_ALLOW", "127.0.0.1, 10.0.0.0/8,*.svc.local")
    assert Settings().callback_allow == ("127.0.0.1", "10.0.0.0/8", "*.svc.local")
    monkeypatch.setenv("EVENTHUB_CALLBACK_ALLOW", "http://hooks/")
    with pytest.raises(ValidationError, match="callback_allow"):
        Settings()


def _field(exc: InvalidInput) -> str:
    return exc.problems[0].field


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:8080/x",
        "https://[::1]/x",
        "http://[::ffff:7f00:1]/x",
        "http://10.0.0.1/",
        "ftp://example.com/x",
        "not a url",
        "/relative",
    ],
)
async def test_check_refuses_internal_literals_and_other_schemes(url: str) -> None:
    resolver = FakeResolver("8.8.8.8")
    with pytest.raises(InvalidInput) as caught:
        await check(url, NOBODY, resolver)
    assert _field(caught.value) == "X-Callback-Url"
    assert not resolver.asked  # a literal is judged without a lookup


async def test_check_refuses_a_name_with_any_internal_address() -> None:
    with pytest.raises(InvalidInput) as caught:
        await check("https://hooks.example.com/done", NOBODY, FakeResolver("8.8.8.8", "10.0.0.1"))
    assert _field(caught.value) == "X-Callback-Url"
    assert "private" in caught.value.detail
    url = await check("https://hooks.example.com/done", NOBODY, FakeResolver("8.8.8.8"))
    assert url.host == "hooks.example.com"


@pytest.mark.parametrize("host", ["localhost", "2130706433", "127.1", "0x7f000001"])
async def test_check_resolves_real_names_and_odd_numeric_forms(host: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        await check(f"http://{host}:9/x", NOBODY)
    assert "loopback" in caught.value.detail


async def test_check_says_whether_a_failed_lookup_is_the_callers() -> None:
    missing = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    with pytest.raises(InvalidInput, match="does not resolve"):
        await check("http://nowhere.example/", NOBODY, FakeResolver(error=missing))
    later = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    with pytest.raises(Unavailable):
        await check("http://nowhere.example/", NOBODY, FakeResolver(error=later))


async def test_an_allowed_host_name_is_not_looked_up() -> None:
    resolver = FakeResolver("127.0.0.1")
    await check("http://hooks.internal/x", CallbackPolicy.of(["hooks.internal"]), resolver)
    assert not resolver.asked


def test_caller_ids_are_stable_distinct_and_hide_the_token() -> None:
    assert caller_id("s3cret-token") == caller_id("s3cret-token")
    assert caller_id("s3cret-token") != caller_id("other-token")
    assert "s3cret" not in caller_id("s3cret-token")


def test_idempotency_keys_are_scoped_to_the_caller() -> None:
    a, b = caller_id("a"), caller_id("b")
    assert keyed_invocation_id("fn", "k", a) == keyed_invocation_id("fn", "k", a)
    assert keyed_invocation_id("fn", "k", a) != keyed_invocation_id("fn", "k", b)


class Receiver:
    """A real HTTP server on 127.0.0.1 that records the paths it is sent."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.port = 0
        self.got = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        self.got.set()
        return web.Response(text="ok")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", recv.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    recv.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield recv
    await runner.cleanup()


def _invocation(url: str) -> Invocation:
    return Invocation(id="inv-1", function="fn", event=Event({}, b""), callback_url=url)


async def _send(sender: Callbacks, url: str) -> None:
    sender.send(_invocation(url), "succeeded", Outcome(status=200, response_excerpt="done"))
    await sender.close(grace=30.0)


async def test_a_name_rebound_to_an_internal_address_is_refused_when_sent(
    receiver: Receiver,
) -> None:
    # The name passed the check at request time; at send time it resolves to loopback.
    url = f"http://user:pw@rebound.test:{receiver.port}/secret-path?token=q"
    with structlog.testing.capture_logs() as logs:
        await _send(Callbacks((), resolver=FakeResolver("127.0.0.1")), url)
    assert receiver.paths == []
    [refused] = [e for e in logs if e["event"] == "callback_refused"]
    assert refused["callback"] == f"http://rebound.test:{receiver.port}"
    assert "secret" not in repr(logs) and "pw" not in repr(logs)


async def test_the_callback_connects_to_the_address_that_was_checked(receiver: Receiver) -> None:
    # rebound.test exists only in the fake resolver: reaching the receiver proves that the
    # connection went to the address the guard saw.
    url = f"http://rebound.test:{receiver.port}/done"
    await _send(Callbacks(["127.0.0.1"], resolver=FakeResolver("127.0.0.1")), url)
    assert receiver.paths == ["/done"]


async def test_an_internal_literal_is_refused_when_sent(receiver: Receiver) -> None:
    with structlog.testing.capture_logs() as logs:
        await _send(Callbacks(()), f"http://127.0.0.1:{receiver.port}/x")
    assert receiver.paths == []
    assert [e["event"] for e in logs] == ["callback_refused"]


async def test_failures_are_logged_without_credentials_or_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(callbacks_module, "_BACKOFF", 0.0)
    with socket.socket() as closed:  # a port that nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = f"http://user:hunter2@127.0.0.1:{port}/private/path?sig=abc"
    with structlog.testing.capture_logs() as logs:
        await _send(Callbacks(["127.0.0.1"]), url)
    assert [e["event"] for e in logs] == ["callback_failed"] * 3 + ["callback_gave_up"]
    assert all(e["callback"] == f"http://127.0.0.1:{port}" for e in logs)
    text = repr(logs)
    assert "hunter2" not in text and "private" not in text and "sig=" not in text
