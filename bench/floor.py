"""The stack's floor: Quart apps with none of the service's features, run under the same
``hypercorn.toml`` as the service.

``lookup_app()`` does only what the service's ``GET /users?email=`` needs: the same query
(sql/users.sql ``find_users_by_email``) on an asyncpg pool opened as the service opens its own
(same sizes, no reset query on release), and the same JSON. It validates nothing, and takes the
address's lower case as its key: exact for the benchmark's addresses (lower-case ASCII,
bench/database.py), where the service runs the whole rule (service/emails.py).
``hello_app()`` answers every path with a fixed JSON of the same size, touching nothing: what
Quart itself costs per request.
"""

from __future__ import annotations

import os
from typing import Any

import asyncpg
from quart import Quart, request

from bench.ceiling import BODY

QUERY = "SELECT id, email, name, created_at, updated_at FROM users WHERE email_key = $1"


async def _keep_session(conn: asyncpg.Connection) -> None:
    """No reset query on release, as service/backends/db.py does (nothing to undo here)."""


def lookup_app() -> Quart:
    """A Quart app serving only ``GET /users?email=`` from PostgreSQL."""
    app = Quart("bench_floor_lookup")

    @app.before_serving
    async def _open() -> None:
        app.extensions["pool"] = await asyncpg.create_pool(
            os.environ["DATABASE_URL"],
            min_size=int(os.environ.get("DB_POOL_MIN_SIZE", "2")),
            max_size=int(os.environ.get("DB_POOL_MAX_SIZE", "10")),
            reset=_keep_session,
        )

    @app.after_serving
    async def _close() -> None:
        await app.extensions["pool"].close()

    @app.get("/users")
    async def users() -> dict[str, Any]:
        pool: asyncpg.Pool = app.extensions["pool"]
        async with pool.acquire() as conn:
            rows = await conn.fetch(QUERY, request.args.get("email", "").lower())
        return {
            "users": [
                {
                    "id": row["id"],
                    "email": row["email"],
                    "name": row["name"],
                    "created_at": row["created_at"].isoformat(),
                    "updated_at": row["updated_at"].isoformat(),
                }
                for row in rows
            ],
            "next": None,
        }

    return app


def hello_app() -> Quart:
    """A Quart app answering every GET with the same fixed JSON as bench/ceiling.py."""
    app = Quart("bench_floor_hello")

    @app.get("/", defaults={"path": ""})
    @app.get("/<path:path>")
    async def hello(path: str) -> tuple[bytes, int, dict[str, str]]:
        return BODY, 200, {"Content-Type": "application/json"}

    return app
