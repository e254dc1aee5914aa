"""Function versions and aliases: which URL and settings an invocation of ``f`` is sent to.

A target names a function and, after a colon, one of its versions or aliases: ``resize``,
``resize:v4``, ``resize:prod``. A plain ``resize`` means the function's ``default`` (itself a
version or an alias; ``latest`` unless set). ``latest`` is the version the Function's top-level
settings describe; it may change with every apply. Every other version is immutable once stored.

An alias points at one version or at several with integer weights summing to 100. The version
is chosen once, when the invocation is enqueued, from a stable hash of a key (the invocation id;
an ordered binding's partition key): the same invocation always lands on the same version, and
as a canary's weight grows, keys move from the stable version to the canary and never back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from eventhub.errors import FieldProblem

if TYPE_CHECKING:
    from eventhub.resources import FunctionSpec, VersionSpec

LATEST = "latest"
_BUCKETS = 10_000  # a weight of 1 % is 100 buckets: fine enough for any integer weight

Weights = tuple[tuple[str, int], ...]  # (version, weight), weights summing to 100


@dataclass(frozen=True, slots=True)
class Target:
    """``function`` and, when named, the version or alias after the colon."""

    function: str
    selector: str | None = None

    @classmethod
    def parse(cls, text: str) -> Target:
        function, colon, selector = text.partition(":")
        return cls(function, selector if colon else None)  # "f:" names nothing: refused

    def __str__(self) -> str:
        return self.function if self.selector is None else f"{self.function}:{self.selector}"


@dataclass(frozen=True, slots=True)
class Choice:
    """The version an invocation goes to, and the alias it went through (if any)."""

    version: str
    alias: str | None = None


@dataclass(frozen=True, slots=True)
class Withdrawal:
    """A rolled-back canary: what becomes of invocations still queued for it through its
    alias: sent to the ``stable`` version instead, or stored as dead letters."""

    action: Literal["stable", "dead-letter"]
    stable: str
    rollout: str


@dataclass(frozen=True)
class Overrides:
    """What rollouts set over the declared aliases: weights in force, by (function, alias), and
    withdrawn versions, by (function, alias, version)."""

    weights: Mapping[tuple[str, str], Weights] = field(default_factory=dict)
    withdrawn: Mapping[tuple[str, str, str], Withdrawal] = field(default_factory=dict)

    def of(self, function: str, spec: FunctionSpec) -> dict[str, Weights]:
        """The weights a rollout sets on ``function``'s aliases (only aliases it still has)."""
        return {
            alias: weights
            for (name, alias), weights in self.weights.items()
            if name == function and alias in spec.aliases
        }


def bucket(key: str) -> int:
    """A stable number in [0, _BUCKETS) for ``key``."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _BUCKETS


def pick(weights: Weights, key: str) -> str:
    """The version whose share of the buckets holds ``key``'s bucket. The versions are taken
    in the order given (the stable one first), so raising the last one's weight only moves
    keys to it."""
    point = bucket(key)
    edge = 0
    for version, weight in weights:
        edge += weight * _BUCKETS // 100
        if point < edge:
            return version
    return next(v for v, w in reversed(weights) if w > 0)


def alias_weights(spec: FunctionSpec) -> dict[str, Weights]:
    """Each declared alias's weights; a plain version name weighs 100."""
    out: dict[str, Weights] = {}
    for name, value in spec.aliases.items():
        out[name] = ((value, 100),) if isinstance(value, str) else tuple(value.items())
    return out


def names(spec: FunctionSpec) -> set[str]:
    """Every version and alias a target may name."""
    declared = set(spec.versions) | set(spec.aliases)
    return declared | {LATEST} if spec.url is not None else declared


def choose(
    spec: FunctionSpec,
    selector: str | None,
    key: str,
    weights: Mapping[str, Weights] | None = None,
) -> Choice:
    """The version ``selector`` (None: the function's default) resolves to for ``key``.
    ``weights``: each alias's weights in force (a rollout changes them), by alias name.
    Raises KeyError for a name the function does not have."""
    name = selector or spec.default
    table = weights if weights is not None else alias_weights(spec)
    if name in table:
        return Choice(pick(table[name], key), name)
    if (name == LATEST and spec.url is not None) or name in spec.versions:
        return Choice(name)
    raise KeyError(name)


def version_spec(spec: FunctionSpec, version: str) -> VersionSpec | None:
    """The settings of one version; None if the function no longer has it."""
    if version == LATEST:
        return spec.latest
    return spec.versions.get(version)


def problems(spec: FunctionSpec) -> list[FieldProblem]:
    """What is wrong with a Function's versions, aliases and default, each at its field."""
    found: list[FieldProblem] = []
    if spec.url is None and not spec.versions:
        return [FieldProblem("spec.url", "is required unless spec.versions names a version")]
    if LATEST in spec.versions:
        found.append(
            FieldProblem(
                f"spec.versions.{LATEST}", "is reserved for the top-level settings (spec.url)"
            )
        )
    versions = set(spec.versions) | ({LATEST} if spec.url is not None else set())
    for alias, value in spec.aliases.items():
        path = f"spec.aliases.{alias}"
        if alias in versions or alias == LATEST:
            found.append(FieldProblem(path, "an alias cannot have a version's name"))
            continue
        weights = {value: 100} if isinstance(value, str) else value
        if not weights:
            found.append(FieldProblem(path, "must name a version, or versions with weights"))
        for version in weights:
            if version not in versions:
                found.append(FieldProblem(f"{path}.{version}", "is not a version of this function"))
        if not isinstance(value, str) and sum(value.values()) != 100:
            found.append(FieldProblem(path, "the weights must add up to 100"))
    if spec.default == LATEST and spec.url is None:
        found.append(
            FieldProblem(
                "spec.default",
                "is required without a top-level url: name the version or alias that a plain"
                " function name calls",
            )
        )
    elif spec.default not in versions and spec.default not in spec.aliases:
        found.append(
            FieldProblem("spec.default", f"'{spec.default}' is not a version or alias of it")
        )
    return found
