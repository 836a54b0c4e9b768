"""The service's app plus one slow route, for shutdown tests that need requests in flight.

Served by Hypercorn with hypercorn.toml as ``tests.support.slow_app:create_app()``; everything
else is the real app (serving hooks, pools, the graceful drain).
"""

from __future__ import annotations

import asyncio

from quart import Quart, request

from service.app import create_app as create_service_app
from service.framework.resources import connection, resources


def create_app() -> Quart:
    app = create_service_app()

    @app.before_request
    async def count_readiness_probes() -> None:
        # Counted in Redis so a test knows a probe has reached the app before it signals.
        if request.path == "/readyz":
            held = resources()
            await held.redis.incr(f"{held.settings.redis_prefix}probes")

    @app.get("/_test/slow")
    async def slow() -> dict[str, object]:
        seconds = float(request.args.get("s", "1"))
        # Counted in Redis so the test knows when every request is in flight, in any worker.
        held = resources()
        await held.redis.incr(f"{held.settings.redis_prefix}in-flight")
        await asyncio.sleep(seconds)
        # The pool must still be open after the drain began: it closes only after it.
        async with connection() as conn:
            value = await conn.fetchval("SELECT 1")
        return {"slept": seconds, "db": value}

    @app.get("/_test/hold")
    async def hold() -> dict[str, object]:
        """Holds a pool connection while it sleeps: with a pool of one, the next request that
        needs PostgreSQL (a readiness probe) waits for it."""
        seconds = float(request.args.get("s", "1"))
        held = resources()
        async with connection() as conn:
            await held.redis.incr(f"{held.settings.redis_prefix}in-flight")
            await asyncio.sleep(seconds)
            value = await conn.fetchval("SELECT 1")
        return {"slept": seconds, "db": value}

    return app
