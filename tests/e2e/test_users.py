"""End to end: Hypercorn started with hypercorn.toml as a subprocess, driven over HTTP."""

from __future__ import annotations

import asyncio

import httpx

from service.config import Settings
from service.errors import PROBLEM_JSON
from tests.support.worker_procs import settings_env
from tools.hypercorn_process import hypercorn, output


async def test_users_routes_over_http_under_hypercorn(settings: Settings, port: int) -> None:
    env = settings_env(settings)
    with hypercorn(port, env) as (base_url, process):
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
            created = await http.post("/users", json={"email": "e2e@example.com", "name": "E"})
            assert created.status_code == 201
            user = created.json()
            assert created.headers["location"] == f"/users/{user['id']}"

            found = await http.get("/users", params={"email": "E2E@EXAMPLE.COM"})
            assert found.json()["users"] == [user]

            changed = await http.patch(f"/users/{user['id']}", json={"name": "Eve"})
            assert changed.json()["name"] == "Eve"

            # Concurrent duplicates across both Hypercorn workers: one wins, the rest are 409.
            racers = await asyncio.gather(
                *(
                    http.post("/users", json={"email": "race@example.com", "name": "R"})
                    for _ in range(10)
                )
            )
            assert sorted(r.status_code for r in racers) == [201] + [409] * 9
            assert all(
                r.headers["content-type"] == PROBLEM_JSON for r in racers if r.status_code == 409
            )

            bad = await http.post(
                "/users", content=b"{", headers={"content-type": "application/json"}
            )
            assert bad.status_code == 400
            assert bad.headers["content-type"] == PROBLEM_JSON

            too_big = await http.post("/users", content=b"x" * 100_000)
            assert too_big.status_code == 413
            # Refused unread: the server closes, and says so, so the client does not reuse it.
            assert too_big.headers["connection"] == "close"
            not_json = await http.post(
                "/users", content=b"email=a", headers={"content-type": "text/plain"}
            )
            assert not_json.status_code == 415

            deleted = await http.delete(f"/users/{user['id']}")
            assert deleted.status_code == 204
            # Checked on the wire: Quart's test client gives every response it rebuilds one.
            assert "content-type" not in deleted.headers
            assert (await http.get(f"/users/{user['id']}")).status_code == 404
            assert (await http.get("/readyz")).json()["status"] == "ok"
        # Every answer above went out whole, and nothing failed after it either: on Python 3.13
        # a reliance on Quart's private connection API answered GETs, then raised.
        assert "Error in ASGI Framework" not in output(process)
        assert "Traceback" not in output(process)
