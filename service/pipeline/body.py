"""Checks of the request body before any handler reads it, and closing after a refused one."""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable
from typing import Any

from quart import Response, request

from service.contract import BODY_METHODS
from service.errors import APIError
from service.pipeline.state import RequestState, Setup


def _has_body() -> bool:
    return bool(request.content_length) or "chunked" in request.headers.get("Transfer-Encoding", "")


def check(setup: Setup, state: RequestState) -> Awaitable[None] | None:
    """413 for a body over ``MAX_BODY_BYTES``, 415 for one that is not JSON, 400 for bad UTF-8
    or for JSON that is not strict (see :func:`_parse_strictly`).

    A request of a method without a body (GET, DELETE, ...) that declares no length has
    nothing to check: it costs a look at its headers, and no coroutine."""
    if state.request.method not in BODY_METHODS and b"content-length" not in state.raw_headers:
        return None
    return _check(setup)


async def _check(setup: Setup) -> None:
    limit = setup.resources.settings.max_body_bytes
    # Refuse an oversized body from its declared length before reading any of it; a chunked
    # body is cut off at the same limit by Quart while it is read.
    length = request.content_length
    if length is not None and length > limit:
        raise APIError(413, f"The body is over the limit of {limit} bytes.")
    if request.method not in BODY_METHODS:
        return
    if _has_body() and not request.is_json:
        raise APIError(415, "Send the body as JSON (Content-Type: application/json).")
    # Quart decodes a JSON body as UTF-8 and lets a decoding error out as a 500.
    body = await request.get_data()
    if isinstance(body, bytes):
        try:
            text = body.decode()
        except UnicodeDecodeError:
            raise APIError(400, "The body is not valid UTF-8.") from None
        if request.is_json:
            _parse_strictly(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"the key {key!r} is given twice")
            seen.add(key)
    return found


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value")


def _bounded_int(digits: str) -> int:
    limit = sys.get_int_max_str_digits()  # 0: no limit
    if limit and len(digits.lstrip("-")) > limit:
        raise ValueError(f"a number has over {limit} digits")
    return int(digits)


# Arrays and objects nested deeper than this are refused. Python's json module has no limit of
# its own: it stops where the interpreter's recursion does, which moves with the version (3.11
# fails below 1,000 levels, 3.13 parses 5,000), so the answer to one body would depend on the
# Python serving it. The service's own bodies are one level deep.
MAX_JSON_DEPTH = 64


def _nested_deeper_than(text: str, limit: int) -> bool:
    """Whether arrays and objects in the JSON ``text`` nest deeper than ``limit``."""
    if text.count("[") + text.count("{") <= limit:  # every body the service expects stops here
        return False
    depth = 0
    in_string = escaped = False
    for char in text:  # bounded by MAX_BODY_BYTES
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _parse_strictly(text: str) -> None:
    """400 for a body that is not strict JSON, before Quart parses it for the handler.

    Python's json module (which Quart uses) accepts what JSON does not: NaN and Infinity,
    and a repeated key, of which it keeps the last (a proxy or another parser may keep the
    first, so the one body would mean two things). Its errors would reach the client as a
    500 (a RecursionError for deep nesting) or a bare 400 (a ValueError for a number of over
    4300 digits). The body is at most MAX_BODY_BYTES, so parsing it twice costs little.
    """
    if _nested_deeper_than(text, MAX_JSON_DEPTH):
        raise APIError(
            400, f"The body is not valid JSON: it is nested too deeply (over {MAX_JSON_DEPTH})."
        )
    try:
        json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_constant=_not_json,
            parse_int=_bounded_int,
        )
    except RecursionError:
        raise APIError(400, "The body is not valid JSON: it is nested too deeply.") from None
    except ValueError as error:
        raise APIError(400, f"The body is not valid JSON: {error}.") from None


def close_after_refused(setup: Setup, state: RequestState, response: Response) -> Response:
    """``Connection: close`` on an error answered to a request that has a body.

    A body refused before it was read (413, 415, 401, 429, ...) makes Hypercorn close the
    connection rather than read the rest. Saying so in the response keeps a keep-alive client
    from sending its next request into a closing socket and seeing it dropped. (Any error to a
    request with a body closes: the cost is one reconnect, on errors.)
    """
    if response.status_code >= 400 and _has_body():
        response.headers["Connection"] = "close"
    return response
