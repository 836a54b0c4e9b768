"""Graceful shutdown of multi-worker Hypercorn: in-flight requests finish on SIGTERM.

Hypercorn 0.18 with ``workers >= 1`` runs a supervisor process and worker processes. On
SIGTERM the supervisor sets a shared event; each worker polls it, stops accepting, and lets its
open connections finish for up to ``graceful_timeout``. But the workers themselves install no
SIGTERM handler (they rely on the event), and as soon as the first worker has drained and
exited, the supervisor calls ``terminate()`` on the others: a SIGTERM with the default action,
which kills a worker that is still finishing requests. A process-group SIGTERM (Ctrl-C in a
shell, systemd's default ``KillMode``) kills every worker at once the same way.

So each worker installs a SIGTERM handler here that does not die: it asks the supervisor to
shut down (once, in case only this worker got the signal) and otherwise leaves the drain to
Hypercorn, which is bounded by ``graceful_timeout``. The supervisor still exits cleanly: its
workers are daemonic children, and multiprocessing joins them when the supervisor exits.

Nothing is installed when Hypercorn runs the app in-process (``--workers 0``) or under a test
client: there Hypercorn's own signal handlers already drain, and this must not replace them.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal

from quart import Quart

log = logging.getLogger(__name__)


def _is_hypercorn_worker() -> bool:
    # Hypercorn's supervisor starts its workers with multiprocessing; in-process serving and
    # test clients run in a process that has no multiprocessing parent.
    return multiprocessing.parent_process() is not None


def install_graceful_drain(app: Quart) -> None:
    """Register the serving hook that makes this worker survive SIGTERM while it drains."""

    @app.before_serving
    async def _drain_on_sigterm() -> None:
        if not _is_hypercorn_worker():
            return
        supervisor = os.getppid()
        forwarded = False

        def _on_sigterm() -> None:
            nonlocal forwarded
            app.extensions["draining"] = True
            if not forwarded and os.getppid() == supervisor:
                forwarded = True
                log.info("SIGTERM: draining in-flight requests (graceful_timeout bounds it)")
                # Idempotent on the supervisor side: it only sets its shutdown event.
                os.kill(supervisor, signal.SIGTERM)

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, _on_sigterm)
