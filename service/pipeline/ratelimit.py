"""The rate-limit step: every request that needs a scope is counted against its limit in Redis
(service/pipeline/limiter.py), after its key is identified and before the key is judged, so a
flood of bad keys is limited too. A Redis that fails lets requests through, and says so once.
"""

from __future__ import annotations

import logging

from quart import request

from service.errors import APIError
from service.pipeline.limiter import BACKOFF_SECONDS, LimiterUnavailable, RateLimiter, Verdict
from service.pipeline.state import RequestState, Setup

__all__ = ["BACKOFF_SECONDS", "RateLimiter", "Verdict", "count"]

log = logging.getLogger(__name__)


async def count(setup: Setup, state: RequestState) -> None:
    """Count the request against its key's (or its address's) limit; 429 once over it."""
    limiter, scope = setup.limiter, state.scope
    if limiter is None or scope is None or not setup.resources.serving:
        return
    key = state.key
    identity = f"key:{key.name}" if key else f"addr:{request.remote_addr or '-'}"
    try:
        verdict = await limiter.hit(setup.resources.redis, scope, identity)
    except LimiterUnavailable as error:
        log.warning(
            "rate limiter: Redis unavailable (%s); letting requests through for %.0f s",
            error,
            BACKOFF_SECONDS,
        )
        return
    if verdict is None:
        return
    state.rate_limit_headers = verdict.headers()
    if not verdict.allowed:
        raise APIError(
            429,
            f"Over the limit of {verdict.limit} {scope} requests per "
            f"{verdict.window} s; retry after {verdict.reset} s.",
            headers={"Retry-After": str(verdict.reset), **verdict.headers()},
        )
