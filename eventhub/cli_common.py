"""What every ``eventhub`` command shares: loading the settings, and turning the errors a user
can cause into one line on stderr and a non-zero exit (never a traceback)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import asyncpg
import click
import yaml
from pydantic import ValidationError

from eventhub.errors import DependencyDown, EventhubError
from eventhub.logs import configure as configure_logs
from eventhub.settings import Settings

P = ParamSpec("P")
T = TypeVar("T")


def fail(message: str) -> None:
    click.echo(f"eventhub: {message}", err=True)
    sys.exit(2 if message.startswith("usage") else 1)


def load_settings() -> Settings:
    try:
        settings = Settings()
        configure_logs("warning", "console")  # `run` reconfigures from the settings
        return settings
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        fail(f"setting EVENTHUB_{field.upper()}: {err['msg']}")
    except (OSError, ValueError, yaml.YAMLError) as exc:
        fail(f"settings file: {exc}")
    raise AssertionError("unreachable")


async def connect_nats(settings: Settings) -> Any:
    """A NATS connection for one command: one try, a few seconds, no reconnection (nats-py's
    ``max_reconnect_attempts=0`` means "forever"), no error logged: DependencyDown instead."""
    import nats
    import nats.errors

    async def quiet(_: Exception) -> None:
        return None

    try:
        return await nats.connect(
            settings.nats_url.get_secret_value(),
            connect_timeout=5,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            error_cb=quiet,
        )
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        raise DependencyDown(f"NATS is unreachable: {type(exc).__name__}") from exc


def handled(func: Callable[P, T]) -> Callable[P, T]:
    """Turn the errors a user can cause into one line and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return func(*args, **kwargs)
        except EventhubError as exc:
            fail(exc.detail)
        except OSError as exc:
            fail(str(exc))
        except asyncpg.PostgresError as exc:
            fail(f"PostgreSQL refused: {exc}")
        raise AssertionError("unreachable")

    return wrapper
