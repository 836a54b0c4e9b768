"""The request pipeline: every step each request passes through, in the order they run.

:data:`STEPS` is the one list. Quart runs ``before_request`` functions in the order they were
registered but ``after_request`` functions in the reverse order, so registering each step as
its own hook would make the list read backwards in its second half. Instead :func:`install`
registers one ``before_request``, one ``after_request`` and (when a step needs it) one
``teardown_request`` function, and each runs its steps in the order of this list. A hook
registered on the app later (a test's, say) runs after every ``before`` step here, and before
every ``after`` step. One hook outside the list: with ``CORS_ALLOW_ORIGINS`` set, quart-cors's
own ``after_request`` function, registered just before the pipeline's so that it runs after
every ``after`` step (service/pipeline/headers.py).

A ``before`` step that raises (an :class:`~service.errors.APIError`: 401, 413, 429, ...) skips
the rest of the ``before`` steps and the handler; the error handler answers, and every
``after`` step still runs on its answer. ``teardown`` steps run last, even for a request
cancelled mid-way (a client gone), when the ``after`` steps do not run.

A step is a named function of a module here, taking the app's :class:`Setup` and the
request's :class:`RequestState` (and the response, for ``after`` steps); a step that a setting
switches off is not installed at all, so it costs nothing. A step that waits on nothing is a
plain function, and the others (the rate limit, the body checks) coroutine functions:
the pipeline awaits what a step returns only when it is awaitable, so the steps that never
wait cost a call, not a coroutine, on every request.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import cast

from quart import Quart, Response

from service.backends.resources import Resources
from service.config import Settings
from service.obs import tracing
from service.pipeline import (
    auth,
    body,
    drain,
    framing,
    headers,
    instrument,
    paths,
    ratelimit,
    request_id,
    websocket,
)
from service.pipeline.state import RequestState, Setup, begin_request, request_state

__all__ = [
    "STEPS",
    "After",
    "Before",
    "Pipeline",
    "RequestState",
    "Setup",
    "Step",
    "Teardown",
    "install",
    "installed",
]

# Plain functions, or coroutine functions for the steps that wait (see the docstring).
BeforeStep = Callable[[Setup, RequestState], Awaitable[None] | None]
AfterStep = Callable[[Setup, RequestState, Response], Awaitable[Response] | Response]


def _always(settings: Settings) -> bool:
    return True


def _keys_configured(settings: Settings) -> bool:
    return bool(settings.api_keys)


def _rate_limited(settings: Settings) -> bool:
    return settings.rate_limited


def _profiling(settings: Settings) -> bool:
    return settings.profiling_token is not None


def _tracing(settings: Settings) -> bool:
    # From the OTEL_* variables (or a tracer a test started): off, no span step is installed.
    return tracing.TRACER is not None or tracing.wanted()


@dataclass(frozen=True)
class Before:
    """A step run before the handler; it may refuse the request by raising."""

    name: str
    run: BeforeStep
    when: Callable[[Settings], bool] = _always


@dataclass(frozen=True)
class After:
    """A step run on the response (the handler's, or an error handler's)."""

    name: str
    run: AfterStep
    when: Callable[[Settings], bool] = _always


@dataclass(frozen=True)
class Teardown:
    """A step run when the request ends, however it ends."""

    name: str
    run: BeforeStep
    when: Callable[[Settings], bool] = _always


Step = Before | After | Teardown

STEPS: tuple[Step, ...] = (
    Before("timer", instrument.start_timer),
    # Current before anything logs, so every line of the request names its trace.
    Before("trace span", instrument.start_span, when=_tracing),
    # Before anything that may log: every line logged from here on carries the request's id.
    Before("request id", request_id.assign),
    # Framed two ways (or HTTP/2's preface): 400 and the connection closed, whatever the key.
    Before("unambiguous framing", framing.refuse_ambiguous),
    # Werkzeug would match `//users/1` as `/users/1`: refused first, whatever the key.
    Before("no leading //", paths.refuse_leading_double_slash),
    Before("key and scope", auth.identify),
    # Counted before the key is judged, so a flood of bad keys is limited too.
    Before("rate limit", ratelimit.count, when=_rate_limited),
    Before("key verdict", auth.judge, when=_keys_configured),
    # A WebSocket handshake has passed the key and the limits as a GET (pipeline/websocket.py).
    Before("no WebSocket", websocket.refuse_handshake),
    Before("body checks", body.check),
    Before("loop-watch activity", instrument.mark_activity),
    Before("profiling", instrument.start_profile, when=_profiling),
    # -- the route's handler runs here, or the error handler of a step that refused --
    After("loop-watch activity end", instrument.end_activity),
    After("metrics", instrument.record_metrics),
    After("request log line", instrument.log_request),
    After("trace span name and status", instrument.name_span, when=_tracing),
    # Replaces the response by the profile; the headers below still apply to it.
    After("profile", instrument.finish_profile, when=_profiling),
    After("request id header", request_id.echo),
    After("connection close after a refused body", body.close_after_refused),
    After("exposure headers", headers.exposure),
    Teardown("profiler stop", instrument.stop_profile, when=_profiling),
    Teardown("trace span end", instrument.end_span, when=_tracing),
)


class Pipeline:
    """The steps one app runs, with its setup; its three methods are the app's hooks."""

    def __init__(self, setup: Setup, steps: Iterable[Step]) -> None:
        self.setup = setup
        self.steps = tuple(step for step in steps if step.when(setup.settings))
        self._before = tuple(step.run for step in self.steps if isinstance(step, Before))
        # (run, whether it is a coroutine function): a plain step's result is the response
        # itself, whatever its class (a Werkzeug response for a routing redirect, say).
        self._after = tuple(
            (step.run, inspect.iscoroutinefunction(step.run))
            for step in self.steps
            if isinstance(step, After)
        )
        self._teardown = tuple(step.run for step in self.steps if isinstance(step, Teardown))

    async def before_request(self) -> None:
        """The ``before`` steps, on a fresh request state."""
        setup, state = self.setup, begin_request()
        for run in self._before:
            waiting = run(setup, state)
            if waiting is not None:
                await waiting

    async def after_request(self, response: Response) -> Response:
        """The ``after`` steps, each given the response the previous one returned."""
        setup, state = self.setup, request_state()
        for run, waits in self._after:
            result = run(setup, state, response)
            response = await cast(Awaitable[Response], result) if waits else cast(Response, result)
        return response

    async def teardown_request(self, _: BaseException | None) -> None:
        """The ``teardown`` steps."""
        setup, state = self.setup, request_state()
        for run in self._teardown:
            waiting = run(setup, state)
            if waiting is not None:
                await waiting


# Where the app keeps its Pipeline; read through installed() below.
_EXTENSION = "service.pipeline"


def installed(app: Quart) -> Pipeline:
    """The pipeline :func:`install` gave ``app`` (its setup holds the rate limiter)."""
    pipeline: Pipeline = app.extensions[_EXTENSION]
    return pipeline


def install(app: Quart, held: Resources, steps: Iterable[Step] = STEPS) -> Pipeline:
    """Run ``steps`` on every request of ``app``, and start the pipeline's serving hooks: the
    warning of a service without keys, the drain on SIGTERM, the per-process watchers."""
    settings = held.settings
    limiter = ratelimit.RateLimiter(settings) if settings.rate_limited else None
    pipeline = Pipeline(Setup(held, limiter), steps)
    if limiter is not None:
        # Its sync task runs while the app serves (and its own Redis connection with it).
        app.before_serving(limiter.start)
        app.after_serving(limiter.stop)
    app.extensions[_EXTENSION] = pipeline
    app.before_request(pipeline.before_request)
    # Registered first, so it runs after the ``after`` steps (service/pipeline/headers.py).
    headers.install_cors(app, settings)
    app.after_request(pipeline.after_request)
    if any(isinstance(step, Teardown) for step in pipeline.steps):
        app.teardown_request(pipeline.teardown_request)
    app.before_serving(partial(auth.warn_when_open, settings))
    drain.install(app)
    instrument.install_watchers(app, held)
    return pipeline
