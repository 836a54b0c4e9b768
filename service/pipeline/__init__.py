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

:data:`WRAPPERS`, beside the steps, are what wraps the whole ASGI app: they see each request's
scope before Quart builds a request from it (the header limit, the client's address behind
trusted proxies), so they run before every step, outermost first.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar, cast

from quart import Quart, Response

from service.backends.limiter import RateLimiter
from service.backends.resources import Resources
from service.config import Settings
from service.obs import tracing
from service.pipeline import (
    access_log,
    activity,
    auth,
    body,
    header_limit,
    headers,
    paths,
    profiling,
    proxy,
    ratelimit,
    request_id,
    spans,
    timing,
)
from service.pipeline.state import RequestState, Setup, begin_request, request_state

__all__ = [
    "STEPS",
    "WRAPPERS",
    "After",
    "Before",
    "Caller",
    "Part",
    "Pipeline",
    "RequestState",
    "Setup",
    "Step",
    "Teardown",
    "Wrapper",
    "caller",
    "install",
    "installed",
]

# Plain functions, or coroutine functions for the steps that wait (see the docstring).
BeforeStep = Callable[[Setup, RequestState], Awaitable[None] | None]
AfterStep = Callable[[Setup, RequestState, Response], Awaitable[Response] | Response]
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]
# The app's ASGI callable wrapped as the settings ask.
Wrap = Callable[[ASGIApp, Settings], ASGIApp]
Run = TypeVar("Run", BeforeStep, AfterStep, Wrap)


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


def _behind_proxies(settings: Settings) -> bool:
    return bool(settings.trusted_proxies)


@dataclass(frozen=True)
class Part(Generic[Run]):
    """A named part of the pipeline: what it runs, and from the settings whether it is installed
    at all. Its class says when it runs (the four below)."""

    name: str
    run: Run
    when: Callable[[Settings], bool] = _always


@dataclass(frozen=True)
class Before(Part[BeforeStep]):
    """A step run before the handler; it may refuse the request by raising."""


@dataclass(frozen=True)
class After(Part[AfterStep]):
    """A step run on the response (the handler's, or an error handler's)."""


@dataclass(frozen=True)
class Teardown(Part[BeforeStep]):
    """A step run when the request ends, however it ends."""


@dataclass(frozen=True)
class Wrapper(Part[Wrap]):
    """An ASGI wrapper around the whole app, given the app's settings."""


Step = Before | After | Teardown


def _limit_headers(app: ASGIApp, settings: Settings) -> ASGIApp:
    return header_limit.limit_headers(app, settings.max_header_bytes)


def _trust_proxies(app: ASGIApp, settings: Settings) -> ASGIApp:
    return proxy.trust_proxies(app, settings.trusted_proxies)


WRAPPERS: tuple[Wrapper, ...] = (
    # Outermost: an oversized head is refused before Quart builds a request from it.
    Wrapper("header limit", _limit_headers),
    # The client's address behind TRUSTED_PROXIES, in the scope before Quart reads it.
    Wrapper("client address behind trusted proxies", _trust_proxies, when=_behind_proxies),
)

STEPS: tuple[Step, ...] = (
    Before("timer", timing.start_timer),
    # Current before anything logs, so every line of the request names its trace.
    Before("trace span", spans.start_span, when=_tracing),
    # Before anything that may log: every line logged from here on carries the request's id.
    Before("request id", request_id.assign),
    # Werkzeug would match `//users/1` as `/users/1`: refused first, whatever the key.
    Before("no leading //", paths.refuse_leading_double_slash),
    Before("key and scope", auth.identify),
    # Counted before the key is judged, so a flood of bad keys is limited too.
    Before("rate limit", ratelimit.count, when=_rate_limited),
    Before("key verdict", auth.judge, when=_keys_configured),
    Before("body checks", body.check),
    Before("loop-watch activity", activity.mark_activity),
    Before("profiling", profiling.start_profile, when=_profiling),
    # -- the route's handler runs here, or the error handler of a step that refused --
    After("loop-watch activity end", activity.end_activity),
    After("metrics", timing.record_metrics),
    After("request log line", access_log.log_request),
    After("trace span name and status", spans.name_span, when=_tracing),
    # Replaces the response by the profile; the headers below still apply to it.
    After("profile", profiling.finish_profile, when=_profiling),
    After("request id header", request_id.echo),
    After("connection close after a refused body", body.close_after_refused),
    After("exposure headers", headers.exposure),
    Teardown("profiler stop", profiling.stop_profile, when=_profiling),
    Teardown("trace span end", spans.end_span, when=_tracing),
)


class Pipeline:
    """The steps one app runs, with its setup; its three methods are the app's hooks."""

    def __init__(
        self, setup: Setup, steps: Iterable[Step], wrappers: Iterable[Wrapper] = ()
    ) -> None:
        self.setup = setup
        settings = setup.resources.settings
        self.steps = tuple(step for step in steps if step.when(settings))
        self.wrappers = tuple(wrapper for wrapper in wrappers if wrapper.when(settings))
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


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sends the current request, as the pipeline's key step identified it."""

    # The name of the API key it carries; "" when keys are off or the path is open.
    name: str
    # Whether it may do admin work: an admin key, or no keys configured at all.
    admin: bool


def caller() -> Caller:
    """Who sends the current request (for handlers: the request's state stays the pipeline's)."""
    state = request_state()
    key = state.key
    return Caller(key.name if key is not None else "", state.admin)


# Where the app keeps its Pipeline; read through installed() below.
_EXTENSION = "service.pipeline"


def installed(app: Quart) -> Pipeline:
    """The pipeline :func:`install` gave ``app`` (its setup holds the rate limiter)."""
    pipeline: Pipeline = app.extensions[_EXTENSION]
    return pipeline


def install(
    app: Quart,
    held: Resources,
    steps: Iterable[Step] = STEPS,
    wrappers: Iterable[Wrapper] = WRAPPERS,
) -> Pipeline:
    """Run ``steps`` on every request of ``app`` inside ``wrappers``, and start the pipeline's
    serving hooks: the rate limiter's sync, the warning of a service without keys."""
    settings = held.settings
    limiter = RateLimiter(settings) if settings.rate_limited else None
    pipeline = Pipeline(Setup(held, limiter), steps, wrappers)
    if limiter is not None:
        # Its sync task runs while the app serves (and its own Redis connection with it).
        app.before_serving(limiter.start)
        app.after_serving(limiter.stop)
    app.extensions[_EXTENSION] = pipeline
    app.before_request(pipeline.before_request)
    # Registered first, so it runs after the ``after`` steps (service/pipeline/headers.py).
    headers.install_cors(app, held)
    app.after_request(pipeline.after_request)
    if any(isinstance(step, Teardown) for step in pipeline.steps):
        app.teardown_request(pipeline.teardown_request)
    app.before_serving(partial(auth.warn_when_open, held))
    # The first of WRAPPERS is the outermost: wrapped last.
    for wrapper in reversed(pipeline.wrappers):
        app.asgi_app = wrapper.run(app.asgi_app, settings)  # type: ignore[method-assign,assignment]
    return pipeline
