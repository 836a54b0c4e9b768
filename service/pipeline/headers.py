"""Response headers every answer gets: CORS (when origins are configured) and exposure rules."""

from __future__ import annotations

import quart_cors
from quart import Quart, Response

from service.backends.resources import Resources
from service.config import split_list
from service.contract import METHODS
from service.pipeline.state import RequestState, Setup

CORS_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"]
CORS_EXPOSED = ["Location", "Retry-After", "RateLimit", "RateLimit-Policy", "X-Request-ID"]


def install_cors(app: Quart, held: Resources) -> None:
    """quart-cors's policy for ``CORS_ALLOW_ORIGINS`` on ``app``; nothing when none is set.

    quart-cors applies it as an ``after_request`` function of the app. The pipeline installs
    this before its own hook, and Quart runs ``after_request`` functions in the reverse order
    of registration: the CORS headers are added last, to the response every ``after`` step has
    finished (a profile included).
    """
    origins = split_list(held.settings.cors_allow_origins)
    if not origins:
        return
    quart_cors.cors(
        app,
        allow_origin=origins,
        allow_headers=CORS_HEADERS,
        allow_methods=sorted(METHODS),
        expose_headers=CORS_EXPOSED,
        allow_credentials=False,
        max_age=600,
    )


def exposure(setup: Setup, state: RequestState, response: Response) -> Response:
    """No cache may keep an answer unless its route says so; no sniffing; the rate limit."""
    headers = response.headers
    # The names present, looked at once: each `setdefault` would scan them again.
    present = {name.lower() for name in headers.keys()}  # noqa: SIM118
    for name, value in _EXPOSURE:
        if name.lower() not in present:
            headers.add(name, value)
    if state.rate_limit_headers:
        for name, value in state.rate_limit_headers.items():
            if name.lower() not in present:
                headers.add(name, value)
    return response


# Responses carry users' data: no shared or browser cache may keep them, unless a route says
# otherwise; no browser may guess a content type.
_EXPOSURE = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"))
