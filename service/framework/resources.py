"""Where a handler finds the app's resources: the one :class:`Resources` object each app keeps
(service/backends/resources.py), opened and closed by the app's serving hooks.

Handlers reach it through :func:`resources` (its ``settings`` are the app's settings, the only
copy), and a database connection through :func:`connection`.
"""

from __future__ import annotations

from quart import Quart, current_app

from service.backends.resources import PooledConnection, Resources
from service.config import Settings

# Where the app keeps its Resources; read only through resources() below.
_EXTENSION = "service.resources"


def install(app: Quart, settings: Settings) -> Resources:
    """Give ``app`` its resources and the serving hooks that open and close them."""
    held = Resources(settings)
    app.extensions[_EXTENSION] = held
    app.before_serving(held.open)
    app.after_serving(held.close)
    return held


def resources(app: Quart | None = None) -> Resources:
    """The resources of ``app``, by default of the app serving the current request."""
    held: Resources = (app or current_app).extensions[_EXTENSION]
    return held


def connection() -> PooledConnection:
    """A pooled connection for this request: ``async with connection() as conn``. Waits at most
    DB_ACQUIRE_TIMEOUT for it; a database that is not there is a 503 with Retry-After."""
    return resources().connection()
