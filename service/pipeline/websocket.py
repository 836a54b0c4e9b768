"""WebSocket handshakes: served by the pipeline as the HTTP requests they are, and refused.

Hypercorn hands a WebSocket handshake (``GET`` with ``Upgrade: websocket`` and ``Connection:
Upgrade``) to the app as a ``websocket`` scope, which Quart answers without running any
``before_request`` function: no key check, no rate limit, no request id, no header limit, no
log line, and a 405 for a path that has an HTTP route. No route of the service is a WebSocket.

So :func:`handshakes_as_http`, the outermost ASGI wrapper, gives the app each handshake as the
HTTP ``GET`` it is (its scope marked with :data:`HANDSHAKE`) and carries the answer back as the
handshake's HTTP response (ASGI's ``websocket.http.response`` extension, which Hypercorn
offers). Every step runs on it as on any request: the header limit, the request id, the key
and its scope, the rate limit, the log line, the response headers. The step
:func:`refuse_handshake` then refuses a handshake that got that far with 400: the connection
never switches, and Hypercorn closes it after the answer.

A route that wants WebSocket one day needs the handshake passed to Quart as it is, after these
steps have judged it: this module is where that changes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from service.errors import APIError
from service.pipeline.state import RequestState, Setup

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# The key of an HTTP scope that was a WebSocket handshake.
HANDSHAKE = "service.websocket_handshake"
RESPONSE_EXTENSION = "websocket.http.response"
_SCHEMES = {"ws": "http", "wss": "https"}


def _http_scope(scope: dict[str, Any]) -> dict[str, Any]:
    http = {name: value for name, value in scope.items() if name != "subprotocols"}
    http.update(
        type="http",
        method="GET",
        scheme=_SCHEMES.get(scope.get("scheme", "ws"), "http"),
        asgi={"version": "3.0", "spec_version": "2.3"},
        extensions={},
    )
    http[HANDSHAKE] = True
    return http


def _http_receive(receive: Receive) -> Receive:
    """The handshake's events as an HTTP request's: an empty body, then the disconnect."""
    connected = False

    async def http_receive() -> dict[str, Any]:
        nonlocal connected
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return {"type": "http.disconnect"}
            if not connected:  # websocket.connect: the handshake is all there is to read
                connected = True
                return {"type": "http.request", "body": b"", "more_body": False}

    return http_receive


def _handshake_send(send: Send, http1: bool) -> Send:
    """The app's HTTP response, sent as the handshake's (a refusal: never a switch)."""

    async def handshake_send(message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            headers = list(message.get("headers", []))
            if http1 and not any(name.lower() == b"connection" for name, _ in headers):
                # Hypercorn closes an HTTP/1.1 connection after a refused handshake: say so.
                headers.append((b"connection", b"close"))
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": message["status"],
                    "headers": headers,
                }
            )
        elif kind == "http.response.body":
            await send(
                {
                    "type": "websocket.http.response.body",
                    "body": message.get("body", b""),
                    "more_body": message.get("more_body", False),
                }
            )

    return handshake_send


def handshakes_as_http(app: ASGIApp) -> ASGIApp:
    """``app`` given each WebSocket handshake as an HTTP ``GET``, its answer sent back."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await app(scope, receive, send)
        elif RESPONSE_EXTENSION not in scope.get("extensions", {}):
            # A server that cannot carry an HTTP answer: closing before accepting refuses
            # the handshake (ASGI: the server answers 403).
            await receive()
            await send({"type": "websocket.close", "code": 1008})
        else:
            http1 = str(scope.get("http_version", "1.1")).startswith("1")
            await app(_http_scope(scope), _http_receive(receive), _handshake_send(send, http1))

    return wrapped


def refuse_handshake(setup: Setup, state: RequestState) -> None:
    """400 for a WebSocket handshake that every earlier step let by: no route is a WebSocket."""
    if HANDSHAKE in state.request.scope:
        raise APIError(
            400, "No route of this service is a WebSocket; send the request without Upgrade."
        )
