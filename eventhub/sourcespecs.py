"""The typed ``spec`` of each Source type, validated when the Source is declared.

The connectors (package ``connectors``) implement the behaviour; these models are the part of
the resource a user writes, so an unknown option, a bad cron expression or a missing topic fails
at ``eventhub apply`` naming the field, not at the first message.

Common to every type:

- ``format``: ``auto`` (default: a message that already is a CloudEvent, in the transport's
  binary or structured mode, passes through unchanged; any other is wrapped), ``s3`` (the payload
  is an S3/MinIO bucket notification: one CloudEvent per record) or ``raw`` (always wrapped).
- ``eventType``: the ``type`` of wrapped events (each connector has its own default).
- ``highWaterMark``: when a function bound to this source has more invocations waiting than
  this, the source stops taking messages until there is room again.
- ``maxMessageSize``: a larger message becomes a dead letter instead of an event.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator
from pydantic.alias_generators import to_camel

from eventhub.units import parse_duration, parse_size

Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
_EVERY = re.compile(r"^@every\s+(\S+)$")
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


class _Spec(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class TLS(_Spec):
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure_skip_verify: bool = False


class _SourceSpec(_Spec):
    format: Literal["auto", "s3", "raw"] = "auto"
    event_type: str | None = None
    high_water_mark: int = Field(default=10_000, ge=1)
    max_message_size: Size = 1024 * 1024


class KafkaSASL(_Spec):
    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    username: str
    password: SecretStr


class KafkaSpec(_SourceSpec):
    type: Literal["kafka"]
    bootstrap_servers: list[str] = Field(min_length=1)
    topics: list[str] = Field(default_factory=list)
    topic_pattern: str | None = None
    group_id: str | None = None  # default: eventhub-<source name>
    initial_offset: Literal["earliest", "latest"] = "latest"
    sasl: KafkaSASL | None = None
    tls: TLS | None = None

    @field_validator("topic_pattern")
    @classmethod
    def _check_pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"is not a regular expression: {exc}") from None
        return value

    def model_post_init(self, context: Any, /) -> None:
        if bool(self.topics) == bool(self.topic_pattern):
            raise ValueError("set exactly one of topics and topicPattern")


class AMQPDeclare(_Spec):
    exchange: str
    exchange_type: Literal["direct", "topic", "fanout", "headers"] = "topic"
    routing_keys: list[str] = Field(default_factory=lambda: ["#"])
    durable: bool = True


class RabbitMQSpec(_SourceSpec):
    type: Literal["rabbitmq"]
    url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    queue: str = Field(min_length=1)
    declare: AMQPDeclare | None = None  # declare the queue and bind it; else it must exist
    prefetch: int = Field(default=100, ge=1, le=65_535)
    tls: TLS | None = None


class MQTTSpec(_SourceSpec):
    type: Literal["mqtt"]
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65_535)
    version: Literal["3.1.1", "5"] = "5"
    topics: list[str] = Field(min_length=1)
    qos: Literal[1, 2] = 1
    shared_group: str | None = None  # subscribe as $share/<group>/<filter>
    # default: eventhub-<source name>; with sharedGroup, -<hostname>-<slot> is appended
    client_id: str | None = None
    session_expiry: Duration = 3600.0
    username: str | None = None
    password: SecretStr | None = None
    tls: TLS | None = None

    @field_validator("topics")
    @classmethod
    def _check_filters(cls, value: list[str]) -> list[str]:
        for topic in value:
            misplaced_hash = "#" in topic and not topic.endswith("#")
            if not topic or misplaced_hash or topic.startswith("$share/"):
                raise ValueError(
                    f"'{topic}' is not a topic filter ('#' only last; use sharedGroup for $share)"
                )
        return value


class MinIOListen(_Spec):
    endpoint: str
    access_key: str
    secret_key: SecretStr
    secure: bool = False
    bucket: str
    prefix: str = ""
    suffix: str = ""
    events: list[str] = Field(default_factory=lambda: ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"])


class MinIOSpec(_SourceSpec):
    type: Literal["minio"]
    mode: Literal["webhook", "listen"] = "webhook"
    # webhook: the token MinIO sends (its MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_<ID>)
    auth_token: SecretStr | None = None
    listen: MinIOListen | None = None

    def model_post_init(self, context: Any, /) -> None:
        if self.mode == "listen" and self.listen is None:
            raise ValueError("mode listen needs the listen settings (endpoint, bucket, keys)")
        if self.mode == "webhook" and not self.auth_token:
            raise ValueError("mode webhook needs authToken: the webhook is open to the network")


class CronSpec(_SourceSpec):
    type: Literal["cron"]
    schedule: str
    timezone: str = "UTC"
    jitter: Duration = 0.0
    payload: Any = None
    content_type: str = "application/json"
    missed: Literal["skip", "once", "all"] = "skip"
    starting_deadline: Duration = 3600.0

    @field_validator("schedule")
    @classmethod
    def _check_schedule(cls, value: str) -> str:
        cron_expression(value)  # raises ValueError with the reason
        return value

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"'{value}' is not an IANA time zone such as Europe/Paris") from None
        return value


def cron_expression(schedule: str) -> str | float:
    """A croniter expression, or the interval in seconds of ``@every <duration>``."""
    from croniter import CroniterBadDateError, croniter

    text = schedule.strip()
    every = _EVERY.match(text)
    if every:
        seconds = parse_duration(every.group(1))
        if seconds < 1:
            raise ValueError("@every needs an interval of at least 1s")
        return seconds
    expression = _MACROS.get(text, text)
    fields = expression.split()
    seconds_first = len(fields) == 6  # 6 fields: seconds first, as robfig/cron and Quartz
    if len(fields) not in (5, 6) or not croniter.is_valid(
        expression, second_at_beginning=seconds_first
    ):
        raise ValueError(
            f"'{schedule}' is not a cron expression (5 fields, or 6 with seconds first,"
            " @hourly..., or @every 30s)"
        )
    try:
        croniter(expression, datetime.now(UTC), second_at_beginning=seconds_first).get_next(
            datetime
        )
    except CroniterBadDateError:
        raise ValueError(f"'{schedule}' never fires") from None
    return expression


SourceTypeSpec = Annotated[
    KafkaSpec | RabbitMQSpec | MQTTSpec | MinIOSpec | CronSpec, Field(discriminator="type")
]
