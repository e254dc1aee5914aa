"""The PostgreSQL connection pool and the versioned migrations.

Every table lives in the schema named by the ``namespace`` setting. Migrations are the numbered
``migrations/NNNN_*.sql`` files, applied in order, once, under an advisory lock so that several
hub processes starting together do not race.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from importlib import resources as package_files
from typing import Any

import asyncpg
import structlog

from eventhub.errors import DependencyDown, InvalidInput

log = structlog.get_logger(__name__)


def _migrations() -> list[tuple[int, str, str]]:
    folder = package_files.files("eventhub") / "migrations"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


async def connect(dsn: str, schema: str, *, min_size: int = 1, max_size: int = 10) -> Any:
    """A pool whose connections use ``schema``; raises DependencyDown if PostgreSQL is away."""
    try:
        return await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            server_settings={"search_path": schema, "application_name": "eventhub"},
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise DependencyDown(f"PostgreSQL is unreachable: {type(exc).__name__}") from exc
    except ValueError:
        # A malformed URL; said without the URL, which may hold a password.
        raise InvalidInput("EVENTHUB_DATABASE_URL is not a valid PostgreSQL URL") from None


async def migrate(pool: Any, schema: str) -> list[str]:
    """Apply the migrations not yet applied; returns the names applied now."""
    lock_key = int.from_bytes(hashlib.sha256(schema.encode()).digest()[:8], "big", signed=True)
    applied_now: list[str] = []
    async with pool.acquire() as conn:
        await conn.execute("select pg_advisory_lock($1)", lock_key)
        try:
            await conn.execute(f'create schema if not exists "{schema}"')
            await conn.execute(
                "create table if not exists schema_migrations ("
                " version integer primary key, name text not null,"
                " applied_at timestamptz not null default now())"
            )
            done = {r["version"] for r in await conn.fetch("select version from schema_migrations")}
            for version, name, sql in _migrations():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "insert into schema_migrations (version, name) values ($1, $2)",
                        version,
                        name,
                    )
                applied_now.append(name)
                log.info("migration_applied", migration=name, schema=schema)
        finally:
            await conn.execute("select pg_advisory_unlock($1)", lock_key)
    return applied_now


@contextlib.asynccontextmanager
async def migrated(dsn: str, schema: str) -> AsyncIterator[Any]:
    """A small pool with the migrations applied, closed on exit: for one-off commands."""
    pool = await connect(dsn, schema)
    try:
        await migrate(pool, schema)
        yield pool
    finally:
        await pool.close()
