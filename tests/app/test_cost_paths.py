"""The cheaper path of the request log line (issue 13) writes exactly what logging's own path
writes."""

from __future__ import annotations

import io
import json
import logging
import logging.config
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from service.app import create_app
from service.config import Settings
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


def test_the_app_answers_json_as_quart_would(settings: Settings) -> None:
    app = create_app(settings)
    # quart-schema's own: pydantic models, dates as HTTP dates
    default = getattr(type(app.json), "default")  # noqa: B009 (absent from JSONProvider's type)
    value = {"b": 1, "a": [{"é": 2.5}], "when": datetime(2026, 1, 2, tzinfo=UTC)}
    expected = json.dumps(value, default=default, separators=(",", ":"), sort_keys=True)
    assert app.json.dumps(value, separators=(",", ":")) == expected
    assert expected.startswith('{"a":[{"\\u00e9":2.5}],"b":1,')
    # Any other form goes through quart-schema's own provider.
    assert app.json.dumps(value, indent=2) == json.dumps(
        value, default=default, indent=2, sort_keys=True
    )
