"""How big an invocation is as NATS counts it, and the limits eventhub keeps below.

The NATS server refuses a message whose headers and body together exceed its ``max_payload``
(1 MiB by default, sent in the server's INFO) by closing the connection, which fails every
publish and pull in flight. nats-py checks only the body. So every publish is measured here
first, exactly as nats-py encodes it (``HPUB``: ``NATS/1.0\\r\\n``, one ``Key: value\\r\\n``
line per header, ``\\r\\n``, then the body; the subject is not counted), and one that would not
fit is refused with :class:`MessageTooLarge` before anything is sent.

Two reserves keep room for the headers eventhub adds later to a message it already accepted:

- :data:`RETRY_RESERVE`: a retry or a released message carries ``Eh-Invocation-Id``,
  ``Eh-Attempts``, ``Eh-Enqueued``, ``Eh-Due`` and a longer ``Nats-Msg-Id``; every new
  invocation (ingress, replay, a dead-letter function's delivery) keeps this much free.
- :data:`INGRESS_RESERVE`: what comes in (HTTP API, connectors) keeps this much free, which also
  covers the extensions of a replay and of a delivery to a dead-letter function (the error
  excerpt, base64, and the function's URL).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from eventhub.errors import MessageTooLarge

# JetStream refuses to store a message whose header block is longer than 65,535 bytes
# ("header size exceeds maximum allowed of 64k"), whatever max_payload says.
JETSTREAM_MAX_HEADERS = 65535
_HEADER_LINE = len(b"NATS/1.0\r\n")
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
RETRY_RESERVE = 512
INGRESS_RESERVE = 8 * 1024


def header_bytes(headers: Mapping[str, str]) -> int:
    """The size of the header block nats-py sends for ``headers`` (keys and values stripped,
    CR and LF in values replaced, empty keys skipped, as ``Client._send_publish`` does)."""
    size = _HEADER_LINE + 2
    for key, value in headers.items():
        name = key.strip()
        if name:
            size += len(name.encode()) + len(value.strip().translate(_NEWLINES).encode()) + 4
    return size


def message_bytes(headers: Mapping[str, str], data: bytes) -> int:
    """What the NATS server compares with ``max_payload``: headers plus body."""
    return header_bytes(headers) + len(data)


def data_limit(max_payload: int, reserve: int) -> int:
    """The most bytes a message may take (headers included) when ``reserve`` is kept free."""
    return max(0, max_payload - reserve)


def check(
    messages: Iterable[tuple[Mapping[str, str], bytes, str | None]], max_payload: int, reserve: int
) -> None:
    """Raise :class:`MessageTooLarge` for the first (headers, data, event id) that does not fit
    in ``max_payload`` less ``reserve``, or whose headers do not fit in what JetStream stores
    (:data:`JETSTREAM_MAX_HEADERS`) less ``reserve``."""
    limit = data_limit(max_payload, reserve)
    header_limit = data_limit(JETSTREAM_MAX_HEADERS, reserve)
    for headers, data, event_id in messages:
        bound = _ascii_bound(headers)
        if bound is not None and bound <= header_limit and bound + len(data) <= limit:
            continue  # fits: the exact size is never larger than this bound
        header_size = header_bytes(headers)
        if header_size > header_limit:
            raise MessageTooLarge(
                f"the {_what(event_id)}'s attributes take {header_size} bytes as NATS headers,"
                f" above the limit of {header_limit} bytes (JetStream's"
                f" {JETSTREAM_MAX_HEADERS} less {reserve} kept for eventhub's own headers)",
                size=header_size,
                limit=header_limit,
                event_id=event_id,
                field="headers",
            )
        size = header_size + len(data)
        if size > limit:
            raise MessageTooLarge(
                f"the {_what(event_id)} takes {size} bytes with its headers, above the limit of"
                f" {limit} bytes (the NATS server's max_payload of {max_payload} less"
                f" {reserve} kept for eventhub's own headers)",
                size=size,
                limit=limit,
                event_id=event_id,
            )


def _ascii_bound(headers: Mapping[str, str]) -> int | None:
    """An upper bound of :func:`header_bytes` in a few C-level steps, for headers that are all
    ASCII (one byte per character; stripping and skipping only shorten them); None for others."""
    names, values = "".join(headers), "".join(headers.values())
    if not (names.isascii() and values.isascii()):
        return None
    return _HEADER_LINE + 2 + len(names) + len(values) + 4 * len(headers)


def _what(event_id: str | None) -> str:
    return f"event '{event_id}'" if event_id else "invocation"
