"""The documented header limit (MAX_HEADER_BYTES, 16 KiB) is what Hypercorn and the app enforce,
over HTTP/1.1 and HTTP/2 (prior knowledge, as a proxy speaking h2c would)."""

from __future__ import annotations

import httpx
import pytest

from service.config import Settings
from tools.hypercorn_process import hypercorn
from tools.private_servers import free_port

LIMIT = 16 * 1024


def env_of(settings: Settings) -> dict[str, str]:
    return {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "REDIS_PREFIX": settings.redis_prefix,
    }


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/2"])
async def test_a_header_over_the_limit_is_refused_and_one_under_passes(
    settings: Settings, version: str
) -> None:
    http2 = version == "HTTP/2"
    with hypercorn(free_port(), env_of(settings), "--workers", "0") as (base_url, _):
        async with httpx.AsyncClient(
            base_url=base_url, http1=not http2, http2=http2, timeout=10
        ) as client:
            under = await client.get("/healthz", headers={"X-Pad": "u" * (LIMIT - 1024)})
            assert under.http_version == version
            assert under.status_code == 200
            for size in (LIMIT + 1024, 40 * 1024, 60 * 1024):
                over = await client.get("/healthz", headers={"X-Pad": "o" * size})
                assert over.http_version == version
                assert over.status_code == 431, size
                assert over.headers["content-type"] == "application/problem+json"
                assert over.json()["status"] == 431
            # The connection (or a new one) serves the next request as usual.
            assert (await client.get("/healthz")).status_code == 200
