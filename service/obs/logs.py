"""JSON log lines, each carrying the id of the request it belongs to.

The request id lives in a context variable set by one of the request pipeline's first steps
(``service/pipeline/request_id.py``), before any step that may log; a logging filter copies it
onto every record, so any line logged while serving that request, from any module, names it.
Hypercorn's access and error logs use the same formatter through ``logconfig_dict`` in
``hypercorn.toml`` (its access records carry the response's ``X-Request-ID`` header, which the
app echoes).
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
import time
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from service.obs import tracing

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

# LogRecord's own attributes; anything else on a record came from ``extra=`` and is logged.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "request_id", "taskName"}
)


class RequestIdFilter(logging.Filter):
    """Puts the current request's id (or None) on every record, and while tracing is on the
    current span's ``trace_id`` and ``span_id``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if tracing.TRACER is not None:
            ids = tracing.current_ids()
            if ids is not None:
                record.trace_id, record.span_id = ids
        return True


def _access_fields(atoms: Mapping[str, Any]) -> dict[str, Any]:
    """Hypercorn's access-log atoms, minus the query string and request headers (which may
    carry credentials): the path only, as the app's own request line logs the route."""
    duration_us = atoms.get("D")
    return {
        "remote_addr": atoms.get("h"),
        "method": atoms.get("m"),
        "path": atoms.get("U"),
        "protocol": atoms.get("H"),
        "status": int(atoms["s"]) if str(atoms.get("s", "")).isdigit() else atoms.get("s"),
        "bytes": atoms.get("b"),
        "duration_ms": round(int(duration_us) / 1000, 3) if duration_us else None,
        "request_id": atoms.get("{x-request-id}o") or None,
    }


# The last whole second formatted and its text, swapped as one tuple (threads log too).
_second: tuple[int, str] = (-1, "")


def _timestamp(created: float) -> str:
    """ISO 8601 in UTC with milliseconds, as ``datetime.isoformat(timespec="milliseconds")``
    writes it; the part up to the second is formatted once per second, not once per line."""
    whole = int(created)
    # Rounded to the microsecond first, as datetime does, then cut to the millisecond.
    micros = round((created - whole) * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    global _second
    seen, text = _second
    if seen != whole:
        text = datetime.fromtimestamp(whole, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second = (whole, text)
    return f"{text}.{micros // 1000:03d}+00:00"


# One encoder for every line: json.dumps(entry, default=str).
_encode_line = json.JSONEncoder(default=str).encode


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, and any extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
        }
        if record.name == "hypercorn.access" and isinstance(record.args, Mapping):
            entry["message"] = "access"
            entry.update(_access_fields(record.args))
        else:
            entry["message"] = record.getMessage()
            entry["request_id"] = getattr(record, "request_id", None)
            for key, value in record.__dict__.items():
                if key not in _STANDARD and not key.startswith("_"):
                    entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _encode_line(entry)


class DirectLines:
    """INFO lines of one logger, written straight to its handlers' streams when those are the
    JSON stream handlers this module configures (:func:`logging_config`, ``hypercorn.toml``).

    The line is exactly the one logging would write (the same fields in the same order, by the
    same encoder), without a ``LogRecord`` built and passed down the handler chain for it: for
    a line written on every request, that chain costs more than the rest of the line (about 7%
    of a users lookup, bench/README.md). The handlers are looked up on every line, so a change
    of configuration (a test's capture handler, an operator's ``logconfig_dict``) applies at
    once: with any other handler, formatter, filter or level, or while tracing is on (the
    filter then adds the trace's ids), the line goes through logging as usual.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def _handlers(self) -> list[logging.StreamHandler[Any]] | None:
        handlers: list[logging.StreamHandler[Any]] = []
        current: logging.Logger | None = self.logger
        while current is not None:
            if current.filters:
                return None
            for handler in current.handlers:
                if (
                    type(handler) is not logging.StreamHandler
                    or type(handler.formatter) is not JsonFormatter
                    or handler.level > logging.INFO
                    or any(type(each) is not RequestIdFilter for each in handler.filters)
                ):
                    return None
                handlers.append(handler)
            current = current.parent if current.propagate else None
        return handlers or None  # none at all: logging's last resort decides

    def _record(
        self, message: str, fields: dict[str, Any], origin: tuple[str, int, str]
    ) -> logging.LogRecord:
        path, line, func = origin
        return self.logger.makeRecord(
            self.logger.name, logging.INFO, path, line, message, (), None, func, fields
        )

    def info(self, message: str, fields: dict[str, Any], origin: tuple[str, int, str]) -> None:
        """Log ``message`` with the extra ``fields`` at INFO, as ``logger.info(message,
        extra=fields)`` would from ``origin`` (the caller's file, line and function)."""
        handlers = self._handlers() if tracing.TRACER is None else None
        if handlers is None:
            self.logger.handle(self._record(message, fields, origin))
            return
        entry: dict[str, Any] = {
            "ts": _timestamp(time.time()),
            "level": "INFO",
            "logger": self.logger.name,
            "pid": os.getpid() if logging.logProcesses else None,
            "message": message,
            "request_id": request_id_var.get(),
        }
        entry.update(fields)
        text = _encode_line(entry)
        for handler in handlers:
            handler.acquire()
            try:
                handler.stream.write(text + handler.terminator)
                handler.flush()
            except Exception:
                handler.handleError(self._record(message, fields, origin))
            finally:
                handler.release()


def logging_config(level: str = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dictionary: everything as JSON, stdout for access lines,
    stderr for the rest. ``hypercorn.toml`` holds the same, for Hypercorn's own loggers."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": "service.obs.logs.RequestIdFilter"}},
        "formatters": {"json": {"()": "service.obs.logs.JsonFormatter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "json",
                "filters": ["request_id"],
            },
            "stdout": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
                "formatter": "json",
                "filters": ["request_id"],
            },
        },
        "loggers": {
            "hypercorn.access": {"handlers": ["stdout"], "level": "INFO", "propagate": False},
            "hypercorn.error": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        },
        "root": {"handlers": ["stderr"], "level": level},
    }


def capture_warnings() -> None:
    """Python's warnings as log records (logger ``py.warnings``, level WARNING), so that they
    come out as JSON lines like every other line, not as bare text on stderr."""
    logging.captureWarnings(True)


def configure_logging(level: str = "INFO") -> None:
    """JSON logging for a process that is not started by Hypercorn (the worker, commands)."""
    logging.config.dictConfig(logging_config(level))
    capture_warnings()
