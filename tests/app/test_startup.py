"""A failed start, in the process: one line naming the variable, no traceback for a dependency
that refuses, and the failure still reported to the server (tests/deploy/test_failfast.py
runs the real Hypercorn, where it becomes the exit code)."""

from __future__ import annotations

import logging

import pytest
from quart.testing.app import LifespanError

from service.app import create_app
from service.config import Settings
from tools.private_servers import free_port


def startup_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.levelno >= logging.ERROR]


async def test_postgres_refusing_the_pool_is_one_line_naming_the_variable(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    dead = settings.model_copy(
        update={"database_url": f"postgresql://app:s3cret-pw@127.0.0.1:{port}/app"}
    )
    with pytest.raises(LifespanError, match="DATABASE_URL"):
        async with create_app(dead).test_app():
            pass
    (line,) = startup_lines(caplog)
    assert line.name == "service.startup"
    assert line.getMessage().startswith(
        f"not starting: DATABASE_URL: cannot connect to PostgreSQL at 127.0.0.1:{port}/app "
        "(ConnectionRefusedError: "
    )
    assert line.exc_info is None
    assert "s3cret-pw" not in caplog.text


async def test_a_failing_hook_that_is_a_bug_keeps_its_traceback(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings)

    @app.before_serving
    async def broken() -> None:
        raise KeyError("oops")

    with pytest.raises(LifespanError):
        async with app.test_app():
            pass
    quart_line, ours = startup_lines(caplog)
    assert quart_line.exc_info is not None  # Quart's own, with the traceback
    assert ours.getMessage() == (
        "not starting: a start-up hook failed (KeyError); its traceback is logged above"
    )
