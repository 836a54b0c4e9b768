"""The documented header limit (MAX_HEADER_BYTES, 16 KiB) is what Hypercorn and the app enforce,
over HTTP/1.1 and HTTP/2 (prior knowledge, as a proxy speaking h2c would)."""

from __future__ import annotations

import asyncio
import json

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


@pytest.mark.parametrize("size", [LIMIT + 1024, 60 * 1024])
async def test_a_head_over_the_limit_that_arrives_in_pieces_gets_the_same_problem(
    settings: Settings, size: int
) -> None:
    """Hypercorn hands h11 what each read returns; a head split by TCP is still incomplete
    after the first read. With h11's bound at 16 KiB that was h11's bare 431 (no body, no
    problem+json); hypercorn.toml's bound lets every head under 64 KiB reach the app."""
    head = (f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: {'o' * size}\r\n\r\n").encode()
    with hypercorn(free_port(), env_of(settings), "--workers", "0") as (base_url, _):
        port = int(base_url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for start in range(0, len(head), 8192):
                writer.write(head[start : start + 8192])
                await writer.drain()
                await asyncio.sleep(0.05)  # each piece its own read
            answer = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[:2] == [b"HTTP/1.1", b"431"], answer[:300]
    head_part, _, body = rest.partition(b"\r\n\r\n")
    assert b"content-type: application/problem+json" in head_part.lower(), answer[:300]
    assert json.loads(body)["status"] == 431
