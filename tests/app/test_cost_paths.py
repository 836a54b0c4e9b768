"""The cheaper paths of the request (issue 13) behave exactly as the library paths they
replace: the request log line, the JSON body encoder, and the ASGI connection."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import logging.config
from collections.abc import Iterator
from typing import Any

import pytest
from quart import Quart, Response

from service.app import create_app
from service.asgi import HTTPConnection
from service.config import Settings
from service.jsonenc import compact_encoder
from service.obs import logs

FIELDS = {
    "method": "GET",
    "route": "/users",
    "client": "127.0.0.1",
    "status": 200,
    "duration_ms": 1.5,
}


@pytest.fixture
def configured() -> Iterator[io.StringIO]:
    """Logging as hypercorn.toml configures it, the root's JSON handler writing to a buffer."""
    saved = logging.getLogger().handlers[:], logging.getLogger().level
    logging.config.dictConfig(logs.logging_config())
    buffer = io.StringIO()
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)
    yield buffer
    root = logging.getLogger()
    root.handlers[:], root.level = saved


def _fields(line: str) -> list[tuple[str, Any]]:
    entry = json.loads(line)
    entry.pop("ts")
    return list(entry.items())


def test_the_direct_line_is_the_line_logging_writes(configured: io.StringIO) -> None:
    logger = logging.getLogger("service.request")
    lines = logs.DirectLines(logger)
    token = logs.request_id_var.set("0123abcd")
    try:
        lines.info("request", dict(FIELDS), (__file__, 1, "here"))
        # With a filter on the logger, the line goes through logging's own chain.
        logger.addFilter(lambda record: True)
        try:
            lines.info("request", dict(FIELDS), (__file__, 1, "here"))
        finally:
            logger.filters.clear()
    finally:
        logs.request_id_var.reset(token)
    direct, through_logging = configured.getvalue().splitlines()
    assert _fields(direct) == _fields(through_logging)
    assert _fields(direct)[:6] == [
        ("level", "INFO"),
        ("logger", "service.request"),
        ("pid", json.loads(through_logging)["pid"]),
        ("message", "request"),
        ("request_id", "0123abcd"),
        ("method", "GET"),
    ]


def test_another_handler_gets_the_line_through_logging(
    configured: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("service.request")
    with caplog.at_level(logging.INFO, logger="service.request"):
        logs.DirectLines(logger).info("request", dict(FIELDS), (__file__, 7, "there"))
    (record,) = [r for r in caplog.records if r.name == "service.request"]
    assert record.getMessage() == "request"
    assert (record.pathname, record.lineno, record.funcName) == (__file__, 7, "there")
    assert record.__dict__["route"] == "/users"
    assert len(configured.getvalue().splitlines()) == 1  # and once to the JSON handler


@pytest.mark.parametrize(
    "value",
    [
        {"users": [{"id": 1, "email": "é@example.com", "name": "Zoë \u2028"}], "next": None},
        {"b": [1.5, -0.0, 10**30, True, None], "a": {"z": '\x00\n"', "y": []}},
        [],
        "text",
    ],
)
def test_the_compact_encoder_writes_what_json_dumps_writes(value: Any) -> None:
    dumps = compact_encoder(str, (",", ":"), sort_keys=True)
    assert dumps(value) == json.dumps(value, default=str, separators=(",", ":"), sort_keys=True)
    spaced = compact_encoder(str, (", ", ": "))
    assert spaced(value) == json.dumps(value, default=str)


def test_the_app_answers_json_as_quart_would(settings: Settings) -> None:
    app = create_app(settings)
    value = {"b": 1, "a": [{"é": 2.5}]}
    assert app.json.dumps(value, separators=(",", ":")) == '{"a":[{"\\u00e9":2.5}],"b":1}'
    # Any other form goes through Quart's own provider.
    assert app.json.dumps(value, indent=2) == json.dumps(value, indent=2, sort_keys=True)


def _scope(path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }


def _small_app() -> tuple[Quart, dict[str, Any]]:
    app = Quart(__name__)
    app.asgi_http_class = HTTPConnection
    seen: dict[str, Any] = {}

    @app.get("/slow")
    async def slow() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen["cancelled"] = True
            raise
        return "late"

    @app.get("/small")
    async def small() -> dict[str, str]:
        return {"a": "b"}

    @app.get("/stream")
    async def stream() -> Response:
        async def parts() -> Any:
            for part in (b"one ", b"two ", b"three"):
                yield part

        return Response(parts(), content_type="text/plain")

    return app, seen


async def _call(app: Quart, path: str, disconnect: asyncio.Event | None = None) -> list[Any]:
    sent: list[Any] = []
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"", "more_body": False}
        if disconnect is None:
            await asyncio.Event().wait()
        else:
            await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(_scope(path), receive, send)  # type: ignore[arg-type]
    return sent


async def test_a_body_in_memory_is_one_message_marked_last() -> None:
    app, _ = _small_app()
    sent = await _call(app, "/small")
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200
    assert json.loads(sent[1]["body"]) == {"a": "b"}
    assert sent[1]["more_body"] is False


async def test_a_streamed_body_is_sent_as_it_comes() -> None:
    app, _ = _small_app()
    sent = await _call(app, "/stream")
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert b"".join(m["body"] for m in bodies) == b"one two three"
    assert len(bodies) == 4
    assert bodies[-1]["more_body"] is False


async def test_a_client_that_leaves_cancels_the_handler_and_the_call_ends_quietly() -> None:
    app, seen = _small_app()
    gone = asyncio.Event()
    call = asyncio.ensure_future(_call(app, "/slow", gone))
    await asyncio.sleep(0.2)
    gone.set()
    sent = await asyncio.wait_for(call, 5)  # no exception out of the app, no hang
    assert seen == {"cancelled": True}
    assert not any(m["type"] == "http.response.start" for m in sent)
    assert not call.cancelled()


async def test_a_cancellation_from_the_server_still_cancels_the_call() -> None:
    app, seen = _small_app()
    call = asyncio.ensure_future(_call(app, "/slow"))
    await asyncio.sleep(0.2)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert seen == {"cancelled": True}
