"""How a failed start ends when Hypercorn is started directly: one log line naming the
variable, a non-zero exit, no traceback.

The image's entry point checks the dependencies before Hypercorn starts (``python -m service
preflight``); an operator who runs ``hypercorn --config hypercorn.toml 'service.app:create_app()'``
by hand gets this instead. Two ways a start fails:

- a bad setting: :func:`create_app` logs the :class:`~service.config.ConfigError` (it names the
  variable) and raises ``SystemExit(2)`` while Hypercorn loads the app, before any hook runs;
- a dependency refused by a serving hook (PostgreSQL, when the pool opens): the hook raises
  :class:`~service.backends.errors.StartupFailed`, whose message names the variable. Quart
  reports it to Hypercorn as ``lifespan.startup.failed``, and Hypercorn answers by raising
  ``LifespanFailureError`` out of the ASGI ``send``: left alone, that ends the process with some
  80 lines of Quart's and Hypercorn's frames, the last saying "Lifespan failure in startup.
  '[Errno 111] Connection refused'", and nowhere which variable to look at.
  :class:`ReportingLifespan` logs the line first and turns that error into ``SystemExit(3)``.

``SystemExit`` is the one exception that leaves Hypercorn's worker without a traceback: its
lifespan task and asyncio's loop let it through, and Python (or, in a worker process,
multiprocessing) exits with its code. With ``--workers 0`` that code is Hypercorn's; with
workers, Hypercorn 0.18's supervisor exits 0 whatever its workers' codes (pgjones/hypercorn#269,
see docs/deployment.md, "Starting Hypercorn directly").

Only Hypercorn's ``send`` raises: Quart's test app (``app.test_app()``) records the failure and
raises its own ``LifespanError`` in the test, as before.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from hypercorn.utils import LifespanFailureError
from quart.asgi import ASGILifespan

from service.backends.errors import StartupFailed

# The name operators know these lines by.
log = logging.getLogger("service.startup")

# The same codes as `python -m service` and its preflight: 2 a bad setting, 3 a dependency.
CONFIG_EXIT = 2
STARTUP_FAILED_EXIT = 3


def refuse_bad_settings(error: BaseException) -> SystemExit:
    """The exit for a settings error found while the app is built: logged as one line."""
    log.critical("not starting: %s", error)
    return SystemExit(CONFIG_EXIT)


def without_startup_tracebacks(record: logging.LogRecord) -> bool:
    """A filter for the app's logger: Quart logs a failed start-up hook with its traceback
    before reporting it; for a :class:`StartupFailed` the line of :class:`ReportingLifespan`
    says all there is, so that record is dropped."""
    return not (record.exc_info and isinstance(record.exc_info[1], StartupFailed))


class ReportingLifespan(ASGILifespan):
    """Quart's lifespan handler, logging a failed start as one line, and exiting with
    :data:`STARTUP_FAILED_EXIT` instead of the traceback of Hypercorn's error."""

    async def __call__(self, receive: Any, send: Any) -> None:
        async def report(message: Any) -> None:
            if message["type"] != "lifespan.startup.failed":
                await send(message)
                return
            # Quart sends this from its `except` block: the exception being handled is the
            # hook's own.
            failure = sys.exception()
            if isinstance(failure, StartupFailed):
                log.critical("not starting: %s", failure)
            else:  # not a dependency refusing: a bug, whose traceback Quart has just logged
                log.critical(
                    "not starting: a start-up hook failed (%s); its traceback is logged above",
                    type(failure).__name__,
                )
            try:
                await send(message)
            except LifespanFailureError:
                raise SystemExit(STARTUP_FAILED_EXIT) from None

        await super().__call__(receive, report)
