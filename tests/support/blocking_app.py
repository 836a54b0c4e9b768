"""The service with one deliberately blocking route, to see the blocking detection (and the
doctor) catch it: ``hypercorn ... 'tests.support.blocking_app:create_app()'``."""

from __future__ import annotations

import os
import time

from quart import Quart

from service.app import create_app as create_service_app
from service.config import Settings


def add_blocking_route(app: Quart, seconds: float = 0.5) -> None:
    @app.get("/block")
    async def deliberately_blocking_handler() -> dict[str, bool]:
        time.sleep(seconds)  # noqa: ASYNC251  (the point: the event loop is held, nothing else runs)
        return {"blocked": True}


def create_app(settings: Settings | None = None) -> Quart:
    """The service with ``/block``, holding the loop ``BLOCKING_ROUTE_SECONDS`` (default 0.5)."""
    app = create_service_app(settings)
    add_blocking_route(app, float(os.environ.get("BLOCKING_ROUTE_SECONDS", "0.5")))
    return app
