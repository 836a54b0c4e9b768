"""The service with one deliberately blocking route, to see the blocking detection (and the
doctor) catch it: ``hypercorn ... 'tests.support.blocking_app:create_app()'``."""

from __future__ import annotations

import time

from quart import Quart

from service.app import create_app as create_service_app
from service.config import Settings


def add_blocking_route(app: Quart) -> None:
    @app.get("/block")
    async def deliberately_blocking_handler() -> dict[str, bool]:
        time.sleep(0.5)  # noqa: ASYNC251  (the point: the event loop is held, nothing else runs)
        return {"blocked": True}


def create_app(settings: Settings | None = None) -> Quart:
    app = create_service_app(settings)
    add_blocking_route(app)
    return app
