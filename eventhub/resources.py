"""The declarative resources: Function, Source, Binding and Flow.

Each is a YAML document::

    apiVersion: eventhub/v1
    kind: Function            # Function | Source | Binding | Flow
    metadata: {name: resize-image}
    spec: {...}

They are validated when declared (``eventhub apply``, ``PUT /v1/...``), never at first delivery:
a problem is reported with the file, the resource and the field (``spec.retry.maxAttempts``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from eventhub import combos, versions, yamlload
from eventhub.errors import FieldProblem, ResourceInvalid
from eventhub.filters import FilterError, compile_filters
from eventhub.flows import spec as flows
from eventhub.flows.spec import FlowSpec
from eventhub.sourcespecs import SourceTypeSpec
from eventhub.units import Rate, parse_duration, parse_rate

API_VERSION = "eventhub/v1"
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
_NAME = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
TARGET_PATTERN = rf"^{_NAME}(:{_NAME})?$"  # a function, then maybe ':' and a version or alias
API_SOURCE = "api"

Duration = Annotated[float, BeforeValidator(parse_duration)]


class Kind(StrEnum):
    FUNCTION = "Function"
    SOURCE = "Source"
    BINDING = "Binding"
    FLOW = "Flow"

    @property
    def plural(self) -> str:
        return self.value.lower() + "s"


class _Spec(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class RetrySpec(_Spec):
    max_attempts: int = Field(default=3, ge=1, le=100)
    initial_delay: Duration = 1.0
    max_delay: Duration = 300.0
    multiplier: float = Field(default=2.0, ge=1.0, le=10.0)
    # Fraction of each delay drawn at random (0: none, 1: "full jitter").
    jitter: float = Field(default=0.2, ge=0.0, le=1.0)


_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")


class DeadLetterSpec(_Spec):
    function: str = Field(pattern=TARGET_PATTERN)


class DestinationSpec(_Spec):
    """Where a function's result goes: a function target, or back into the hub as an event
    that bindings with ``source: function:<name>`` route (``events: true``)."""

    function: str | None = Field(default=None, pattern=TARGET_PATTERN)
    events: bool = False

    @model_validator(mode="after")
    def _one(self) -> DestinationSpec:
        if (self.function is None) == (not self.events):
            raise ValueError("give either function or events: true")
        return self


def _check_url(value: str) -> str:
    from yarl import URL

    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an absolute http:// or https:// URL")
    return value


class _CallSpec(_Spec):
    """How a version is called: shared by a Function's top level (its ``latest`` version) and
    each of its named versions."""

    timeout: Duration = 30.0
    retry: RetrySpec = RetrySpec()
    max_event_age: Duration = 6 * 3600.0
    event_format: Literal["binary", "structured"] = "binary"
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        # Sent with every call: the HTTP client would refuse them then, on every attempt.
        for name, text in value.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"'{name}' is not a valid HTTP header name")
            if _HEADER_CONTROL.search(text):
                raise ValueError(f"'{name}': the value must not contain control characters")
        return value

    @field_validator("timeout")
    @classmethod
    def _positive_timeout(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be positive")
        return value


class VersionSpec(_CallSpec):
    """One version of a function: its URL and how it is called. Immutable once stored."""

    url: str

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _check_url(value)


_VERSION_NAME = Annotated[str, Field(pattern=NAME_PATTERN)]
_WEIGHT = Annotated[int, Field(ge=0, le=100)]


class FunctionSpec(_CallSpec):
    # The version "latest"; optional when named versions are declared.
    url: str | None = None
    versions: dict[_VERSION_NAME, VersionSpec] = Field(default_factory=dict)
    # An alias: one version's name, or versions with integer weights adding up to 100.
    aliases: dict[_VERSION_NAME, _VERSION_NAME | dict[_VERSION_NAME, _WEIGHT]] = Field(
        default_factory=dict
    )
    default: str = "latest"  # what a plain function name calls: a version or an alias
    max_concurrency: int = Field(default=10, ge=1, le=10_000)  # shared by every version
    rate_limit: Rate | None = None  # shared by every version
    dead_letter: DeadLetterSpec | None = None
    on_success: DestinationSpec | None = None  # the result of a successful call goes here
    on_failure: DestinationSpec | None = None  # the invocation record of a final failure
    # at-most-once: acknowledged before the call; never retried, never redelivered.
    delivery: Literal["at-least-once", "at-most-once"] = "at-least-once"

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value)

    @field_validator("aliases", mode="before")
    @classmethod
    def _check_aliases(cls, value: object) -> object:
        """Plain messages for the usual mistakes (a weight of ``true`` or ``"40"`` is refused,
        not converted), naming the alias."""
        if not isinstance(value, Mapping):
            return value
        for alias, target in value.items():
            if isinstance(target, str):
                continue
            if not isinstance(target, Mapping):
                raise ValueError(
                    f"{alias}: must be a version's name, or versions with weights"
                    " ({v1: 90, v2: 10})"
                )
            for version, weight in target.items():
                if type(weight) is not int or not 0 <= weight <= 100:
                    raise ValueError(
                        f"{alias}.{version}: a weight is a whole number from 0 to 100"
                        f" (got {weight!r})"
                    )
        return value

    @field_validator("rate_limit", mode="before")
    @classmethod
    def _parse_rate(cls, value: object) -> object:
        return parse_rate(value) if isinstance(value, str) else value

    @functools.cached_property
    def latest(self) -> VersionSpec | None:
        """The top-level settings as a version (None without a top-level ``url``)."""
        if self.url is None:
            return None
        return VersionSpec(
            url=self.url,
            timeout=self.timeout,
            retry=self.retry,
            max_event_age=self.max_event_age,
            event_format=self.event_format,
            headers=self.headers,
        )


class DependencySpec(_Spec):
    """One event a combination binding waits for (see :mod:`eventhub.combos`)."""

    name: str = Field(pattern=combos.DEPENDENCY_NAME)
    source: str = Field(pattern=rf"^(function:)?{_NAME}$")
    filter: list[Any] = Field(default_factory=list)  # checked in combos.problems


class BindingSpec(_Spec):
    # A Source's name, "api", or "function:<name>" for that function's result events.
    # Empty only for a combination, whose dependencies name their sources.
    source: str = Field(default="", pattern=rf"^((function:)?{_NAME})?$")
    function: str | None = Field(default=None, pattern=TARGET_PATTERN)  # f, f:version, f:alias
    flow: str | None = Field(default=None, pattern=NAME_PATTERN)  # or a Flow: each event a run
    # Validated by eventhub.filters in parse_resource, which names the exact path.
    filter: list[Any] = Field(default_factory=list)
    # ordered: events with the same ``partitionkey`` are invoked one after another.
    ordering: Literal["unordered", "ordered"] = "unordered"
    # A combination (eventhub.combos): fires on a condition over several events.
    dependencies: list[DependencySpec] | None = Field(default=None, min_length=1, max_length=32)
    condition: str | None = Field(default=None, min_length=1, max_length=4096)
    correlate: str | None = Field(default=None, min_length=1, max_length=4096)
    window: Duration = 600.0

    @field_validator("window")
    @classmethod
    def _check_window(cls, value: float) -> float:
        if not 0 < value <= combos.MAX_WINDOW:
            raise ValueError("must be positive and at most 24h")
        return value

    @model_validator(mode="after")
    def _one_target(self) -> BindingSpec:
        if (self.function is None) == (self.flow is None):
            raise ValueError("give either function or flow")
        if self.flow is not None and self.ordering == "ordered":
            raise ValueError("ordering: ordered applies to a function, not a flow")
        return self


SPEC_ADAPTERS: dict[Kind, TypeAdapter[Any]] = {
    Kind.FUNCTION: TypeAdapter(FunctionSpec),
    Kind.SOURCE: TypeAdapter(SourceTypeSpec),
    Kind.BINDING: TypeAdapter(BindingSpec),
    Kind.FLOW: TypeAdapter(FlowSpec),
}
_SOURCE_TYPES = ("kafka", "rabbitmq", "mqtt", "minio", "cron")


@dataclass(frozen=True)
class Resource:
    """A validated resource; ``spec`` is kept as the user wrote it, ``model`` is its typed form."""

    kind: Kind
    name: str
    spec: Mapping[str, Any]
    model: Any
    labels: Mapping[str, str]
    paused: bool = False  # an operator's switch, not part of the declared spec

    def document(self) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": self.name}
        if self.labels:
            metadata["labels"] = dict(self.labels)
        doc: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": self.kind.value,
            "metadata": metadata,
            "spec": dict(self.spec),
        }
        doc["status"] = {"paused": self.paused}
        return doc


def parse_resource(doc: object, origin: str = "", *, kind: Kind | None = None) -> Resource:
    """Validate one resource document; raises ResourceInvalid naming origin, resource, field."""
    if not isinstance(doc, Mapping):
        raise _invalid(origin, "resource", "?", "", "must be a mapping with apiVersion and kind")
    raw_kind = doc.get("kind")
    known = ("apiVersion", "kind", "metadata", "spec", "status")  # status: read-only, ignored
    unknown = sorted(str(k) for k in doc if k not in known)
    metadata = doc.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    shown = name if isinstance(name, str) else "?"
    label = str(raw_kind) if raw_kind else "resource"
    if doc.get("apiVersion") != API_VERSION:
        raise _invalid(origin, label, shown, "apiVersion", f"must be '{API_VERSION}'")
    try:
        parsed_kind = Kind(str(raw_kind))
    except ValueError:
        raise _invalid(
            origin, label, shown, "kind", "must be one of Function, Source, Binding, Flow"
        ) from None
    if kind is not None and parsed_kind is not kind:
        raise _invalid(origin, label, shown, "kind", f"must be {kind.value} here")
    if unknown:
        raise _invalid(origin, label, shown, unknown[0], "is not a resource field")
    if not isinstance(metadata, Mapping):
        raise _invalid(origin, label, shown, "metadata", "must be a mapping with a name")
    if not isinstance(name, str) or not _valid_name(name):
        raise _invalid(
            origin,
            label,
            shown,
            "metadata.name",
            "must be 1-63 lowercase letters, digits or '-', starting and ending alphanumeric",
        )
    labels = metadata.get("labels") or {}
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise _invalid(origin, label, name, "metadata.labels", "must map strings to strings")
    spec = doc.get("spec")
    if not isinstance(spec, Mapping):
        raise _invalid(origin, label, name, "spec", "is required and must be a mapping")
    try:
        model = SPEC_ADAPTERS[parsed_kind].validate_python(spec)
    except ValidationError as exc:
        problems = tuple(
            FieldProblem(_field_path(_without_tag(parsed_kind, err)), _message(err))
            for err in exc.errors()
        )
        if parsed_kind is Kind.BINDING and "function" not in spec and "flow" not in spec:
            problems = (
                *(p for p in problems if p.field != "spec"),
                FieldProblem("spec.function", "Field required (or give flow)"),
            )
        if parsed_kind is Kind.BINDING and "source" not in spec and "dependencies" not in spec:
            problems = (*problems, FieldProblem("spec.source", "Field required"))
        raise ResourceInvalid(origin=origin, kind=label, name=name, problems=problems) from None
    if isinstance(model, FunctionSpec) and (found := versions.problems(model)):
        raise ResourceInvalid(origin=origin, kind=label, name=name, problems=tuple(found))
    if isinstance(model, FlowSpec) and (found := flows.problems(model)):
        raise ResourceInvalid(origin=origin, kind=label, name=name, problems=tuple(found))
    if isinstance(model, BindingSpec) and (found := _binding_shape(model)):
        raise ResourceInvalid(origin=origin, kind=label, name=name, problems=tuple(found))
    if isinstance(model, BindingSpec) and model.dependencies is not None:
        if found := combos.problems(model):
            raise ResourceInvalid(origin=origin, kind=label, name=name, problems=tuple(found))
    elif isinstance(model, BindingSpec):
        try:
            compile_filters(model.filter, path="spec.filter")
        except FilterError as exc:
            raise ResourceInvalid(
                origin=origin,
                kind=label,
                name=name,
                problems=(FieldProblem(exc.path, exc.message),),
            ) from None
    try:
        orjson.dumps(spec)  # it is stored as JSON: no integer above 64 bits, bytes, int keys
    except TypeError as exc:
        raise _invalid(origin, label, name, "spec", f"cannot be stored as JSON: {exc}") from None
    return Resource(parsed_kind, name, dict(spec), model, dict(labels))


def _binding_shape(spec: BindingSpec) -> list[FieldProblem]:
    """A plain binding has a source; a combination has dependencies, each with its own."""
    if spec.dependencies is None:
        if not spec.source:
            return [FieldProblem("spec.source", "Field required (or give dependencies)")]
        for field, value in (("condition", spec.condition), ("correlate", spec.correlate)):
            if value is not None:
                return [FieldProblem(f"spec.{field}", "applies only with spec.dependencies")]
        return []
    for field, given in (("source", bool(spec.source)), ("filter", bool(spec.filter))):
        if given:
            return [FieldProblem(f"spec.{field}", "give it in each of spec.dependencies")]
    if spec.ordering == "ordered":
        return [FieldProblem("spec.ordering", "ordered does not apply to a combination")]
    return []


def load_path(path: Path) -> list[Resource]:
    """Every resource in a file or in the ``*.yaml``/``*.yml`` files of a folder (sorted)."""
    files = (
        sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
        if path.is_dir()
        else [path]
    )
    resources: list[Resource] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise _invalid(str(file), "file", file.name, "", exc.strerror or str(exc)) from None
        except UnicodeDecodeError as exc:
            where = f"is not UTF-8 text (byte {exc.start})"
            raise _invalid(str(file), "file", file.name, "", where) from None
        resources.extend(parse_text(text, str(file)))
    return resources


def parse_text(text: str, origin: str) -> list[Resource]:
    """Every resource in a YAML text of one or more documents. ``origin`` (a file name) starts
    each error; a document after the first is named by its place in the text (document 2).
    A key set twice in one mapping is refused, naming the document and the key."""
    resources: list[Resource] = []
    for number, doc in _documents(text, origin):
        where = origin if number == 1 else f"{origin} (document {number})"
        resources.append(parse_resource(doc, where))
    return resources


def _documents(text: str, origin: str) -> list[tuple[int, object]]:
    """The non-empty documents, numbered by their place in the text (from 1). Every document is
    read before any is validated, so a YAML error anywhere is reported first."""
    try:
        docs = list(yamlload.load_all(text))
    except yamlload.DuplicateKey as exc:
        raise ResourceInvalid(
            origin=f"{origin} (document {exc.document})",
            kind=yamlload.scalar_at(exc.root, "kind") or "resource",
            name=yamlload.scalar_at(exc.root, "metadata", "name") or "?",
            problems=(FieldProblem(exc.path, exc.message),),
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        name = Path(origin).name
        raise _invalid(origin, "file", name, "", f"not valid YAML{where}: {exc}") from None
    return [(number, doc) for number, doc in enumerate(docs, start=1) if doc is not None]


def _valid_name(name: str) -> bool:
    import re

    return re.match(NAME_PATTERN, name) is not None


def _without_tag(kind: Kind, err: Mapping[str, Any]) -> tuple[int | str, ...]:
    """A Source's errors are located under its type's tag (``kafka.topics``): drop it."""
    loc: tuple[int | str, ...] = tuple(err["loc"])
    if kind is Kind.SOURCE:
        if str(err.get("type", "")).startswith("union_tag"):
            return ("type",)
        if loc and loc[0] in _SOURCE_TYPES:
            return loc[1:]
    return loc


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts = ["spec"]
    for item in loc:
        if isinstance(item, int):
            parts[-1] += f"[{item}]"
        elif not item.startswith("function-after") and item not in ("dict", "list"):
            parts.append(item)
    return ".".join(parts)


def _message(err: Mapping[str, Any]) -> str:
    if str(err.get("type", "")).startswith("union_tag"):
        return f"must be one of {', '.join(_SOURCE_TYPES)}"
    msg = str(err.get("msg", "is invalid"))
    return msg.removeprefix("Value error, ")


def _invalid(origin: str, kind: str, name: str, field: str, message: str) -> ResourceInvalid:
    return ResourceInvalid(
        origin=origin, kind=kind, name=name, problems=(FieldProblem(field, message),)
    )
