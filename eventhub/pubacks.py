"""Publishing to JetStream with many PubAcks outstanding, over one reply subscription.

nats-py's ``publish`` is a request per message (a random token, a future and a timer each), and
its ``publish_async`` still draws random bytes and guards a semaphore per message. Here each
message gets a counter token under one wildcard reply subscription, and the caller awaits the
PubAcks of its whole batch under one deadline. A PubAck lost in a reconnect never comes: the
caller's deadline expires and it drops what it still waits for (:meth:`PubAcks.forget`), so
nothing pending outlives its caller.

:func:`outcome` reads a PubAck: whether JetStream stored the message or had it already, or why it
refused it (:class:`QueueFull` when the stream is full, :class:`DependencyDown` otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterable

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from eventhub.errors import DependencyDown, QueueFull

# JetStream error codes that mean "the stream is full".
FULL_CODES = frozenset({10047, 10077, 10078})  # insufficient resources, max msgs, max bytes


class PubAcks:
    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = ""
        self._sub: object | None = None
        self._tokens = itertools.count(1)
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self._opening = asyncio.Lock()

    async def send(
        self, subject: str, data: bytes, headers: dict[str, str]
    ) -> tuple[str, asyncio.Future[bytes]]:
        """Publish; returns the token and the future of the PubAck's body."""
        if self._sub is None:
            await self._open()
        token = str(next(self._tokens))
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        try:
            await self._nc.publish(subject, data, reply=self._prefix + token, headers=headers)
        except BaseException:
            self._pending.pop(token, None)
            raise
        return token, future

    def forget(self, tokens: Iterable[str]) -> None:
        """Stop waiting for these PubAcks (answered or not)."""
        for token in tokens:
            future = self._pending.pop(token, None)
            if future is not None:
                future.cancel()

    async def _open(self) -> None:
        async with self._opening:
            if self._sub is None:
                prefix = self._nc.new_inbox() + "."
                self._sub = await self._nc.subscribe(prefix + "*", cb=self._on_reply)
                self._prefix = prefix

    async def _on_reply(self, msg: Msg) -> None:
        future = self._pending.pop(msg.subject[len(self._prefix) :], None)
        if future is None or future.done():
            return  # its caller gave up waiting
        if msg.headers and msg.headers.get("Status") == "503":
            future.set_exception(DependencyDown("JetStream is unavailable: no stream answered"))
        else:
            future.set_result(msg.data)


def outcome(body: bytes) -> bool:
    """True when JetStream stored the message, False when it had it already (a duplicate)."""
    try:
        reply = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DependencyDown("JetStream sent an unreadable PubAck") from exc
    error = reply.get("error") if isinstance(reply, dict) else None
    if error:
        description = str(error.get("description") or "")
        if error.get("err_code") in FULL_CODES or description.startswith("maximum"):
            raise QueueFull(f"the invocation buffer is full ({description})", retry_after=5)
        raise DependencyDown(f"JetStream refused the message: {description}")
    return not reply.get("duplicate", False)


async def settle(
    pubacks: PubAcks, sent: list[tuple[str, asyncio.Future[bytes]]], within: float
) -> int:
    """Wait for the PubAcks of ``sent``, at most ``within`` s for all; returns how many were
    new. Raises the first refusal, or DependencyDown, once every one came back or the time is
    up: a caller never answers before JetStream did."""
    try:
        if len(sent) == 1:
            await _one(sent[0][1], within)
        else:
            async with asyncio.timeout(within):
                await asyncio.gather(*(future for _, future in sent), return_exceptions=True)
    except TimeoutError as exc:
        raise DependencyDown("JetStream is unavailable: no PubAck in time") from exc
    finally:
        pubacks.forget(token for token, _ in sent)
    new = 0
    for _, future in sent:
        error = future.exception()
        if error is not None:
            raise error
        new += outcome(future.result())
    return new


async def _one(future: asyncio.Future[bytes], within: float) -> None:
    """Wait for one PubAck, at most ``within`` s (TimeoutError), leaving its outcome in the
    future. The usual request: one timer, instead of a timeout scope and a gathering future."""
    timer = asyncio.get_running_loop().call_later(within, _expire, future)
    try:
        with contextlib.suppress(Exception):  # a refusal is read by the caller
            await future
    finally:
        timer.cancel()
    if isinstance(future.exception(), _Expired):
        raise TimeoutError


class _Expired(Exception):
    """Set on a PubAck's future that did not come in time (never seen by callers)."""


def _expire(future: asyncio.Future[bytes]) -> None:
    if not future.done():
        future.set_exception(_Expired())
