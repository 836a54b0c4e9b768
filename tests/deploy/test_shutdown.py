"""Graceful shutdown under load: SIGTERM to Hypercorn (hypercorn.toml, several workers) while
requests are in flight. They all complete, new connections fail fast instead of hanging, and
the server exits 0 within graceful_timeout plus a margin. The figures are printed (-s shows
them); the assertions are on outcomes, not on speed."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import tomllib
from collections import Counter

import httpx
import pytest
import redis.asyncio as aioredis

from service.config import Settings
from tests.support.waiting import until
from tests.support.worker_procs import settings_env
from tools import ROOT
from tools.hypercorn_process import hypercorn

GRACEFUL_TIMEOUT = tomllib.loads((ROOT / "hypercorn.toml").read_text())["graceful_timeout"]
IN_FLIGHT = 24
# One long request among short ones: the worker without it drains first and exits, which is
# when Hypercorn's supervisor terminates the other worker, long request and all, unless the
# app keeps it alive (service/framework/drain.py).
DURATIONS = [3.0] + [1.0] * (IN_FLIGHT - 1)


def _new_connection_outcome(port: int) -> str:
    """What a brand-new client sees: refused, reset before any answer, or a full answer."""
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    except httpx.ConnectError:
        return "refused"
    except (httpx.ReadError, httpx.RemoteProtocolError):
        return "reset"
    except httpx.TimeoutException:
        return "hung"
    return f"served {response.status_code}"


async def _unless_served(port: int) -> str | None:
    """A new client's outcome once it is no longer served (the shutdown has been seen)."""
    outcome = await asyncio.to_thread(_new_connection_outcome, port)
    return None if outcome.startswith("served") else outcome


@pytest.mark.parametrize(
    ("workers", "target"),
    [
        ("2", "supervisor"),  # what docker stop and Kubernetes do
        ("2", "process-group"),  # kill -TERM -PGID, systemd's default KillMode
        ("0", "supervisor"),  # in-process: Hypercorn's own handler, which must stay in charge
    ],
)
async def test_sigterm_under_load_completes_in_flight_requests(
    settings: Settings, port: int, redis_cleanup: aioredis.Redis, workers: str, target: str
) -> None:
    env = settings_env(settings)
    counter = f"{settings.redis_prefix}in-flight"
    with hypercorn(
        port, env, "--workers", workers, app="tests.support.slow_app:create_app()", new_session=True
    ) as (base_url, process):
        limits = httpx.Limits(max_connections=IN_FLIGHT + 1)
        async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as http:
            requests = [
                asyncio.create_task(http.get("/_test/slow", params={"s": seconds}))
                for seconds in DURATIONS
            ]
            while int(await redis_cleanup.get(counter) or 0) < IN_FLIGHT:  # noqa: ASYNC110
                await asyncio.sleep(0.02)

            started = time.monotonic()
            if target == "supervisor":
                process.send_signal(signal.SIGTERM)
            else:
                os.killpg(process.pid, signal.SIGTERM)
            # Once the workers have seen the shutdown (they poll every 0.1 s), new clients
            # must not hang: connection refused, or reset before any byte of an answer.
            seen = await until(lambda: _unless_served(port), "a new client no longer served")
            late = [seen] + await asyncio.gather(
                *(asyncio.to_thread(_new_connection_outcome, port) for _ in range(5))
            )
            answers = await asyncio.gather(*requests, return_exceptions=True)
            exit_code = await asyncio.to_thread(process.wait, GRACEFUL_TIMEOUT + 10)
            exited_after = time.monotonic() - started

    completed = [a for a in answers if isinstance(a, httpx.Response) and a.status_code == 200]
    print(
        f"\n[shutdown/workers={workers}/{target}] in flight at SIGTERM: {IN_FLIGHT} "
        "(1 of 3 s, the rest 1 s); "
        f"completed: {len(completed)}; new connections after it: {dict(Counter(late))}; "
        f"exit {exit_code} after {exited_after:.2f} s (graceful_timeout {GRACEFUL_TIMEOUT} s)"
    )
    assert [a for a in answers if a not in completed] == []
    assert sorted(a.json()["slept"] for a in completed) == sorted(DURATIONS)
    assert exit_code == 0
    assert exited_after < GRACEFUL_TIMEOUT + 5
    assert "hung" not in late
    with socket.socket() as probe:  # the port is released once the server is gone
        assert probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("workers", ["2", "0"])
async def test_a_request_outlasting_graceful_timeout_does_not_hold_the_shutdown(
    settings: Settings, port: int, redis_cleanup: aioredis.Redis, workers: str
) -> None:
    """graceful_timeout bounds the drain on every Python.

    From Python 3.12 on, asyncio's ``Server.wait_closed()`` waits for every open connection,
    and Hypercorn awaits it before it starts counting ``graceful_timeout``
    (pgjones/hypercorn#308): with asyncio's loop, one request longer than the timeout holds
    the shutdown for as long as it runs. uvloop's server, the ``worker_class`` hypercorn.toml
    sets, returns once its listening sockets are closed, so the timeout holds. This fails if
    that changes (uvloop, Hypercorn, or hypercorn.toml's worker class)."""
    graceful = 2
    counter = f"{settings.redis_prefix}in-flight"
    with hypercorn(
        port,
        settings_env(settings),
        "--workers",
        workers,
        "--graceful-timeout",
        str(graceful),
        app="tests.support.slow_app:create_app()",
        new_session=True,
    ) as (base_url, process):
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
            long = asyncio.create_task(http.get("/_test/slow", params={"s": 60}))
            while not await redis_cleanup.get(counter):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            exit_code = await asyncio.to_thread(process.wait, 90)
            exited_after = time.monotonic() - started
            (answer,) = await asyncio.gather(long, return_exceptions=True)
    print(
        f"\n[graceful_timeout/workers={workers}] a 60 s request in flight; exit {exit_code} "
        f"after {exited_after:.1f} s (graceful_timeout {graceful} s); the request: "
        f"{getattr(answer, 'status_code', type(answer).__name__)}"
    )
    assert exit_code == 0
    # Cut at the timeout: far below the request's 60 s, with room for a busy machine.
    assert exited_after < graceful + 20
    assert not (isinstance(answer, httpx.Response) and answer.status_code == 200)
