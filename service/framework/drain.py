"""The drain: on SIGTERM, multi-worker Hypercorn's workers finish their in-flight requests.

Hypercorn 0.18 with ``workers >= 1`` runs a supervisor process and worker processes. On
SIGTERM the supervisor sets a shared event; each worker polls it, stops accepting, and lets its
open connections finish for up to ``graceful_timeout``. But the workers themselves install no
SIGTERM handler (they rely on the event), and as soon as the first worker has drained and
exited, the supervisor calls ``terminate()`` on the others: a SIGTERM with the default action,
which kills a worker that is still finishing requests. A process-group SIGTERM (`kill -TERM
-PGID`, systemd's default ``KillMode``) kills every worker at once the same way.

So each worker installs a SIGTERM handler here that does not die, and leaves the drain to
Hypercorn, which is bounded by ``graceful_timeout``. The supervisor still exits cleanly: its
workers are daemonic children, and multiprocessing joins them when the supervisor exits. Stop
the server by signalling the supervisor (PID 1 in the container) or the whole process group; a
SIGTERM sent to one worker alone is noted and otherwise ignored.

Nothing is installed when Hypercorn runs the app in-process (``--workers 0``) or under a test
client, or when anything else already handles SIGTERM: there Hypercorn's own signal handlers
already drain, and this must not replace them.

Not done here: refusing new connections the instant the signal arrives. The supervisor keeps
the listening socket open until the first worker has exited, so a client connecting in between
waits in the kernel's backlog and is reset when the socket closes (before any byte of a
response: safe to retry). Shutting the shared socket down from a worker would refuse them, but
would also break Hypercorn's SIGHUP reload, which relies on that backlog for a seamless restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
from multiprocessing.synchronize import Event

from quart import Quart, current_app

log = logging.getLogger(__name__)


def _is_unguarded_hypercorn_worker() -> bool:
    # Hypercorn's supervisor starts its workers with multiprocessing, and they leave SIGTERM at
    # its default (death). In-process serving (`--workers 0`) installs Hypercorn's own handler,
    # which must stay; test clients run in a process with no multiprocessing parent.
    return (
        multiprocessing.parent_process() is not None
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    )


def _supervisor_shutdown_event() -> Event | None:
    """The event Hypercorn's supervisor sets on SIGTERM (or SIGHUP), in one of its workers.

    Hypercorn has no API for it. Its supervisor starts each worker with
    ``Process(kwargs={"shutdown_event": ...})``, and multiprocessing rebuilds that Process
    object in the child as ``current_process()``; its ``_kwargs`` hold the event."""
    kwargs = getattr(multiprocessing.current_process(), "_kwargs", None) or {}
    event = kwargs.get("shutdown_event")
    return event if isinstance(event, Event) else None


class Drain:
    """This worker's drain: whether SIGTERM has come (``/readyz`` then answers 503), and the
    handler that notes it."""

    def __init__(self) -> None:
        self.draining = False
        self._watch: asyncio.Task[None] | None = None

    async def watch_supervisor(self) -> None:
        """A serving hook: note the drain as soon as Hypercorn's supervisor starts it."""
        event = _supervisor_shutdown_event()
        if event is not None:
            self._watch = asyncio.get_running_loop().create_task(self._poll(event))

    async def _poll(self, event: Event) -> None:
        # A multiprocessing event cannot be awaited: polled as often as Hypercorn's own worker
        # polls it, so readiness fails as its drain starts.
        while not event.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        self.note_sigterm()

    async def stop_watching(self) -> None:
        """A serving hook: end the watch."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None

    def note_sigterm(self) -> None:
        # Only note it. The drain itself is Hypercorn's, started by its supervisor's event.
        # Deliberately no kill(supervisor): the supervisor's handler takes a lock around its
        # shared event, and a second signal landing while it holds it deadlocks it.
        if not self.draining:
            self.draining = True
            log.info("SIGTERM: finishing in-flight requests (graceful_timeout bounds it)")

    async def survive_sigterm(self) -> None:
        """A serving hook: in a Hypercorn worker left unguarded, SIGTERM starts the drain
        instead of killing the worker."""
        if _is_unguarded_hypercorn_worker():
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.note_sigterm)


# Where the app keeps its Drain; read through draining() below.
_EXTENSION = "service.drain"


def install(app: Quart) -> Drain:
    """Register the serving hooks that note the drain when it starts and make this worker
    survive SIGTERM while it drains."""
    drain = Drain()
    app.extensions[_EXTENSION] = drain
    app.before_serving(drain.survive_sigterm)
    app.before_serving(drain.watch_supervisor)
    app.after_serving(drain.stop_watching)
    return drain


def draining(app: Quart | None = None) -> bool:
    """Whether the server of ``app`` (by default the app serving the current request) has begun
    to drain."""
    drain: Drain | None = (app or current_app).extensions.get(_EXTENSION)
    return drain is not None and drain.draining
