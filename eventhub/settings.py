"""Settings: the one place that reads the environment.

Every setting comes from an ``EVENTHUB_<NAME>`` environment variable or from the YAML file named
by ``EVENTHUB_SETTINGS_FILE`` (environment wins). ``Settings.load()`` returns a frozen object that
is passed down; nothing else reads ``os.environ``.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from eventhub import yamlload
from eventhub.units import parse_duration, parse_size

Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
_NAMESPACE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_CALLBACK_HOST = re.compile(r"^(\*\.)?[\w-]+(\.[\w-]+)*\.?$", re.ASCII)


class Scope(StrEnum):
    INVOKE = "invoke"
    EVENTS = "events"
    ADMIN = "admin"
    DLQ = "dlq"


class _YamlFileSource(PydanticBaseSettingsSource):
    """Reads the YAML settings file named by ``EVENTHUB_SETTINGS_FILE`` (keys as field names)."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | None) -> None:
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if path:
            try:
                loaded = yamlload.load(Path(path).read_text(encoding="utf-8")) or {}
            except yamlload.DuplicateKey as exc:  # a key set twice: refused, not "last wins"
                raise ValueError(f"{path}: {exc}") from None
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: the settings file must be a mapping of names to values")
            self._data = {str(k).replace("-", "_").lower(): v for k, v in loaded.items()}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EVENTHUB_", frozen=True, extra="ignore")

    # Where the services are.
    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/postgres")
    nats_url: SecretStr = SecretStr("nats://127.0.0.1:4222")
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    # Isolates one deployment: PostgreSQL schema, JetStream stream and subjects, Redis keys.
    namespace: str = "eventhub"

    # HTTP API.
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Bearer tokens and their scopes, e.g. {"s3cret": ["admin", "dlq"]}.
    tokens: dict[SecretStr, list[Scope]] = Field(default_factory=dict)
    max_body_size: Size = 1024 * 1024
    # The token `eventhub dev` grants every scope (a random one when unset).
    dev_token: SecretStr | None = None
    # Where X-Callback-Url may point besides public addresses: IP networks or host names
    # ("*.svc.cluster.local"); a list, or comma-separated in EVENTHUB_CALLBACK_ALLOW.
    callback_allow: Annotated[tuple[str, ...], NoDecode] = ()

    # JetStream buffer.
    stream_max_bytes: Size = 1024**3
    stream_max_msgs: int = -1
    stream_max_age: Duration = 7 * 86400.0
    stream_replicas: int = Field(default=1, ge=1, le=5)
    duplicate_window: Duration = 120.0
    ack_wait: Duration = 30.0
    # Ordered bindings: keys are spread over this many serial lanes per function.
    ordered_lanes: int = Field(default=16, ge=1, le=256)

    # Dispatcher.
    state_ttl: Duration = 86400.0
    # A chain of results (onSuccess/onFailure) longer than this stops in a dead letter.
    max_hops: int = Field(default=16, ge=1, le=1000)
    # Dead letters older than this are deleted (0: kept); beyond the newest N too (0: no limit).
    dlq_retention: Duration = 30 * 86400.0
    dlq_max_count: int = Field(default=0, ge=0)
    shutdown_timeout: Duration = 30.0

    # Logging.
    log_level: str = "info"
    log_format: str = "json"

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        if not _NAMESPACE.match(value):
            raise ValueError("must be lowercase letters, digits and '_', starting with a letter")
        return value

    @field_validator("callback_allow", mode="before")
    @classmethod
    def _check_callback_allow(cls, value: Any) -> tuple[str, ...]:
        entries = value.split(",") if isinstance(value, str) else list(value or ())
        allow = tuple(str(e).strip() for e in entries if str(e).strip())
        for entry in allow:
            if not _is_network(entry) and not _CALLBACK_HOST.match(entry):
                raise ValueError(f"'{entry}' is neither an IP network nor a host name")
        return allow

    @field_validator("log_format")
    @classmethod
    def _check_log_format(cls, value: str) -> str:
        if value not in ("json", "console"):
            raise ValueError("must be 'json' or 'console'")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_source = _YamlFileSource(settings_cls, os.environ.get("EVENTHUB_SETTINGS_FILE"))
        return (init_settings, env_settings, yaml_source)

    def scopes_of(self, token: str) -> frozenset[Scope] | None:
        for secret, scopes in self.tokens.items():
            if _constant_time_equal(secret.get_secret_value(), token):
                return frozenset(scopes)
        return None

    @property
    def stream_name(self) -> str:
        return f"{self.namespace.upper()}_INVOCATIONS"

    def subject_for(self, function: str) -> str:
        return f"{self.namespace}.invoke.{function}"

    def ordered_subject_for(self, function: str, bucket: int) -> str:
        return f"{self.namespace}.invoke.{function}.o{bucket}"

    def ordered_consumer_for(self, function: str, bucket: int) -> str:
        # "_" cannot appear in a function name: no lane's consumer is another function's.
        return f"fn-{function}_o{bucket}"

    def held_subject_for(self, binding: str) -> str:
        return f"{self.namespace}.held.{binding}"

    def retry_subject_for(self, function: str) -> str:
        """Where an invocation waits for its next attempt, holding none of the function's
        concurrency (see eventhub.retries)."""
        return f"{self.namespace}.retry.{function}"

    @property
    def retry_consumer(self) -> str:
        # "_" cannot appear in a function name: no function's consumer is called so.
        return "retry_schedule"

    def consumer_for(self, function: str) -> str:
        return f"fn-{function}"


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True


def _constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
