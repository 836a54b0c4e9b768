"""The rate-limit step: every request that needs a scope is counted against its limit
(service/pipeline/limiter.py: decided in the process, synchronised with Redis in batches),
after its key is identified and before the key is judged, so a flood of bad keys is limited
too. While Redis is down each process limits on its own (a local bucket), never not at all.
"""

from __future__ import annotations

from service.errors import APIError
from service.pipeline.limiter import RateLimiter, Verdict
from service.pipeline.state import RequestState, Setup

__all__ = ["RateLimiter", "Verdict", "count"]


async def count(setup: Setup, state: RequestState) -> None:
    """Count the request against its key's (or its address's) limit; 429 once over it."""
    limiter, scope = setup.limiter, state.scope
    if limiter is None or scope is None:
        return
    key = state.key
    identity = f"key:{key.name}" if key else f"addr:{state.request.remote_addr or '-'}"
    verdict = await limiter.hit(scope, identity)
    state.rate_limit_headers = verdict.headers()
    if not verdict.allowed:
        raise APIError(
            429,
            f"Over the limit of {verdict.limit} {scope} requests per "
            f"{verdict.window} s; retry after {verdict.reset} s.",
            headers={"Retry-After": str(verdict.reset), **verdict.headers()},
        )
