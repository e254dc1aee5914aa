"""CEL literals as cel-python's lexer gives them: integers (decimal, hex, a sign), strings and
bytes (quotes single or triple, raw ``r''``, the escapes of the CEL specification)."""

from __future__ import annotations

import re


def integer(text: str) -> int:
    negative = text.startswith("-")
    digits = text[1:] if negative else text
    value = int(digits[2:], 16) if digits[:2] in ("0x", "0X") else int(digits, 10)
    return -value if negative else value


_ESCAPE = re.compile(
    r"\\(?:(?P<simple>[abfnrtv\"'\\`?])|x(?P<hex>[0-9a-fA-F]{2})|u(?P<u4>[0-9a-fA-F]{4})"
    r"|U(?P<u8>[0-9a-fA-F]{8})|(?P<octal>[0-3][0-7]{2})|(?P<bad>.?))",
    re.S,
)
_SIMPLE = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def _body(text: str) -> tuple[str, bool]:
    raw = text[:1] in "rR"
    if raw:
        text = text[1:]
    quotes = 3 if text[:3] in ('"""', "'''") else 1
    return text[quotes:-quotes], raw


def unquote(text: str) -> str:
    body, raw = _body(text)
    if raw:
        return body
    return _ESCAPE.sub(lambda m: _escaped(m, as_bytes=False).decode("utf-8", "surrogatepass"), body)


def unquote_bytes(text: str) -> bytes:
    body, raw = _body(text)
    if raw:
        return body.encode("utf-8")
    out, position = bytearray(), 0
    for match in _ESCAPE.finditer(body):
        out += body[position : match.start()].encode("utf-8")
        out += _escaped(match, as_bytes=True)
        position = match.end()
    return bytes(out + body[position:].encode("utf-8"))


def _escaped(match: re.Match[str], *, as_bytes: bool) -> bytes:
    if match["simple"] is not None:
        return _SIMPLE.get(match["simple"], match["simple"]).encode("utf-8")
    if match["hex"] is not None or match["octal"] is not None:
        number = int(match["hex"], 16) if match["hex"] is not None else int(match["octal"], 8)
        return bytes([number]) if as_bytes else chr(number).encode("utf-8")
    code = match["u4"] or match["u8"]
    if code is not None:
        point = int(code, 16)
        if point > 0x10FFFF or 0xD800 <= point <= 0xDFFF:
            raise ValueError(f"invalid code point \\u{code}")
        return chr(point).encode("utf-8")
    raise ValueError(f"invalid escape {match.group(0)!r}")
