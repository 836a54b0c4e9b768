"""Response headers every answer gets: CORS (when origins are configured) and exposure rules."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import cast

import quart_cors
from quart import Blueprint, Response

from service.config import Settings, split_list
from service.contract import METHODS
from service.pipeline.state import RequestState, Setup

CORS_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"]
CORS_EXPOSED = ["Location", "Retry-After", "RateLimit", "RateLimit-Policy", "X-Request-ID"]

CorsFunction = Callable[[Response], Awaitable[Response]]


def cors_policy(settings: Settings) -> CorsFunction | None:
    """quart-cors's response function for ``CORS_ALLOW_ORIGINS``; None when none is set.

    quart-cors offers its policy only as an ``after_request`` function it registers on what it
    is given. It is given a blueprint that is never registered, and the function is taken from
    it, so the CORS step runs at its place in the pipeline rather than wherever Quart's reverse
    order of ``after_request`` functions would put it.
    """
    origins = split_list(settings.cors_allow_origins)
    if not origins:
        return None
    holder = Blueprint("cors_policy", __name__)
    quart_cors.cors(
        holder,
        allow_origin=origins,
        allow_headers=CORS_HEADERS,
        allow_methods=sorted(METHODS),
        expose_headers=CORS_EXPOSED,
        allow_credentials=False,
        max_age=600,
    )
    (function,) = holder.after_request_funcs[None]
    return cast(CorsFunction, function)


async def cors(setup: Setup, state: RequestState, response: Response) -> Response:
    """The CORS headers, for an allowed origin."""
    if setup.cors is None:
        return response
    return await setup.cors(response)


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
