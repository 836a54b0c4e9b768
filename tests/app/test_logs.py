"""Log lines: JSON, or one readable line per event at a terminal, as LOG_FORMAT chooses
(service/obs/logs.py). The processes on a real terminal are in tests/e2e/test_log_format.py."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import tomllib
import typing

import pytest

from service.config import ConfigError, Settings, load_settings
from service.obs import logs
from tools import ROOT

# The text line: local time, level, logger, message.
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (INFO|WARNING|ERROR) +[\w.]+: ")


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as a pty does."""

    def isatty(self) -> bool:
        return True


def test_hypercorn_toml_configures_logging_as_logging_config_does() -> None:
    configured = tomllib.loads((ROOT / "hypercorn.toml").read_text())["logconfig_dict"]
    assert configured == logs.logging_config()


@pytest.mark.parametrize(
    ("log_format", "environment", "stream", "chosen"),
    [
        (None, None, Terminal(), "text"),
        (None, None, io.StringIO(), "json"),
        ("auto", "development", Terminal(), "text"),
        ("auto", "production", Terminal(), "json"),
        (None, "production", io.StringIO(), "json"),
        ("json", None, Terminal(), "json"),
        ("text", None, io.StringIO(), "text"),
        # An explicit LOG_FORMAT is the operator's choice, in production too.
        ("text", "production", io.StringIO(), "text"),
    ],
)
def test_log_format_chooses_by_the_setting_then_the_terminal_and_the_environment(
    monkeypatch: pytest.MonkeyPatch,
    log_format: str | None,
    environment: str | None,
    stream: io.StringIO,
    chosen: str,
) -> None:
    for name, value in (("LOG_FORMAT", log_format), ("ENVIRONMENT", environment)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert logs.log_format(stream) == chosen
    handler = logs.LogHandler(stream)
    expected = logs.TextFormatter if chosen == "text" else logs.JsonFormatter
    assert type(handler.formatter) is expected


def test_a_handler_chooses_again_when_its_stream_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LOG_FORMAT", raising=False)
    monkeypatch.delenv("ENVIRONMENT", raising=False)
    handler = logs.LogHandler(Terminal())
    chosen = [type(handler.formatter)]
    handler.setStream(io.StringIO())
    chosen.append(type(handler.formatter))
    assert chosen == [logs.TextFormatter, logs.JsonFormatter]


def test_the_setting_takes_the_values_the_logs_read_and_refuses_others() -> None:
    annotation = Settings.model_fields["log_format"].annotation
    assert typing.get_args(annotation) == logs.LOG_FORMATS
    assert load_settings(log_format="text").log_format == "text"
    with pytest.raises(ConfigError, match="LOG_FORMAT"):
        load_settings(log_format="pretty")


def _text_of(record: logging.LogRecord) -> str:
    logs.RequestIdFilter().filter(record)
    return logs.TextFormatter().format(record)


def test_a_text_line_has_time_level_logger_message_fields_and_request_id() -> None:
    logger = logging.getLogger("service.request")
    fields = {
        "method": "GET",
        "route": "/users/<int:user_id>",
        "client": "127.0.0.1",
        "status": 200,
        "duration_ms": 1.52,
    }
    token = logs.request_id_var.set("0123abcd")
    try:
        request = logger.makeRecord(
            logger.name, logging.INFO, __file__, 1, "request", (), None, extra=fields
        )
        line = _text_of(request)
        other = logger.makeRecord(
            "workers", logging.WARNING, __file__, 1, "job %s: %s", ("x1", "a b"), None
        )
        plain = _text_of(other)
    finally:
        logs.request_id_var.reset(token)
    assert TEXT_LINE.match(line), line
    assert line.endswith(
        "INFO    service.request: GET /users/<int:user_id> 200 1.52 ms client=127.0.0.1 "
        "request_id=0123abcd"
    ), line
    assert "\n" not in line
    assert TEXT_LINE.match(plain), plain
    assert plain.endswith("WARNING workers: job x1: a b request_id=0123abcd"), plain


def test_a_text_line_quotes_values_with_spaces_and_ends_with_the_traceback() -> None:
    logger = logging.getLogger("service.routes.tasks")
    try:
        raise ValueError("n is odd")
    except ValueError:
        record = logger.makeRecord(
            logger.name,
            logging.ERROR,
            __file__,
            1,
            "failed",
            (),
            sys.exc_info(),
            extra={"task_id": "a b", "note": 'said "hi"'},
        )
    text = _text_of(record)
    first, *rest = text.split("\n")
    assert first.endswith('ERROR   service.routes.tasks: failed task_id="a b" note="said \\"hi\\""')
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: n is odd"


def test_hypercorns_access_record_reads_as_a_request_line() -> None:
    atoms = {
        "h": "127.0.0.1:5000",
        "m": "GET",
        "U": "/users/1",
        "q": "email=private",
        "H": "1.1",
        "s": "200",
        "b": "57",
        "D": "1520",
        "{x-request-id}o": "ab12",
    }
    record = logging.getLogger("hypercorn.access").makeRecord(
        "hypercorn.access", logging.INFO, __file__, 1, "%(h)s", (atoms,), None
    )
    text = logs.TextFormatter().format(record)
    assert text.endswith(
        "hypercorn.access: GET /users/1 200 1.52 ms remote_addr=127.0.0.1:5000 protocol=1.1 "
        "bytes=57 request_id=ab12"
    ), text
    assert "private" not in text  # the query string is never logged
    assert json.loads(logs.JsonFormatter().format(record))["path"] == "/users/1"
