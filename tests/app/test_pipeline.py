"""The request pipeline: its declared order is the order that runs, and every line logged
while a request runs carries the request's id."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import SecretStr
from quart import Quart, Response

from service import pipeline
from service.app import create_app
from service.backends.cache import Cache
from service.backends.errors import NotServing
from service.config import Settings
from service.errors import register_error_handlers
from service.framework import resources
from service.obs import tracing
from service.obs.logs import RequestIdFilter
from service.pipeline import STEPS, After, Before, RequestState, Setup, Step, Teardown
from tests.app.test_auth import bearer, production
from tools.private_servers import free_port

TOKEN = "a-long-profiling-token-0123456789"


def everything_on(settings: Settings, **changes: object) -> Settings:
    """Keys, rate limits, CORS and profiling all configured: every step is installed."""
    return production(
        settings,
        rate_limit_read=100,
        cors_allow_origins="https://app.example.com",
        profiling_token=SecretStr(TOKEN),
        **changes,
    )


def recorded(steps: Iterable[Step], ran: list[str]) -> list[Step]:
    """The steps, each noting its name in ``ran`` before it runs."""

    def before(step: Before | Teardown) -> Before | Teardown:
        async def run(setup: Setup, state: RequestState) -> None:
            ran.append(step.name)
            waiting = step.run(setup, state)
            if waiting is not None:
                await waiting

        return dataclasses.replace(step, run=run)

    def after(step: After) -> After:
        async def run(setup: Setup, state: RequestState, response: Response) -> Response:
            ran.append(step.name)
            result = step.run(setup, state, response)
            return result if isinstance(result, Response) else await result

        return dataclasses.replace(step, run=run)

    return [after(step) if isinstance(step, After) else before(step) for step in steps]


async def test_the_steps_run_in_the_order_the_list_declares(
    spans: InMemorySpanExporter, settings: Settings
) -> None:
    config = everything_on(settings)
    ran: list[str] = []
    app = Quart(__name__)
    register_error_handlers(app)
    installed = pipeline.install(app, resources.install(app, config), recorded(STEPS, ran))

    @app.get("/here")
    async def here() -> dict[str, bool]:
        ran.append("handler")
        return {"here": True}

    # A hook registered later runs after every before step and before every after step.
    @app.before_request
    async def later_before() -> None:
        ran.append("later before hook")

    @app.after_request
    async def later_after(response: Response) -> Response:
        ran.append("later after hook")
        return response

    async with app.test_app() as test_app:
        response = await test_app.test_client().get(
            "/here",
            headers={
                **bearer("all"),
                "Origin": "https://app.example.com",
                "X-Profile-Token": TOKEN,
                "X-Request-ID": "ordered-1",
            },
        )
    assert "pyinstrument" in (await response.get_data(as_text=True)).lower()
    assert response.headers["X-Request-ID"] == "ordered-1"
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert response.headers["Cache-Control"] == "no-store"
    assert "RateLimit" in response.headers

    names = [step.name for step in STEPS]
    assert [step.name for step in installed.steps] == names  # all on: none left out
    before = [step.name for step in STEPS if isinstance(step, Before)]
    after = [step.name for step in STEPS if isinstance(step, After)]
    teardown = [step.name for step in STEPS if isinstance(step, Teardown)]
    expected = [*before, "later before hook", "handler", "later after hook", *after, *teardown]
    assert ran == expected


def installed_by(hook: object) -> pipeline.Pipeline:
    owner = getattr(hook, "__self__", None)
    assert isinstance(owner, pipeline.Pipeline), hook
    return owner


def test_the_app_installs_the_declared_steps_as_one_hook_of_each_kind(
    spans: InMemorySpanExporter, settings: Settings
) -> None:
    app = create_app(everything_on(settings))
    (before,) = app.before_request_funcs[None]
    # quart-cors's own function, registered first so that it runs after the pipeline's.
    cors, after = app.after_request_funcs[None]
    assert getattr(cors, "func", None).__module__ == "quart_cors"
    (teardown,) = app.teardown_request_funcs[None]
    installed = installed_by(before)
    assert installed_by(after) is installed is installed_by(teardown)
    assert installed.steps == STEPS
    # A step a setting switches off is not installed at all; so are the tracing steps while
    # no OTEL_* variable asks for traces.
    tracing.stop()
    plain = create_app(settings)
    left_out = {step.name for step in STEPS} - {
        step.name for step in installed_by(plain.before_request_funcs[None][0]).steps
    }
    assert left_out == {
        "rate limit",
        "key verdict",
        "profiling",
        "profile",
        "profiler stop",
        "trace span",
        "trace span name and status",
        "trace span end",
    }
    assert not plain.teardown_request_funcs.get(None)
    assert len(plain.after_request_funcs[None]) == 1  # no CORS origin: no CORS function


async def test_a_line_the_rate_limiter_logs_carries_the_request_id(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # Redis does not answer: the limiter logs that it limits on its own, during the request.
    dead = production(settings, rate_limit_read=3, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    caplog.set_level(logging.WARNING, logger="service.pipeline.ratelimit")
    # As in production, the filter runs when the line is emitted, in the request's context.
    caplog.handler.addFilter(RequestIdFilter())
    async with create_app(dead).test_app() as test_app:
        response = await test_app.test_client().get(
            "/users", headers={**bearer("reader"), "X-Request-ID": "limited-7"}
        )
    assert response.status_code == 200
    (line,) = [r for r in caplog.records if r.name == "service.pipeline.ratelimit"]
    assert "each process limits on its own" in line.getMessage()
    assert line.request_id == "limited-7"  # type: ignore[attr-defined]


async def test_the_report_cache_opens_with_the_other_resources(settings: Settings) -> None:
    app = create_app(settings)
    held = resources.resources(app)
    assert not held.serving
    with pytest.raises(NotServing):
        held.report_cache  # noqa: B018
    async with app.test_app():
        # Before any request: open with the pool, Redis and the task queue.
        assert isinstance(held.report_cache, Cache)
        assert held.task_queue.redis is held.redis
    assert not held.serving
