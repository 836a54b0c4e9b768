"""TRUSTED_PROXIES over a real Hypercorn on loopback: 127.0.0.1 plays the trusted load balancer,
127.0.0.2 a client that reaches the service directly. The first one's X-Forwarded-For sets the
client's address for the rate limit, the request log line and Hypercorn's own access log; the
second one's is ignored."""

from __future__ import annotations

import json

import httpx

from service.config import Settings
from tests.support.windows import fresh_window
from tools.hypercorn_process import hypercorn, output
from tools.private_servers import free_port


def test_a_trusted_proxy_forwards_the_client_and_a_direct_peer_cannot(settings: Settings) -> None:
    env = {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "REDIS_PREFIX": settings.redis_prefix,
        "TRUSTED_PROXIES": "127.0.0.1",
        "RATE_LIMIT_ENABLED": "true",
        "RATE_LIMIT_READ": "2",
        "RATE_LIMIT_PROCESSES": "1",
        "RATE_LIMIT_WINDOW": str(fresh_window()),  # the test's requests in one window
    }
    args = ("--workers", "1", "--access-logfile", "-")
    with hypercorn(free_port(), env, *args) as (base_url, process):
        direct = httpx.HTTPTransport(local_address="127.0.0.2")
        with (
            httpx.Client(base_url=base_url, timeout=10) as proxy,
            httpx.Client(base_url=base_url, timeout=10, transport=direct) as stranger,
        ):

            def through_proxy(forwarded: str) -> int:
                return proxy.get("/users", headers={"X-Forwarded-For": forwarded}).status_code

            # One client through the proxy, the second time with a spoofed entry before its own.
            assert through_proxy("203.0.113.7") == 200
            assert through_proxy("198.51.100.1, 203.0.113.7") == 200
            assert through_proxy("203.0.113.7") == 429
            assert through_proxy("203.0.113.8") == 200  # another client: its own limit

            # The peer that is not trusted: a new address in every header, all counted as its.
            statuses = [
                stranger.get("/users", headers={"X-Forwarded-For": f"203.0.113.{n}"}).status_code
                for n in (20, 21, 22)
            ]
            assert statuses == [200, 200, 429]
    printed = output(process)  # once stopped: an access line is written after its response
    entries = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    requests = [  # the readiness probes of the harness aside
        entry["client"] for entry in entries if entry.get("route") == "/users"
    ]
    assert requests == ["203.0.113.7"] * 3 + ["203.0.113.8"] + ["127.0.0.2"] * 3
    # Hypercorn's access log reads the same scope: the forwarded address (port 0), or the peer.
    accessed = [entry["remote_addr"] for entry in entries if entry.get("path") == "/users"]
    assert [address.rpartition(":")[0] for address in accessed] == requests
    assert accessed[0] == "203.0.113.7:0"
