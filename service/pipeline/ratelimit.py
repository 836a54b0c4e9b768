"""The rate-limit step: every request that needs a scope is counted against its limit
(service/backends/limiter.py: decided in the process, synchronised with Redis in batches),
after its key is identified and before the key is judged, so a flood of bad keys is limited
too. While Redis is down each process limits on its own (a local bucket), never not at all.
"""

from __future__ import annotations

from service.backends.limiter import Verdict
from service.errors import APIError
from service.pipeline.state import RequestState, Setup


def rate_limit_headers(verdict: Verdict) -> dict[str, str]:
    """``RateLimit-Policy`` and ``RateLimit`` (draft-ietf-httpapi-ratelimit-headers)."""
    return {
        "RateLimit-Policy": f'"{verdict.policy}";q={verdict.limit};w={verdict.window}',
        "RateLimit": f'"{verdict.policy}";r={verdict.remaining};t={verdict.reset}',
    }


async def count(setup: Setup, state: RequestState) -> None:
    """Count the request against its key's (or its address's) limit; 429 once over it."""
    limiter, scope = setup.limiter, state.scope
    if limiter is None or scope is None:
        return
    key = state.key
    identity = f"key:{key.name}" if key else f"addr:{state.request.remote_addr or '-'}"
    verdict = await limiter.hit(scope, identity)
    headers = state.rate_limit_headers = rate_limit_headers(verdict)
    if not verdict.allowed:
        raise APIError(
            429,
            f"Over the limit of {verdict.limit} {scope} requests per "
            f"{verdict.window} s; retry after {verdict.reset} s.",
            headers={"Retry-After": str(verdict.reset), **headers},
        )
