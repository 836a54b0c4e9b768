"""Quart's ASGI HTTP connection with the same behaviour and fewer tasks per request.

Quart (0.20-0.22) serves each HTTP request with two new tasks, one running the app and one
reading the ASGI messages, waits for the first of them with ``asyncio.wait``, cancels and
gathers the other, and then sends the response inside ``asyncio.wait_for``, which on Python
3.11 is a third task. It sends a body as two messages, the data and then an empty last
one. For a users lookup that is about a tenth of the CPU the whole app spends per request
(bench/README.md).

:class:`HTTPConnection` keeps what that design is for and drops the rest:

- the app runs in the task the server gave the request; one task reads the messages: it feeds
  the body and, when the client goes away (``http.disconnect``), cancels the app's work, as
  Quart does. A request cancelled that way ends quietly, like Quart's;
- the response is sent within ``RESPONSE_TIMEOUT`` (or the response's own timeout) by
  ``asyncio.timeout``, which needs no task;
- a body held in memory (every JSON answer here) goes out in one message marked as the last;
  a streamed body is sent as Quart sends it.

It is installed through Quart's ``asgi_http_class``, the documented way to change how the app
speaks ASGI; tests/app/test_pins.py holds the Quart version this was checked against.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from quart.asgi import ASGIHTTPConnection
from quart.utils import encode_headers
from quart.wrappers import Request, Response
from quart.wrappers.response import DataBody


class HTTPConnection(ASGIHTTPConnection):
    """One HTTP request, served in the server's task (see the module's docstring)."""

    async def __call__(self, receive: Any, send: Any) -> None:
        request = self._create_request_from_scope(send)
        app_task = asyncio.current_task()
        assert app_task is not None
        gone = False

        async def read_messages() -> None:
            nonlocal gone
            await self.handle_messages(request, receive)
            # The client disconnected before the response was complete: stop serving it.
            gone = True
            app_task.cancel()

        receiver = asyncio.ensure_future(read_messages())
        try:
            await self.handle_request(request, send)
        except asyncio.CancelledError:
            if not gone:
                raise
            # Cancelled by the receiver for a client that left: ends here, as in Quart.
            app_task.uncancel()
        finally:
            if not receiver.done():
                receiver.cancel()
                # Let it end now (it is waiting on `receive`), so no task outlives the request.
                await asyncio.gather(receiver, return_exceptions=True)
            elif not receiver.cancelled() and (error := receiver.exception()) is not None:
                raise error

    async def handle_request(self, request: Request, send: Any) -> None:
        try:
            response = await self.app.handle_request(request)
        except Exception as error:
            if not (self.app.debug or self.app.testing):
                raise
            from quart.debug import traceback_response

            response = await traceback_response(error)
        if isinstance(response, Response) and response.timeout != Ellipsis:
            timeout = cast(float | None, response.timeout)
        else:
            timeout = self.app.config["RESPONSE_TIMEOUT"]
        try:
            async with asyncio.timeout(timeout):
                await self._send_response(send, response)
        except TimeoutError:
            pass

    async def _send_response(self, send: Any, response: Any) -> None:
        body = getattr(response, "response", None)
        if type(body) is not DataBody:
            await super()._send_response(send, response)
            return
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": encode_headers(response.headers),
            }
        )
        await send(
            {
                "type": "http.response.body",
                "body": body.data[body.begin : body.end],
                "more_body": False,
            }
        )
