"""Kafka records that a well-behaved producer would not write, built with aiokafka's own
pure-Python record builder."""

from __future__ import annotations


class RawName(str):
    """A header name that goes on the wire as ``raw``, which need not be UTF-8: aiokafka's
    pure-Python record builder writes a name as ``name.encode("utf-8")`` (its C builder refuses
    a name that is not UTF-8)."""

    raw: bytes

    def __new__(cls, raw: bytes) -> RawName:
        name = super().__new__(cls, raw.decode("latin-1"))
        name.raw = raw
        return name

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw
