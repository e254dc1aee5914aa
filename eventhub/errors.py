"""The exceptions eventhub raises, named by what the caller must do.

::

    EventhubError
    ├── InvalidInput            the caller sent something wrong: fix it (HTTP 400 / 413 / 415)
    │   ├── ResourceInvalid     a declared resource is wrong: names file, resource and field
    │   └── PayloadTooLarge     the body is above the configured limit (413)
    │       └── MessageTooLarge an invocation would not fit in one NATS message
    ├── NotFound                the named resource does not exist (404)
    ├── Conflict                the change contradicts stored state (409)
    ├── Unauthorized            no or unknown bearer token (401)
    ├── Forbidden               the token lacks the scope (403)
    └── Unavailable             retryable: try again later (503, with Retry-After)
        ├── QueueFull           JetStream refused the message: the buffer is full
        └── DependencyDown      PostgreSQL, NATS or Redis cannot be reached

Library exceptions are mapped to these once, where the library is called, with ``raise ... from``.
``retryable`` says whether the same request may succeed later unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldProblem:
    """One problem with one field: ``field`` is a dotted path such as ``spec.retry.maxAttempts``."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class EventhubError(Exception):
    status = 500
    title = "Internal error"
    retryable = False

    def __init__(self, detail: str, *, problems: tuple[FieldProblem, ...] = ()) -> None:
        super().__init__(detail)
        self.detail = detail
        self.problems = problems


class InvalidInput(EventhubError):
    status = 400
    title = "Invalid input"


class ResourceInvalid(InvalidInput):
    title = "Invalid resource"

    def __init__(
        self, *, origin: str, kind: str, name: str, problems: tuple[FieldProblem, ...]
    ) -> None:
        where = f"{origin}: " if origin else ""
        first = "; ".join(str(p) for p in problems)
        super().__init__(f"{where}{kind} '{name}': {first}", problems=problems)
        self.origin = origin
        self.kind = kind
        self.name = name


class PayloadTooLarge(InvalidInput):
    status = 413
    title = "Payload too large"


class MessageTooLarge(PayloadTooLarge):
    """An invocation (event data and every header, as NATS counts them) above ``limit`` bytes:
    refused before anything is published, so no input can make the server close the NATS
    connection. ``event_id`` names the event at fault, when there is one; ``field`` is
    ``body`` for the whole message, ``headers`` when the header block alone is too large."""

    def __init__(
        self,
        detail: str,
        *,
        size: int,
        limit: int,
        event_id: str | None = None,
        field: str = "body",
    ) -> None:
        super().__init__(detail, problems=(FieldProblem(field, f"must fit in {limit} bytes"),))
        self.size = size
        self.limit = limit
        self.event_id = event_id


class UnsupportedMediaType(InvalidInput):
    status = 415
    title = "Unsupported media type"


class NotFound(EventhubError):
    status = 404
    title = "Not found"


class Conflict(EventhubError):
    status = 409
    title = "Conflict"


class Unauthorized(EventhubError):
    status = 401
    title = "Unauthorized"


class Forbidden(EventhubError):
    status = 403
    title = "Forbidden"


class Unavailable(EventhubError):
    status = 503
    title = "Service unavailable"
    retryable = True

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class QueueFull(Unavailable):
    title = "Queue full"


class DependencyDown(Unavailable):
    title = "Dependency unavailable"
