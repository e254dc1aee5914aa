"""Kafka record decoding that hands every record over: a header name that is not UTF-8 becomes
a value that the Kafka connector rejects, instead of an error that wedges the partition.

aiokafka decodes a record's header names as UTF-8 while ``getmany`` drains a fetched batch (in
its C extension a ``UnicodeDecodeError``, in the pure-Python reader a ``CorruptRecordException``).
The error reaches the caller of ``getmany``, the records already drained with it are dropped,
and the consumer, like every consumer after it, fetches the same offset again and fails the same
way: the partition is stuck behind that record for good.

:func:`install` makes the consumer's fetcher read fetched data through :class:`LenientRecords`,
process-wide (aiokafka has no per-consumer hook for it): batches are still decoded by aiokafka's
own (C, when built) reader; only when that fails on text is the one batch decoded again by the
pure-Python reader, whose header names then keep the bytes that are not UTF-8 as surrogate
escapes. The records the fast reader had already handed over are not handed over twice. The
connector rejects a record with such a name (:func:`unreadable`), so it becomes a dead letter of
the source and the next record flows. A batch that fails for another reason (truly corrupt data)
fails as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, SupportsIndex, overload

from aiokafka.consumer import fetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.record import default_records, memory_records

from connectors.common import is_utf8

_installed = False


def install() -> None:
    """Read fetched records leniently from now on (idempotent; fails loudly, before any record
    is fetched, if this aiokafka no longer decodes the way this module expects)."""
    global _installed
    if _installed:
        return
    if not hasattr(fetcher, "MemoryRecords"):
        raise RuntimeError(
            "this aiokafka's fetcher has no MemoryRecords: records cannot be made safe"
        )
    if self_test() != [("\udcff\udcfe", b"v")]:
        raise RuntimeError("this aiokafka decodes record headers differently: cannot be made safe")
    fetcher.MemoryRecords = LenientRecords
    _installed = True


def unreadable(headers: Iterable[tuple[str, bytes | None]]) -> str | None:
    """Why a record with these headers cannot be read, as a rejection reason; else None."""
    for name, _ in headers:
        if not is_utf8(name):
            return f"invalid-header: the header name {name!r} is not UTF-8"
    return None


class LenientRecords:
    """aiokafka's ``MemoryRecords`` (the fetched data of one partition, batch by batch), whose
    v2 batches fall back to lenient decoding (see the module docs)."""

    def __init__(self, data: bytes) -> None:
        self._records = memory_records._MemoryRecordsPy(data)  # splits batches, makes C ones

    def size_in_bytes(self) -> int:
        return int(self._records.size_in_bytes())

    def has_next(self) -> bool:
        return bool(self._records.has_next())

    def next_batch(self) -> Any:
        raw = self._records._next_slice
        batch = self._records.next_batch()
        if batch is None or raw is None or raw[_MAGIC_OFFSET] < 2:
            return batch  # v0 and v1 records have no headers
        return _LenientBatch(batch, raw)


_MAGIC_OFFSET = memory_records._MemoryRecordsPy.MAGIC_OFFSET


class _LenientBatch:
    """A v2 batch read by aiokafka's reader until it fails on text, then by the lenient one."""

    def __init__(self, batch: Any, raw: memoryview) -> None:
        self._batch = batch
        self._raw = raw
        self._read = 0  # records the fast reader handed over
        self._lenient: Iterator[Any] | None = None

    def __getattr__(self, name: str) -> Any:  # offsets, CRC, transaction flags: as aiokafka's
        return getattr(self._batch, name)

    def __iter__(self) -> _LenientBatch:
        iter(self._batch)  # decompresses
        return self

    def __next__(self) -> Any:
        if self._lenient is None:
            try:
                record = next(self._batch)
            except (UnicodeDecodeError, CorruptRecordException) as exc:
                if not _is_text_error(exc):
                    raise
                self._lenient = _lenient_records(self._raw, self._read)
            else:
                self._read += 1
                return record
        return next(self._lenient)


def _is_text_error(exc: Exception) -> bool:
    return isinstance(exc, UnicodeDecodeError) or isinstance(exc.__cause__, UnicodeDecodeError)


def _lenient_records(raw: memoryview, skip: int) -> Iterator[Any]:
    """The records of one v2 batch after the first ``skip``, header names decoded leniently."""
    batch = default_records._DefaultRecordBatchPy(raw)
    iter(batch)  # decompresses into ``_buffer``, which the reader then decodes from
    batch._buffer = _LenientBuffer(batch._buffer)
    for index, record in enumerate(batch):
        if index >= skip:
            yield record


class _LenientBuffer(bytearray):
    """Record bytes whose slices decode text with the bytes that are not UTF-8 kept as surrogate
    escapes (the pure-Python reader decodes a header name as ``buffer[a:b].decode("utf-8")``)."""

    @overload
    def __getitem__(self, index: SupportsIndex) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> bytearray: ...

    def __getitem__(self, index: SupportsIndex | slice) -> int | bytearray:
        if isinstance(index, slice):
            return _LenientBuffer(super().__getitem__(index))
        return super().__getitem__(index)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return super().decode(encoding, "surrogateescape")


def sample_batch(header_name: bytes) -> bytes:
    """A v2 batch of one record (value ``x``) with this raw header name, which need not be
    UTF-8: the fetched data of a partition, as the broker sends it."""
    placeholder = "\x7f" * len(header_name)  # one byte per character in UTF-8
    builder = default_records._DefaultRecordBatchBuilderPy(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1024 * 1024,
    )
    builder.append(0, timestamp=None, key=None, value=b"x", headers=[(placeholder, b"v")])
    built = bytes(builder.build())
    if built.count(placeholder.encode()) != 1:
        raise RuntimeError("the sample batch does not hold its header name once")
    return built.replace(placeholder.encode(), header_name)  # the CRC no longer matches: unread


def self_test() -> list[tuple[str, bytes | None]]:
    """The headers :class:`LenientRecords` reads from a batch whose header name is not UTF-8."""
    records = LenientRecords(sample_batch(b"\xff\xfe"))
    batch = records.next_batch()
    return [(name, value) for record in batch for name, value in record.headers]
