"""The service's app plus one route that emits a Python warning, for the test that warnings
come out as JSON log lines under Hypercorn (``tests.support.warning_app:create_app()``)."""

from __future__ import annotations

import warnings

from quart import Quart

from service.app import create_app as create_service_app

MESSAGE = "a warning from the test route"


def create_app() -> Quart:
    app = create_service_app()

    @app.get("/_test/warn")
    async def warn() -> dict[str, bool]:
        warnings.warn(MESSAGE, UserWarning, stacklevel=1)
        return {"warned": True}

    return app
