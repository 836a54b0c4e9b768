"""Metrics, blocking detection, slow queries, profiling and request ids, with the app's serving
hooks running against real PostgreSQL and Redis (in this process: plain, non-multiprocess
metrics; ``tests/e2e/test_observe.py`` covers Hypercorn's worker processes)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest
from pydantic import SecretStr
from quart import Quart
from quart.typing import TestClientProtocol as Client

from service.app import create_app
from service.config import Settings
from service.errors import PROBLEM_JSON
from service.obs.logs import RequestIdFilter
from service.obs.loopwatch import LoopWatch, activity
from service.ops.doctor import Samples, parse_metrics
from tests.support.blocking_app import add_blocking_route
from tests.support.waiting import until
from tools.private_servers import free_port

TOKEN = "a-long-profiling-token-0123456789"


async def scrape(client: Client) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    return parse_metrics(await response.get_data(as_text=True))


def value(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        v for found, v in samples.get(name, []) if all(found.get(k) == x for k, x in labels.items())
    )


async def serve(settings: Settings, blocking: bool = False) -> AsyncIterator[Client]:
    quart_app: Quart = create_app(settings)
    if blocking:
        add_blocking_route(quart_app)
    async with quart_app.test_app() as test_app:
        yield test_app.test_client()


@pytest.fixture
async def blocking_client(settings: Settings) -> AsyncIterator[Client]:
    async for client in serve(settings.model_copy(update={"loop_block_threshold": 0.1}), True):
        yield client


@pytest.fixture
async def profiling_client(settings: Settings) -> AsyncIterator[Client]:
    async for client in serve(settings.model_copy(update={"profiling_token": SecretStr(TOKEN)})):
        yield client


async def test_requests_are_counted_by_route_template_and_status(client: Client) -> None:
    before = await scrape(client)
    for user_id in (101, 102, 103):
        assert (await client.get(f"/users/{user_id}")).status_code == 404
    created = await client.post("/users", json={"email": "m@example.com", "name": "M"})
    assert created.status_code == 201
    assert (await client.get("/no/such/path/4711")).status_code == 404
    after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = "/users/<int:user_id>"
    assert delta("quart_service_http_requests_total", method="GET", route=route, status="404") == 3
    assert (
        delta("quart_service_http_requests_total", method="POST", route="/users", status="201") == 1
    )
    assert delta("quart_service_http_requests_total", route="<unmatched>", status="404") == 1
    assert (
        delta("quart_service_http_request_duration_seconds_count", method="GET", route=route) == 3
    )
    # Raw paths never become labels.
    assert not any(
        "/users/101" in str(labels) for labels, _ in after["quart_service_http_requests_total"]
    )
    assert value(after, "quart_service_db_pool_max_size") == 5
    assert value(after, "quart_service_db_pool_size") >= 1


async def test_tasks_accepted_and_refused_and_queue_depth(settings: Settings) -> None:
    async for client in serve(settings.model_copy(update={"task_queue_limit": 1})):
        before = await scrape(client)
        assert (await client.post("/tasks", json={"n": 10})).status_code == 202
        assert (await client.post("/tasks", json={"n": 11})).status_code == 503
        after = await scrape(client)
        assert (
            value(after, "quart_service_tasks_accepted_total")
            - value(before, "quart_service_tasks_accepted_total")
            == 1
        )
        refused = value(after, "quart_service_tasks_refused_total", reason="full")
        assert refused - value(before, "quart_service_tasks_refused_total", reason="full") == 1
        # No worker runs here, so the accepted task is still queued.
        assert value(after, "quart_service_task_queue_depth") == 1
        assert value(after, "quart_service_task_queue_limit") == 1
        assert value(after, "quart_service_worker_up") == 0
        assert value(after, "quart_service_redis_up") == 1
        first_age = value(after, "quart_service_task_queue_oldest_age_seconds")
        assert first_age > 0

        async def older(client: Client = client, first_age: float = first_age) -> float:
            age = value(await scrape(client), "quart_service_task_queue_oldest_age_seconds")
            return age if age > first_age else 0.0

        later_age = await until(older, "the queued task grew older")
        assert later_age < 60


async def test_a_blocking_route_is_reported_with_its_stack(
    blocking_client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="service.obs.loopwatch")
    before = value(await scrape(blocking_client), "quart_service_event_loop_blocked_total")
    response = await blocking_client.get("/block", headers={"X-Request-ID": "blocker-1"})
    assert response.status_code == 200
    # On a busy machine the loop can also be held past the threshold elsewhere (a test's
    # setup, a callback): the report that matters is the one whose stack is the handler's.
    reports = [
        r
        for r in caplog.records
        if r.name == "service.obs.loopwatch"
        and "deliberately_blocking_handler" in getattr(r, "stack", "")
    ]
    assert reports, "no blocking reported in the handler"
    report = reports[0]
    assert report.blocked_by == "GET /block (request blocker-1)"  # type: ignore[attr-defined]
    stack: str = report.stack  # type: ignore[attr-defined]
    assert "time.sleep(seconds)" in stack  # the handler's own line
    after = await scrape(blocking_client)
    assert value(after, "quart_service_event_loop_blocked_total") - before >= 1
    assert (
        value(after, "quart_service_event_loop_last_blocked_timestamp_seconds") > time.time() - 60
    )


async def test_the_watchdog_names_the_activity_holding_the_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="service.obs.loopwatch")
    watch = LoopWatch(threshold=0.1)
    await watch.start()
    try:
        # A busy test machine can stall a free loop too; count from here.
        before = watch.blocks

        def crunch() -> None:
            time.sleep(0.5)

        with activity("job demo 42"):
            crunch()

        async def counted() -> bool:
            return watch.blocks >= before + 1

        await until(counted, "the watchdog counted the block")
    finally:
        await watch.stop()
    assert watch.blocks >= before + 1
    reports = [
        r
        for r in caplog.records
        if r.name == "service.obs.loopwatch" and getattr(r, "blocked_by", None) == "job demo 42"
    ]
    assert len(reports) == 1
    assert "in crunch" in reports[0].stack  # type: ignore[attr-defined]


async def test_slow_queries_are_logged_by_name_without_their_values(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="service.slow_query")
    email = "secret.person@example.com"
    async for client in serve(settings.model_copy(update={"slow_query_threshold": 0.0})):
        before = value(
            await scrape(client), "quart_service_db_slow_queries_total", query="find_users_by_email"
        )
        response = await client.get(
            "/users", query_string={"email": email}, headers={"X-Request-ID": "slowq-1"}
        )
        assert response.status_code == 200
        await asyncio.sleep(0)  # asyncpg calls query loggers on the next loop iteration
        after = await scrape(client)
    assert (
        value(after, "quart_service_db_slow_queries_total", query="find_users_by_email") - before
        == 1
    )
    assert (
        value(after, "quart_service_db_query_duration_seconds_count", query="find_users_by_email")
        >= 1
    )
    (record,) = [r for r in caplog.records if getattr(r, "query", "") == "find_users_by_email"]
    assert record.params == 1  # type: ignore[attr-defined]
    assert email not in record.getMessage()
    assert email not in str(record.__dict__)


async def test_fast_queries_are_not_logged_as_slow(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="service.slow_query")
    async for client in serve(settings.model_copy(update={"slow_query_threshold": 30.0})):
        assert (await client.get("/users/1")).status_code == 404
        await asyncio.sleep(0)
    assert not [r for r in caplog.records if r.name == "service.slow_query"]


async def test_the_right_profiling_token_returns_a_profile(profiling_client: Client) -> None:
    response = await profiling_client.get("/users/7", headers={"X-Profile-Token": TOKEN})
    assert response.status_code == 200
    assert response.content_type.startswith("text/html")
    body = await response.get_data(as_text=True)
    assert "pyinstrument" in body.lower()
    assert "get_user" in body  # the profiled handler appears in the profile


async def test_a_wrong_profiling_token_is_served_as_usual_and_reveals_nothing(
    profiling_client: Client, client: Client
) -> None:
    for http, headers in (
        (profiling_client, {"X-Profile-Token": TOKEN[:-1] + "x"}),
        (profiling_client, {}),
        (client, {"X-Profile-Token": TOKEN}),  # profiling not configured at all
    ):
        response = await http.get("/users/7", headers=headers)
        assert response.status_code == 404
        assert response.content_type == PROBLEM_JSON
        text = (await response.get_data(as_text=True)).lower() + str(response.headers).lower()
        assert "profil" not in text
        assert "pyinstrument" not in text


async def test_the_request_id_is_on_every_log_line_of_the_request(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # As in production, the filter runs when the line is emitted, in the request's context.
    caplog.handler.addFilter(RequestIdFilter())
    async for client in serve(settings.model_copy(update={"slow_query_threshold": 0.0})):
        response = await client.get("/users/9", headers={"X-Request-ID": "trace-me-9"})
        assert response.headers["X-Request-ID"] == "trace-me-9"
        await asyncio.sleep(0)
    lines = [r for r in caplog.records if r.name in ("service.request", "service.slow_query")]
    request_lines = [r for r in lines if r.name == "service.request"]
    assert [r.route for r in request_lines] == ["/users/<int:user_id>"]  # type: ignore[attr-defined]
    assert request_lines[0].status == 404  # type: ignore[attr-defined]
    assert any(r.name == "service.slow_query" for r in lines)
    assert {r.request_id for r in lines} == {"trace-me-9"}  # type: ignore[attr-defined]


async def test_a_request_refused_before_its_handler_is_still_logged_with_its_id(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.request")
    caplog.handler.addFilter(RequestIdFilter())
    body = "x" * (70 * 1024)
    response = await client.post(
        "/users",
        data=body,
        headers={
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),  # refused from its declared length, before reading
            "X-Request-ID": "too-big-1",
        },
    )
    assert response.status_code == 413
    (line,) = [r for r in caplog.records if r.name == "service.request"]
    assert (line.status, line.route, line.request_id) == (413, "/users", "too-big-1")  # type: ignore[attr-defined]


async def test_with_keys_only_an_admin_key_is_profiled_and_others_learn_nothing(
    settings: Settings,
) -> None:
    from tests.app.test_auth import bearer, production

    locked = production(settings, profiling_token=TOKEN)
    async for client in serve(locked):
        token = {"X-Profile-Token": TOKEN}
        as_reader = await client.get("/users/7", headers={**token, **bearer("reader")})
        as_all = await client.get("/users/7", headers={**token, **bearer("all")})
    assert as_reader.status_code == 404
    assert as_reader.content_type == PROBLEM_JSON
    assert "profil" not in (await as_reader.get_data(as_text=True)).lower()
    assert as_all.status_code == 200
    assert "pyinstrument" in (await as_all.get_data(as_text=True)).lower()


async def test_cache_hits_misses_and_redis_errors_are_counted(
    client: Client, settings: Settings
) -> None:
    before = await scrape(client)
    assert (await client.get("/expensive-operation")).status_code == 200
    assert (await client.get("/expensive-operation")).status_code == 200
    after = await scrape(client)
    assert (
        value(after, "quart_service_cache_misses_total")
        - value(before, "quart_service_cache_misses_total")
        == 1
    )
    assert (
        value(after, "quart_service_cache_hits_total")
        - value(before, "quart_service_cache_hits_total")
        == 1
    )

    dead = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    async for down in serve(dead):
        errors_before = value(await scrape(down), "quart_service_redis_errors_total")
        assert (await down.get("/expensive-operation")).status_code == 200
        dead_scrape = await scrape(down)
        assert value(dead_scrape, "quart_service_redis_errors_total") > errors_before
        assert value(dead_scrape, "quart_service_redis_up") == 0
        assert "quart_service_task_queue_depth" not in dead_scrape
