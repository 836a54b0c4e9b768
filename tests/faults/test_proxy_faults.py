"""The service under Hypercorn with a fault-injecting proxy (tests/support/faultproxy.py) in
front of PostgreSQL, and another with one in front of Redis (the arq worker's Redis too):
latency, a stall, every connection cut, new connections refused, then healed. What it must
hold: answers within its timeouts (never a hang), 503 with Retry-After and never a 500, the
routes that can do without Redis still 200, and recovery without a restart.

`pytest -s` prints the figures the failure table of docs/failure-modes.md quotes.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import redis

from service.backends.db import migrate
from service.config import load_settings
from service.errors import PROBLEM_JSON
from tests.support.faultproxy import FaultProxy
from tests.support.worker_procs import start_worker, stop, wait_for_health
from tools.devstack import with_search_path
from tools.hypercorn_process import hypercorn, output
from tools.private_servers import free_port

# Lower-case ASCII: the address is its own key (service/emails.py).
INSERT_USER = (
    "INSERT INTO users (email, email_key, name) VALUES ('a@example.com', 'a@example.com', 'A')"
)

Request = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]

# One-way delay the latency tests add, each direction: a 200 ms round trip.
DELAY = 0.1
# Short bounds, so a stall costs seconds; every one is what the test's bound is made of.
POSTGRES_ENV = {
    "DB_ACQUIRE_TIMEOUT": "1",
    "DB_CONNECT_TIMEOUT": "1",
    "DB_STATEMENT_TIMEOUT_MS": "1000",  # the client gives up 1 s later: 2 s per query
    "READINESS_CACHE": "0",
}
# Redis's timeouts keep their defaults (REDIS_SOCKET_TIMEOUT 1 s, CACHE_REDIS_TIMEOUT 0.5 s,
# RATE_LIMIT_TIMEOUT 1 s); the cache's retry interval is 1 s, not 5 s, so recovery is seen soon.
REDIS_ENV = {
    "READINESS_CACHE": "0",
    "CACHE_RETRY_INTERVAL": "1",
    # The limiter is on (it is off in development) so its Redis goes through the proxy too;
    # limits far above the load, which comes from one address.
    "RATE_LIMIT_ENABLED": "true",
    "RATE_LIMIT_READ": "1000000",
    "RATE_LIMIT_WRITE": "1000000",
    "TASK_CLIENT_LIMIT": "1000",
    "TASK_WAIT": "5",
}
# The longest a request may take while its backend is stalled, from the settings above plus
# a margin for a machine under load. PostgreSQL: a pooled connection's wait (or a fresh one's
# handshake), then the query's bound. Redis: the rate limiter's sync timing out and a PING
# confirming it (2 x RATE_LIMIT_TIMEOUT, requests waiting on it meanwhile), then one command's
# REDIS_SOCKET_TIMEOUT (tasks) or CACHE_REDIS_TIMEOUT (the report).
MARGIN = 3
POSTGRES_BOUND = 1 + 2 + MARGIN
REDIS_BOUND = 2 * 1 + 1 + MARGIN


@dataclass
class Tally:
    """What one route answered during a phase: statuses, times, and anything off-contract."""

    statuses: Counter[int] = field(default_factory=Counter)
    # (started, seconds taken, status) of each answer, started on the monotonic clock.
    answers: list[tuple[float, float, int]] = field(default_factory=list)
    cache: Counter[str] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # answers neither 2xx nor 503, for the message

    def add(self, started: float, response: httpx.Response) -> None:
        status = response.status_code
        self.statuses[status] += 1
        self.answers.append((started, time.monotonic() - started, status))
        if "cache-status" in response.headers:
            self.cache[cache_outcome(response)] += 1
        if status >= 500 and status != 503:
            self.bad.append(f"{status}: {response.text[:300]}")
        elif status not in (200, 202, 503):
            self.other.append(f"{status}: {response.text[:300]}")
        if status == 503 and (
            response.headers.get("retry-after") is None
            or response.headers.get("content-type") != PROBLEM_JSON
        ):
            self.bad.append(f"503 without Retry-After or problem+json: {response.text[:300]}")

    @property
    def slowest(self) -> float:
        return max((took for _, took, _ in self.answers), default=0.0)

    @property
    def median(self) -> float:
        return statistics.median(took for _, took, _ in self.answers)

    def after(self, moment: float) -> Counter[int]:
        """Statuses of the requests started after ``moment``."""
        return Counter(status for started, _, status in self.answers if started > moment)

    def summary(self) -> str:
        cache = f", cache {dict(self.cache)}" if self.cache else ""
        return (
            f"{dict(self.statuses)}, median {self.median:.3f} s, slowest {self.slowest:.2f} s"
            f"{cache}{' ' + repr(self.other[:2]) if self.other else ''}"
        )


def cache_outcome(response: httpx.Response) -> str:
    """hit, bypass (computed without Redis) or miss, from the report's Cache-Status."""
    value = response.headers.get("cache-status", "")
    if "; hit" in value:
        return "hit"
    return "bypass" if "fwd=bypass" in value else "miss"


async def send(http: httpx.AsyncClient, request: Request, tally: Tally) -> httpx.Response | None:
    started = time.monotonic()
    try:
        response = await request(http)
    except httpx.TransportError as error:  # the client's timeout: a hang, or a dropped answer
        tally.bad.append(f"after {time.monotonic() - started:.1f} s: {error!r}")
        return None
    tally.add(started, response)
    return response


async def load(
    http: httpx.AsyncClient,
    routes: dict[str, Request],
    seconds: float,
    *,
    clients: int = 2,
    fault: Awaitable[None] | None = None,
) -> dict[str, Tally]:
    """``clients`` loops per route for ``seconds``, with ``fault`` running beside them."""
    tallies = {name: Tally() for name in routes}
    deadline = time.monotonic() + seconds

    async def client(name: str) -> None:
        while time.monotonic() < deadline:
            await send(http, routes[name], tallies[name])
            await asyncio.sleep(0.01)

    loops = [client(name) for name in routes for _ in range(clients)]
    await asyncio.gather(*loops, *([fault] if fault is not None else []))
    return tallies


@dataclass
class Cut:
    at: float = 0.0
    connections: int = 0


async def cut_mid_command(proxy: FaultProxy, after: float, cut: Cut) -> None:
    """``after`` seconds in, every connection cut while commands are on the wire: DELAY is
    added first, so the cut finds each busy connection mid-command; healed at once."""
    await asyncio.sleep(after)
    proxy.delay(upstream=DELAY, downstream=DELAY)
    await asyncio.sleep(2 * DELAY)
    cut.at = time.monotonic()
    cut.connections = proxy.cut()
    proxy.heal()


async def until(
    http: httpx.AsyncClient, request: Request, ok: Callable[[httpx.Response], bool], within: float
) -> float:
    """Seconds until ``request`` answers ``ok``; fails the test after ``within``."""
    started = time.monotonic()
    last: httpx.Response | httpx.TransportError | None = None
    while time.monotonic() - started < within:
        try:
            last = await request(http)
            if ok(last):
                return time.monotonic() - started
        except httpx.TransportError as error:
            last = error
        await asyncio.sleep(0.02)
    raise AssertionError(f"not recovered within {within} s; last: {last!r}")


def status_200(response: httpx.Response) -> bool:
    return response.status_code == 200


def no_unhandled_errors(server_log: str) -> None:
    unhandled = [line for line in server_log.splitlines() if "unhandled error" in line]
    assert not unhandled, unhandled[:3]


def through(url: str, proxy: FaultProxy) -> str:
    """``url`` with its host and port replaced by the proxy's (user, path and query kept)."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{proxy.host}:{proxy.port}"))


def upstream(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


@dataclass
class Proxied:
    base_url: str
    server: subprocess.Popen[bytes]  # the Hypercorn process, for its output
    proxy: FaultProxy
    worker: subprocess.Popen[bytes] | None = None


async def lookup(http: httpx.AsyncClient) -> httpx.Response:
    return await http.get("/users", params={"email": "a@example.com"})


async def report(http: httpx.AsyncClient) -> httpx.Response:
    return await http.get("/expensive-operation")


async def heavy_task(http: httpx.AsyncClient) -> httpx.Response:
    return await http.get("/heavy-task", params={"n": 1000})


async def readyz(http: httpx.AsyncClient) -> httpx.Response:
    return await http.get("/readyz")


async def outcome(http: httpx.AsyncClient, location: str, within: float = 20) -> str:
    """The status a task ends with (complete or failed); fails the test if it never ends."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        response = await http.get(location)
        if response.status_code == 200 and response.json()["status"] in ("complete", "failed"):
            return str(response.json()["status"])
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {location} did not end within {within} s: {response.text}")


# -- the servers: one Hypercorn (one worker) per backend, shared by that backend's tests -------


@pytest.fixture(scope="module")
def schema(service_urls: dict[str, str]) -> Iterator[str]:
    """A migrated schema with one user, for this module's servers."""
    name = f"test_{uuid.uuid4().hex[:12]}"

    async def run(*statements: str, migrated: bool = False) -> None:
        conn = await asyncpg.connect(service_urls["DATABASE_URL"])
        try:
            for statement in statements:
                await conn.execute(statement)
            if migrated:
                await migrate(conn)
                await conn.execute(INSERT_USER)
        finally:
            await conn.close()

    asyncio.run(run(f'CREATE SCHEMA "{name}"', f'SET search_path TO "{name}"', migrated=True))
    try:
        yield name
    finally:
        asyncio.run(run(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))


@pytest.fixture(scope="module")
def module_redis_prefix(service_urls: dict[str, str]) -> Iterator[str]:
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(service_urls["REDIS_URL"])
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture(scope="module")
def postgres_proxied(
    service_urls: dict[str, str], schema: str, module_redis_prefix: str
) -> Iterator[Proxied]:
    database_url = with_search_path(service_urls["DATABASE_URL"], schema)
    with FaultProxy(*upstream(database_url, 5432)) as proxy:
        env = {
            **POSTGRES_ENV,
            "DATABASE_URL": through(database_url, proxy),
            "REDIS_URL": service_urls["REDIS_URL"],
            "REDIS_PREFIX": module_redis_prefix,
        }
        with hypercorn(free_port(), env, "--workers", "1") as (base_url, server):
            yield Proxied(base_url, server, proxy)


@pytest.fixture(scope="module")
def redis_proxied(
    service_urls: dict[str, str], schema: str, module_redis_prefix: str
) -> Iterator[Proxied]:
    database_url = with_search_path(service_urls["DATABASE_URL"], schema)
    with FaultProxy(*upstream(service_urls["REDIS_URL"], 6379)) as proxy:
        redis_url = through(service_urls["REDIS_URL"], proxy)
        env = {
            **REDIS_ENV,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "REDIS_PREFIX": module_redis_prefix,
        }
        worker = start_worker({**env, "WORKER_PROCESSES": "1"})
        try:
            direct = load_settings(
                redis_url=service_urls["REDIS_URL"], redis_prefix=module_redis_prefix
            )
            wait_for_health(direct, worker)
            with hypercorn(free_port(), env, "--workers", "1") as (base_url, server):
                yield Proxied(base_url, server, proxy, worker)
        finally:
            worker_log = stop(worker)
            assert "Traceback" not in worker_log, worker_log[-3000:]


# -- PostgreSQL ---------------------------------------------------------------------------


async def test_postgres_latency_slows_lookups_by_the_round_trip_and_fails_none(
    postgres_proxied: Proxied,
) -> None:
    proxy = postgres_proxied.proxy
    async with httpx.AsyncClient(base_url=postgres_proxied.base_url, timeout=20) as http:
        await until(http, lookup, status_200, 10)
        before = (await load(http, {"users": lookup}, 1.5, clients=4))["users"]
        proxy.delay(upstream=DELAY, downstream=DELAY)
        try:
            during = (await load(http, {"users": lookup}, 2.5, clients=4))["users"]
            ready = await readyz(http)
        finally:
            proxy.heal()
    print(
        f"\npostgres +{2 * DELAY:.1f} s RTT: before {before.summary()}; during {during.summary()}"
    )
    assert set(before.statuses) == set(during.statuses) == {200}, during.bad + during.other
    # Each lookup is one round trip (prepared statements cached, no reset query on release).
    added = during.median - before.median
    assert 2 * DELAY * 0.75 < added < 2 * DELAY + 2, added
    assert ready.status_code == 200
    no_unhandled_errors(output(postgres_proxied.server))


async def test_postgres_stalled_answers_503_within_its_timeouts_and_recovers_on_heal(
    postgres_proxied: Proxied,
) -> None:
    proxy = postgres_proxied.proxy
    async with httpx.AsyncClient(base_url=postgres_proxied.base_url, timeout=20) as http:
        await until(http, lookup, status_200, 10)
        proxy.stall()
        try:
            during = (await load(http, {"users": lookup}, 4, clients=4))["users"]
            ready_during = await readyz(http)
        finally:
            proxy.heal()
        healed = time.monotonic()
        first_200 = await until(http, lookup, status_200, 15)
        await until(http, readyz, status_200, 15)
        ready_after = time.monotonic() - healed
        after = (await load(http, {"users": lookup}, 1, clients=4))["users"]
    print(
        f"\npostgres stalled: {during.summary()}; readyz {ready_during.status_code} "
        f"{ready_during.json()['checks']}; healed: first 200 after {first_200:.2f} s, "
        f"/readyz 200 after {ready_after:.2f} s"
    )
    assert set(during.statuses) == {503}, during.statuses
    assert not during.bad, during.bad[:3]
    # Bounded by DB_ACQUIRE_TIMEOUT, DB_CONNECT_TIMEOUT and the query bound, not a hang.
    assert during.slowest < POSTGRES_BOUND
    assert ready_during.status_code == 503
    assert ready_during.json()["checks"]["postgres"].startswith("unavailable")
    assert set(after.statuses) == {200}, after.bad
    no_unhandled_errors(output(postgres_proxied.server))


async def test_postgres_connections_cut_mid_query_cost_a_few_503s_and_no_500(
    postgres_proxied: Proxied,
) -> None:
    proxy, cut = postgres_proxied.proxy, Cut()
    async with httpx.AsyncClient(base_url=postgres_proxied.base_url, timeout=20) as http:
        await until(http, lookup, status_200, 10)
        fault = cut_mid_command(proxy, 1, cut)
        tally = (await load(http, {"users": lookup}, 3, clients=4, fault=fault))["users"]
        ready = await readyz(http)
    recovered = min(
        (started + took - cut.at for started, took, status in tally.answers
         if started > cut.at and status == 200),
        default=None,
    )  # fmt: skip
    print(
        f"\npostgres cut ({cut.connections} connections): {tally.summary()}; "
        f"first 200 {recovered:.2f} s after the cut"
    )
    assert set(tally.statuses) <= {200, 503}, tally.statuses
    assert not tally.bad, tally.bad[:3]
    # Only the requests in flight on a cut connection fail: the pool replaces the idle ones.
    assert 0 < tally.statuses[503] <= 4
    assert tally.after(cut.at)[200] > 0
    assert ready.status_code == 200
    no_unhandled_errors(output(postgres_proxied.server))


async def test_postgres_refusing_connections_fails_fast_with_503_and_recovers_on_heal(
    postgres_proxied: Proxied,
) -> None:
    proxy = postgres_proxied.proxy
    async with httpx.AsyncClient(base_url=postgres_proxied.base_url, timeout=20) as http:
        await until(http, lookup, status_200, 10)
        proxy.refuse()
        proxy.cut()  # as a host gone: open connections reset, new ones refused
        try:
            during = (await load(http, {"users": lookup}, 2, clients=4))["users"]
            ready_during = await readyz(http)
        finally:
            proxy.heal()
        first_200 = await until(http, lookup, status_200, 15)
    print(f"\npostgres refused: {during.summary()}; healed: first 200 after {first_200:.2f} s")
    assert set(during.statuses) == {503}, during.statuses
    assert not during.bad, during.bad[:3]
    assert during.slowest < POSTGRES_BOUND
    assert ready_during.status_code == 503
    no_unhandled_errors(output(postgres_proxied.server))


# -- Redis --------------------------------------------------------------------------------

REDIS_ROUTES: dict[str, Request] = {"users": lookup, "report": report, "task": heavy_task}


async def test_redis_latency_slows_the_redis_routes_and_fails_none(
    redis_proxied: Proxied,
) -> None:
    proxy = redis_proxied.proxy
    async with httpx.AsyncClient(base_url=redis_proxied.base_url, timeout=20) as http:
        await until(http, heavy_task, status_200, 15)
        before = await load(http, REDIS_ROUTES, 1.5)
        proxy.delay(upstream=DELAY, downstream=DELAY)
        try:
            during = await load(http, REDIS_ROUTES, 3)
            ready = await readyz(http)
        finally:
            proxy.heal()
    print(f"\nredis +{2 * DELAY:.1f} s RTT:")
    for name in REDIS_ROUTES:
        print(f"  {name}: before {before[name].summary()}; during {during[name].summary()}")
    for name in REDIS_ROUTES:
        assert set(during[name].statuses) == {200}, (name, during[name].bad + during[name].other)
    # The cache is still used (its 0.5 s bound is above the round trip), and costs one.
    assert during["report"].cache["hit"] > 0
    assert during["report"].median - before["report"].median > 2 * DELAY * 0.75
    # A task takes several round trips, the API's and the worker's.
    assert during["task"].median - before["task"].median > 2 * DELAY
    assert during["task"].slowest < 20
    assert ready.status_code == 200
    assert ready.json()["checks"]["redis"] == "ok"
    no_unhandled_errors(output(redis_proxied.server))


async def test_redis_stalled_refuses_tasks_with_503_serves_the_rest_and_recovers_on_heal(
    redis_proxied: Proxied,
) -> None:
    proxy = redis_proxied.proxy
    async with httpx.AsyncClient(base_url=redis_proxied.base_url, timeout=20) as http:
        await until(http, heavy_task, status_200, 15)
        proxy.stall()
        try:
            during = await load(http, REDIS_ROUTES, 4)
            ready_during = await readyz(http)
        finally:
            proxy.heal()
        healed = time.monotonic()
        task_back = await until(http, heavy_task, status_200, 15)
        await until(http, report, lambda r: cache_outcome(r) == "hit", 15)
        hit_back = time.monotonic() - healed
        await until(http, readyz, lambda r: r.json()["checks"]["redis"] == "ok", 15)
        ready_back = time.monotonic() - healed
    print(f"\nredis stalled: readyz {ready_during.status_code} {ready_during.json()}")
    for name in REDIS_ROUTES:
        print(f"  {name}: {during[name].summary()}")
    print(
        f"  healed: task 200 after {task_back:.2f} s, report a hit after {hit_back:.2f} s, "
        f"redis ok in /readyz after {ready_back:.2f} s"
    )
    for tally in during.values():
        assert not tally.bad, tally.bad[:3]
    # Lookups need no Redis (the limiter falls back to its local bucket); the report is
    # computed without the cache; tasks are refused, never left hanging.
    assert set(during["users"].statuses) == {200}
    assert set(during["report"].statuses) == {200}
    assert during["report"].cache["bypass"] > 0
    assert set(during["task"].statuses) == {503}
    for tally in during.values():
        assert tally.slowest < REDIS_BOUND
    assert ready_during.status_code == 200
    assert ready_during.json()["status"] == "degraded"
    no_unhandled_errors(output(redis_proxied.server))


async def test_redis_connections_cut_mid_command_lose_no_task_and_cost_few_503s(
    redis_proxied: Proxied,
) -> None:
    proxy, cut = redis_proxied.proxy, Cut()
    accepted: list[str] = []

    async def submit(http: httpx.AsyncClient) -> httpx.Response:
        response = await http.post("/tasks", json={"n": 1000})
        if response.status_code == 202:
            accepted.append(response.headers["location"])
        await asyncio.sleep(0.1)  # a few tasks, not a queue the one worker lags behind
        return response

    routes = {**REDIS_ROUTES, "submit": submit}
    async with httpx.AsyncClient(base_url=redis_proxied.base_url, timeout=20) as http:
        await until(http, heavy_task, status_200, 15)
        tallies = await load(http, routes, 3, fault=cut_mid_command(proxy, 1, cut))
        try:
            ended = Counter([await outcome(http, location) for location in accepted])
        except AssertionError:
            assert redis_proxied.worker is not None
            print(output(redis_proxied.worker)[-6000:])
            print(output(redis_proxied.server)[-6000:])
            raise
        ready = await readyz(http)
    print(f"\nredis cut ({cut.connections} connections):")
    for name, tally in tallies.items():
        print(f"  {name}: {tally.summary()}")
    print(f"  tasks accepted {len(accepted)}: {dict(ended)}")
    for tally in tallies.values():
        assert not tally.bad, tally.bad[:3]
    assert set(tallies["users"].statuses) == {200}
    assert set(tallies["report"].statuses) == {200}
    assert set(tallies["task"].statuses) <= {200, 202, 503}
    assert set(tallies["submit"].statuses) <= {202, 503}
    for name in ("task", "submit"):
        assert tallies[name].statuses[503] <= 2, name
        assert tallies[name].after(cut.at)[200 if name == "task" else 202] > 0
    # Nothing lost: every task accepted, before or after the cut, ran to its end.
    assert ended == Counter(complete=len(accepted))
    assert ready.status_code == 200
    no_unhandled_errors(output(redis_proxied.server))
