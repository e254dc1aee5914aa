"""Expressions over an event: its context attributes and its JSON payload, in CEL.

A binding's ``cel`` filter (and anything else that must decide on an event's content) is an
expression in the Common Expression Language (CEL), compiled once by
:func:`compile_expression` and evaluated per event by :meth:`Expression.evaluate`.

Why CEL, and not CloudEvents SQL (CESQL):
- CESQL v1 reads context attributes only: it has no way to reach ``data``, which is the point
  here. CEL reads nested JSON (``data.customer.tier``), lists and maps, with macros
  (``data.items.exists(i, i.sku == 'x')``).
- CEL is what Kubernetes (ValidatingAdmissionPolicy, CRD rules), Argo, Envoy and Google
  Eventarc write their conditions in: its syntax and semantics are specified, and most
  operators have met it. It never loops or has side effects, so evaluation is bounded by the
  expression and the payload's size (regular expressions are RE2: linear time).

How: cel-python (``celpy``) parses, with the grammar of the CEL specification, and reports
syntax errors with their line and column. Its runners evaluate too slowly to sit on the
routing path (``benchmarks/payload_filters.py``, same run): 290 µs interpreted and 35 µs
transpiled for ``data.amount > 100 && data.customer.tier in ['gold', 'silver']``, plus about
60 µs per event to convert a 300-byte payload to its value types; with 5 bindings per event,
more than the hub's whole CPU time per event. Profiled, the time goes to a decorator rebuilt
at every comparison (``functools.wraps`` per call), literals constructed anew at each
evaluation, a name lookup that searches nested packages, and (transpiled) the module
``exec``-uted again per evaluation. :mod:`eventhub.celcompile` compiles celpy's parse tree into
Python closures instead, over the payload exactly as ``orjson`` parses it: about 1 µs for the
same expression. Semantics are CEL's, with the choices listed in :mod:`eventhub.celruntime`
(numbers across int and double); a property test checks the results against cel-python's
interpreter.

What an expression sees:
- ``data``: the payload parsed as JSON when ``datacontenttype`` is JSON (``application/json``,
  ``text/json``, any ``+json``) or absent and the body parses; otherwise ``null`` (no body, a
  body that is not JSON, another media type). Parsed at most once per event, and only when an
  expression that reads ``data`` is evaluated.
- Each context attribute and extension by name (``type``, ``source``, ``subject``, ``id``,
  ``time``, ``partitionkey`` ...), as a string in its canonical form (``time`` too:
  ``timestamp(time)`` makes it a timestamp). An attribute the event lacks is an error.
- Nothing else: another name is refused when the expression is compiled.

Results: an event matches only when the expression yields ``true``. ``false``, a value that is
not a bool, and a runtime error (a missing field such as ``data.amount`` on a payload without
it, ``data`` being ``null``, a type mismatch such as ``data.amount > 'x'``, division by zero)
all mean "no match"; never an exception. Errors are logged at debug level
(``expression_failed``, with the expression, the event id and the error). ``&&`` and ``||``
absorb an error when the other side decides (``has(data.a) && data.a > 1``), as CEL says.

Compile errors (:class:`ExpressionError`) name the path given to :func:`compile_expression`
and the position: ``spec.filter[1].cel: syntax error at column 14: unexpected '>'``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any

import orjson
import structlog
from celpy.celparser import CELParseError, CELParser
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedEOF, UnexpectedToken

from eventhub.celcompile import CompileError, Program, compile_tree
from eventhub.celruntime import EvalError
from eventhub.events import Event

__all__ = [
    "EvaluationError",
    "Expression",
    "ExpressionError",
    "Scope",
    "compile_expression",
    "compile_value",
    "parse_data",
]

log = structlog.get_logger(__name__)

_JSON_MEDIA = re.compile(r"(?:application|text)/(?:[^/;\s]+\+)?json\s*(?:;.*)?", re.I | re.S)
_UNPARSED: Any = object()


class ExpressionError(ValueError):
    """An expression that does not compile; ``path`` names where it was written."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class EvaluationError(ValueError):
    """An expression has no value for this input: a missing field, a type mismatch ... (only
    :meth:`Expression.value` raises it; :meth:`Expression.evaluate` says "no match")."""


def parse_data(datacontenttype: str | None, body: bytes) -> object:
    """An event's ``data`` as expressions see it: parsed JSON, or None (see the module)."""
    if not body or (datacontenttype is not None and not _JSON_MEDIA.fullmatch(datacontenttype)):
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


class Scope(Mapping[str, object]):
    """One event as expressions see it: its attributes, and ``data`` parsed on first use.

    The router makes one per event and hands it to every binding that has an expression, so
    the payload is parsed once however many evaluate it. A Scope is also a mapping of the
    attributes, so the attribute dialects of a filter read it as they read the attributes."""

    __slots__ = ("_body", "_data", "attributes")

    def __init__(self, attributes: Mapping[str, str], body: bytes = b"") -> None:
        self.attributes = attributes
        self._body = body
        self._data = _UNPARSED

    @classmethod
    def of(cls, event: Event) -> Scope:
        return cls(event.attributes, event.data)

    @classmethod
    def of_data(cls, data: object, attributes: Mapping[str, str] | None = None) -> Scope:
        """A scope whose ``data`` is ``data`` as it is (a JSON value already parsed)."""
        scope = cls(attributes if attributes is not None else {})
        scope._data = data
        return scope

    @property
    def data(self) -> object:
        data = self._data
        if data is _UNPARSED:
            data = self._data = parse_data(self.attributes.get("datacontenttype"), self._body)
        return data

    def attribute(self, name: str) -> str:
        value = self.attributes.get(name)
        if value is None:
            raise EvalError(f"the event has no attribute {name!r}")
        return value

    def __getitem__(self, name: str) -> object:
        return self.attributes[name]

    def get(self, name: str, default: object = None) -> object:
        return self.attributes.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.attributes)

    def __len__(self) -> int:
        return len(self.attributes)


class Expression:
    """A compiled expression; immutable, shared by every resource that wrote the same text."""

    __slots__ = ("_facts", "_fn", "text", "uses_data")

    def __init__(self, text: str, program: Program) -> None:
        self.text = text
        self.uses_data = program.uses_data  # False: evaluating it never parses the payload
        self._fn = program.fn
        self._facts = dict(program.facts)

    def evaluate(self, event: Event | Scope) -> bool:
        """Whether ``event`` matches: the expression yields ``true``. Never raises."""
        return self.matches(event if isinstance(event, Scope) else Scope.of(event))

    def evaluate_data(self, data: object, attributes: Mapping[str, str] | None = None) -> bool:
        """Whether the expression is true with ``data`` bound to a JSON value already parsed
        (and the attributes, if given). Never raises."""
        return self.matches(Scope.of_data(data, attributes))

    def matches(self, scope: Scope) -> bool:
        try:
            result = self._fn(scope, ())
        except EvalError as exc:
            self._failed(scope, str(exc))
            return False
        except Exception as exc:  # deeper than Python's recursion limit, and the like
            self._failed(scope, f"{type(exc).__name__}: {exc}")
            return False
        if result is True:
            return True
        if result is not False:
            self._failed(scope, f"yields {type(result).__name__}, not a bool")
        return False

    def value(self, data: object, attributes: Mapping[str, str] | None = None) -> object:
        """The expression's value, of any type, with ``data`` bound to a JSON value already
        parsed (and the attributes, if given); for an expression compiled by
        :func:`compile_value`. JSON values come back as they are (lists, dicts ...), a
        timestamp as an aware ``datetime``, a duration as a ``timedelta``, bytes as ``bytes``.
        Raises :class:`EvaluationError` when it has no value for this input."""
        try:
            return self._fn(Scope.of_data(data, attributes), ())
        except EvalError as exc:
            raise EvaluationError(str(exc)) from None
        except Exception as exc:  # deeper than Python's recursion limit, and the like
            raise EvaluationError(f"{type(exc).__name__}: {exc}") from None

    def required(self, attribute: str) -> str | None:
        """The value ``attribute`` must equal for the expression to be true, when its top level
        is a conjunction naming it (``type == 'x' && ...``); None otherwise."""
        return self._facts.get(attribute)

    def _failed(self, scope: Scope, error: str) -> None:
        log.debug(
            "expression_failed",
            expression=self.text,
            event_id=scope.attributes.get("id"),
            error=error,
        )

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"


def compile_expression(text: str, path: str = "expression") -> Expression:
    """Compile a condition (it must be able to yield a bool: ``data.amount + 1`` is refused);
    raises :class:`ExpressionError` naming ``path`` and the position. Compiled expressions are
    cached by text: a hub whose bindings share an expression compiles it once."""
    return _checked(text, path, boolean=True)


def compile_value(text: str, path: str = "expression") -> Expression:
    """Compile an expression whose value is wanted, of any type (``{'id': data.id}``), read
    with :meth:`Expression.value`; errors as :func:`compile_expression`."""
    return _checked(text, path, boolean=False)


def _checked(text: str, path: str, *, boolean: bool) -> Expression:
    if not isinstance(text, str):
        raise ExpressionError(path, f"must be a CEL expression string, got {type(text).__name__}")
    if not text.strip():
        raise ExpressionError(path, "must not be empty")
    try:
        return _compile(text, boolean)
    except _Refused as exc:
        raise ExpressionError(path, exc.message) from None


class _Refused(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@lru_cache(maxsize=4096)
def _compile(text: str, boolean: bool) -> Expression:
    try:
        tree = CELParser().parse(text)
    except (CELParseError, LarkError) as exc:
        raise _Refused(_syntax_error(text, exc)) from None
    except RecursionError:
        raise _Refused("nested too deeply") from None
    try:
        return Expression(text, compile_tree(tree, boolean=boolean))
    except CompileError as exc:
        raise _Refused(f"error {_at(text, exc.line, exc.column)}: {exc.message}") from None
    except RecursionError:
        raise _Refused("nested too deeply") from None


def _syntax_error(text: str, exc: Exception) -> str:
    cause = exc.__context__ if isinstance(exc, CELParseError) else exc
    line = getattr(cause, "line", None) or getattr(exc, "line", None) or 1
    column = getattr(cause, "column", None) or getattr(exc, "column", None) or 1
    if isinstance(cause, UnexpectedToken) and cause.token.type != "$END":
        what = f"unexpected {str(cause.token)!r}"
    elif isinstance(cause, UnexpectedCharacters):
        at = cause.pos_in_stream
        char = text[at] if at is not None and 0 <= at < len(text) else ""
        what = f"unexpected character {char!r}"
        if char in "'\"":
            what += " (a string that is not closed?)"
    elif isinstance(cause, UnexpectedToken | UnexpectedEOF):
        lines = text.rstrip().splitlines() or [""]
        line, column = len(lines), len(lines[-1]) + 1
        what = "the expression ends too early"
    else:
        what = "invalid expression"
    return f"syntax error {_at(text, line, column)}: {what}"


def _at(text: str, line: int, column: int) -> str:
    return (
        f"at column {column}" if "\n" not in text.rstrip() else f"at line {line}, column {column}"
    )
