"""The small interfaces the core needs from the outside, and the records crossing them.

``dlq`` implements :class:`DeadLetterSink`; the composition root (``eventhub.app``) wires it in.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from eventhub.events import Event

_DEAD_LETTER_IDS = uuid.UUID("0d3a7c1e-5b7f-4c8e-8f61-2d9e4b5a7c10")


def dead_letter_id(invocation_id: str) -> str:
    """Deterministic, so a redelivered final attempt stores the same dead letter, once."""
    return str(uuid.uuid5(_DEAD_LETTER_IDS, invocation_id))


@dataclass(frozen=True)
class DeadLetterRecord:
    """``function`` is None for a message its source could not turn into an event."""

    id: str
    invocation_id: str
    function: str | None
    binding: str | None
    event: Event
    reason: str
    error_code: str
    error_message: str
    attempts: list[dict[str, Any]]
    enqueued_at: datetime
    failed_at: datetime
    dead_letter_function: str | None
    source_name: str | None = None
    version: str = "latest"  # the version of the function that was called
    # A step of a flow run: flow, run, step, seq, branch (a replay carries it on).
    flow: dict[str, Any] | None = None


class DeadLetterSink(Protocol):
    async def store(self, record: DeadLetterRecord) -> None:
        """Store durably (idempotent by ``record.id``); return only once committed."""

    async def dead_letter_function_done(self, dl_id: str, ok: bool, error: str | None) -> None:
        """Record the outcome of the delivery to the dead-letter function."""

    async def find(self, dl_id: str) -> tuple[DeadLetterRecord, str] | None:
        """A stored dead letter and the state of its dead-letter function's delivery."""

    async def replay_finished(
        self, dl_id: str, ok: bool, attempts: list[dict[str, Any]], error: tuple[str, str] | None
    ) -> str | None:
        """A replay of dead letter ``dl_id`` is over: resolve it, or append the attempts."""


class Connector(Protocol):
    """A source's connection to its transport. ``run`` consumes until cancelled, handing each
    message to ``ctx.deliver`` and acknowledging it to the transport only after ``deliver``
    returned (the events are then durably in JetStream). It raises when the connection fails:
    the supervisor restarts it with capped backoff, and whatever was not acknowledged is
    redelivered by the transport."""

    async def run(self, ctx: Any) -> None: ...
