"""What the request pipeline's steps share: the app's fixed setup, and one request's state.

Each request's state is one :class:`RequestState`, stored once on ``g`` and read through
:func:`request_state`; no step hands anything to another under a bare name on ``g``. The
request id is not in it: it lives in the logging's context variable
(:data:`service.obs.logs.request_id_var`), so that every line logged during the request carries
it, from any module, Quart or not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from quart import Request, g, request

from service.backends.resources import Resources
from service.config import ApiKey
from service.contract import METHODS

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.trace import Span
    from pyinstrument import Profiler

    from service.backends.limiter import RateLimiter

# The one attribute of `g` the pipeline uses.
_ATTRIBUTE = "request_state"
# Routes are labelled by their template; a path no rule matched gets one label, so a scan of
# random URLs cannot make the metrics grow without bound.
UNMATCHED = "<unmatched>"


@dataclass(frozen=True, slots=True)
class Setup:
    """What the steps of one app share, fixed when the app is created: its resources (and with
    them its settings, ``setup.resources.settings``) and its rate limiter."""

    resources: Resources
    # None when rate limits are off.
    limiter: RateLimiter | None


@dataclass(slots=True)
class RequestState:
    """One request's state, as the steps fill it in."""

    # The request itself, so steps read it without going through Quart's context-local proxy
    # (each ``request.x`` resolves the proxy again).
    request: Request
    # The request's headers as the server gave them (ASGI: lower-case names, bytes), the
    # first of each name: read once, so a step looks a header up without Werkzeug's
    # case-insensitive scan (and the exception it raises and catches for an absent one).
    raw_headers: Mapping[bytes, bytes]
    # perf_counter() when the first step ran.
    started: float = 0.0
    # The method and route template as metrics and the log label them, once looked up.
    method: str = ""
    route: str = ""
    # Seconds from `started` to the response, once measured.
    duration: float = 0.0
    # The scope the request needs; None for an open path.
    scope: str | None = None
    # The configured key the request carries, if any.
    key: ApiKey | None = None
    # Whether the caller may do admin work (an admin key, or no keys configured at all).
    admin: bool = False
    # RateLimit and RateLimit-Policy, once the limiter has counted the request.
    rate_limit_headers: Mapping[str, str] | None = None
    # The request's profile while it is being taken (X-Profile-Token).
    profiler: Profiler | None = None
    # The request's span, and the token that made it current, while tracing is on.
    span: Span | None = None
    span_token: Token[Context] | None = None


def begin_request() -> RequestState:
    """A fresh state for the request now starting, stored on ``g``."""
    current: Request = request._get_current_object()  # type: ignore[attr-defined]
    # reversed: a name given twice keeps its first value, as Werkzeug's Headers.get returns.
    state = RequestState(
        current, dict(reversed(cast(list[tuple[bytes, bytes]], current.scope["headers"])))
    )
    setattr(g, _ATTRIBUTE, state)
    return state


def request_state() -> RequestState:
    """The current request's state (a fresh one if the pipeline has not started it)."""
    state: RequestState | None = g.get(_ATTRIBUTE)
    return state if state is not None else begin_request()


def header(state: RequestState, name: bytes) -> str | None:
    """The request header ``name`` (lower-case), decoded as Quart decodes it; None if absent."""
    value = state.raw_headers.get(name)
    return None if value is None else value.decode("latin-1")


def labels(state: RequestState) -> tuple[str, str]:
    """The request's method and route template as the metrics, the log line, the trace span and
    the loop watch label them, looked up once per request (each read of ``request`` goes
    through Quart's context-local proxy)."""
    if not state.route:
        current = state.request
        method = current.method
        state.method = method if method in METHODS else "OTHER"
        rule = current.url_rule
        state.route = rule.rule if rule is not None else UNMATCHED
    return state.method, state.route
