"""The request header limit (``MAX_HEADER_BYTES``), enforced the same over HTTP/1.1 and HTTP/2.

Hypercorn's own settings do not enforce it: ``h11_max_incomplete_size`` only bounds a head
that arrives in pieces (Hypercorn reads 64 KiB at a time, so a larger head in one read passes;
hypercorn.toml sets it to 64 KiB, so that every head under that reaches this check however it
arrived), and ``h2_max_header_list_size`` is only advertised to the client, never checked. So
the app counts what it is given, before Quart builds a request: the request target plus every
header name and value. Over the limit the answer is ``431`` problem+json.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from itertools import chain
from typing import Any

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]

PROBLEM_JSON = b"application/problem+json"


def header_bytes(scope: dict[str, Any]) -> int:
    """The request target plus all header names and values, in bytes."""
    size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    # Summed in C (every name and value, flattened): this runs on every request.
    return size + sum(map(len, chain.from_iterable(scope["headers"])))


def limit_headers(app: ASGIApp, max_bytes: int) -> ASGIApp:
    """``app`` refusing HTTP requests whose headers are over ``max_bytes`` with a 431."""
    body = json.dumps(
        {
            "type": "about:blank",
            "title": "Request Header Fields Too Large",
            "status": 431,
            "detail": f"The request target and headers are over the limit of {max_bytes} bytes.",
        }
    ).encode()

    async def limited(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or header_bytes(scope) <= max_bytes:
            await app(scope, receive, send)
            return
        headers = [
            (b"content-type", PROBLEM_JSON),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            (b"x-content-type-options", b"nosniff"),
        ]
        if scope.get("http_version", "1.1").startswith("1"):
            # The body, if any, is not read: the connection cannot be reused.
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 431, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return limited
