"""Lenient Kafka record decoding: a header name that is not UTF-8 is handed over (as surrogate
escapes) instead of failing the fetch, the records around it are handed over once each, in
order, and ordinary batches keep aiokafka's own (C, when built) reader."""

from __future__ import annotations

import pytest
from aiokafka.consumer import fetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.record import default_records
from aiokafka.record.memory_records import MemoryRecords

from connectors import kafkawire
from tests.kafka_records import RawName

GZIP = default_records.DefaultRecordBase.CODEC_GZIP
NONE = default_records.DefaultRecordBase.CODEC_NONE


def fetched(names: list[bytes], compression: int = NONE, base_offset: int = 0) -> bytes:
    """One v2 batch, record ``i`` with value ``r<i>`` and one header named ``names[i]``."""
    builder = default_records._DefaultRecordBatchBuilderPy(
        magic=2,
        compression_type=compression,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1024 * 1024,
    )
    for i, name in enumerate(names):
        headers = [(RawName(name), b"v")]
        builder.append(i, timestamp=1_000 + i, key=None, value=f"r{i}".encode(), headers=headers)
    data = bytearray(builder.build())
    data[0:8] = base_offset.to_bytes(8, "big")  # BaseOffset, outside the CRC
    return bytes(data)


def read(data: bytes) -> list[tuple[int, bytes | None, list[tuple[str, bytes | None]]]]:
    records = kafkawire.LenientRecords(data)
    result = []
    while records.has_next():
        batch = records.next_batch()
        assert batch.validate_crc()  # the real CRC: what a consumer checks before reading
        result += [(r.offset, r.value, list(r.headers)) for r in batch]
    return result


@pytest.mark.parametrize("compression", [NONE, GZIP], ids=["plain", "gzip"])
def test_records_around_a_name_that_is_not_utf8_come_once_each_in_order(compression: int) -> None:
    data = fetched([b"a", b"\xff\xfe", b"b", b"c\x80"], compression, base_offset=40)
    data += fetched([b"d"], compression, base_offset=44)
    assert read(data) == [
        (40, b"r0", [("a", b"v")]),
        (41, b"r1", [("\udcff\udcfe", b"v")]),
        (42, b"r2", [("b", b"v")]),
        (43, b"r3", [("c\udc80", b"v")]),
        (44, b"r0", [("d", b"v")]),
    ]


def test_aiokafka_alone_fails_on_such_a_name() -> None:
    records = MemoryRecords(fetched([b"a", b"\xff"]))
    with pytest.raises((UnicodeDecodeError, CorruptRecordException)):
        list(records.next_batch())


def test_an_ordinary_batch_keeps_aiokafkas_reader() -> None:
    batch = kafkawire.LenientRecords(fetched([b"a", b"b"])).next_batch()
    assert all(type(record) is default_records.DefaultRecord for record in batch)


def test_a_corrupt_batch_still_fails() -> None:
    data = bytearray(fetched([b"a"]))
    assert data[-5:] == b"\x02\x02a\x02v"  # one header: name of 1 byte "a", value of 1 byte
    data[-5] = 0x04  # two headers, more than the record holds
    with pytest.raises(CorruptRecordException):
        list(kafkawire.LenientRecords(bytes(data)).next_batch())


def test_a_record_is_unreadable_only_for_a_header_name_that_is_not_utf8() -> None:
    assert kafkawire.unreadable([("ce_id", b"\xff"), ("é", None)]) is None
    reason = kafkawire.unreadable([("ok", b""), ("\udcffid", b"v")])
    assert reason == "invalid-header: the header name '\\udcffid' is not UTF-8"


def test_install_makes_the_fetcher_read_leniently() -> None:
    kafkawire.install()
    kafkawire.install()
    assert fetcher.MemoryRecords is kafkawire.LenientRecords
