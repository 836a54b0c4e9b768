"""Log lines, each carrying the id of the request it belongs to: JSON for machines, or one
readable line per event for a person at a terminal.

The request id lives in a context variable set by one of the request pipeline's first steps
(``service/pipeline/request_id.py``), before any step that may log; a logging filter copies it
onto every record, so any line logged while serving that request, from any module, names it.
Hypercorn's access and error logs use the same handlers through ``logconfig_dict`` in
``hypercorn.toml`` (its access records carry the response's ``X-Request-ID`` header, which the
app echoes).

``LOG_FORMAT`` chooses the format: ``json``, ``text``, or ``auto`` (the default), which is text
when the line goes to a terminal outside production, and JSON otherwise (piped, in a file, in a
container's log, and always with ``ENVIRONMENT=production`` unless ``LOG_FORMAT=text`` says
otherwise). Logging is set up before the settings are read (so that a bad setting is itself
logged), so the two variables are read here from the environment; ``Settings.log_format``
validates the same variable, and a bad value stops the start naming it.
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
from typing import IO, Any, Literal

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


# The values of LOG_FORMAT (service/config.py's ``log_format`` takes the same).
LOG_FORMATS = ("auto", "json", "text")


def log_format(stream: IO[str] | None) -> Literal["json", "text"]:
    """The format of lines written to ``stream``, as ``LOG_FORMAT`` and ``ENVIRONMENT`` choose
    (see the module's docstring)."""
    # Exactly as the settings accept them: another value stops the start (Settings.log_format).
    wanted = os.environ.get("LOG_FORMAT", "auto")
    if wanted == "json":
        return "json"
    if wanted == "text":
        return "text"
    if os.environ.get("ENVIRONMENT") == "production":
        return "json"
    try:
        terminal = stream is not None and stream.isatty()
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        terminal = False
    return "text" if terminal else "json"


class TextFormatter(logging.Formatter):
    """One readable line per event: local time, level, logger, message, the record's extra
    fields as ``key=value``, and the request id; a traceback follows on its own lines. A
    request line (the app's, or Hypercorn's access line) reads as servers print theirs:
    ``GET /users/<int:user_id> 200 1.52 ms``."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "hypercorn.access" and isinstance(record.args, Mapping):
            fields = _access_fields(record.args)
            fields["route"] = fields.pop("path")
            message = ""
        else:
            message = record.getMessage()
            fields = {
                key: value
                for key, value in record.__dict__.items()
                if key not in _STANDARD and not key.startswith("_")
            }
            fields["request_id"] = getattr(record, "request_id", None)
        summary = _request_summary(fields)
        if summary:
            message = summary if message in ("", "request") else f"{message} {summary}"
        stamp = datetime.fromtimestamp(record.created).strftime("%Y-%m-%d %H:%M:%S")
        line = f"{stamp}.{int(record.msecs):03d} {record.levelname:<7} {record.name}: {message}"
        request_id = fields.pop("request_id", None)
        fields["request_id"] = request_id  # last, where the eye finds it
        line += "".join(
            f" {key}={_text(value)}" for key, value in fields.items() if value is not None
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _request_summary(fields: dict[str, Any]) -> str:
    """``METHOD route status duration`` out of a request line's fields (taken from them), or
    "" for any other line."""
    if not {"method", "route", "status"} <= fields.keys():
        return ""
    parts = [fields.pop("method"), fields.pop("route"), fields.pop("status")]
    duration = fields.pop("duration_ms", None)
    if duration is not None:
        parts.append(f"{duration} ms")
    return " ".join(str(part) for part in parts)


def _text(value: Any) -> str:
    """A field's value as a person reads it: quoted when it has spaces, quotes or ``=``."""
    text = value if isinstance(value, str) else _encode_line(value)
    if not text or any(character in text for character in ' "='):
        return _encode_line(text)
    return text


class LogHandler(logging.StreamHandler[Any]):
    """A stream handler that writes JSON or text lines, as ``LOG_FORMAT`` and its stream
    choose (:func:`log_format`); chosen again when its stream is replaced."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__(stream)
        self._choose()

    def setStream(self, stream: Any) -> Any:
        previous = super().setStream(stream)
        self._choose()
        return previous

    def _choose(self) -> None:
        text = log_format(self.stream) == "text"
        self.setFormatter(TextFormatter() if text else JsonFormatter())


class DirectLines:
    """INFO lines of one logger, written straight to its handlers' streams when those are the
    stream handlers this module configures (:func:`logging_config`, ``hypercorn.toml``) and
    write JSON.

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
                    not isinstance(handler, logging.StreamHandler)
                    or type(handler) not in (LogHandler, logging.StreamHandler)
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
    """A ``logging.config.dictConfig`` dictionary: access lines on stdout, the rest on stderr,
    each as ``LOG_FORMAT`` chooses (:class:`LogHandler`). ``hypercorn.toml`` holds the same, for
    Hypercorn's own loggers (tests/app/test_logs.py keeps the two equal)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": "service.obs.logs.RequestIdFilter"}},
        "handlers": {
            "stderr": {
                "class": "service.obs.logs.LogHandler",
                "stream": "ext://sys.stderr",
                "filters": ["request_id"],
            },
            "stdout": {
                "class": "service.obs.logs.LogHandler",
                "stream": "ext://sys.stdout",
                "filters": ["request_id"],
            },
        },
        "loggers": {
            "hypercorn.access": {"handlers": ["stdout"], "level": "INFO", "propagate": False},
            "hypercorn.error": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        },
        "root": {"handlers": ["stderr"], "level": level},
    }


def configure_logging(level: str = "INFO") -> None:
    """Logging for a process that is not started by Hypercorn (the worker, commands)."""
    logging.config.dictConfig(logging_config(level))
