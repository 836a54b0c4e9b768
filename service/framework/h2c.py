"""HTTP/2 without TLS (h2c): off unless ``HTTP2_CLEARTEXT`` turns it on.

Hypercorn 0.18 turns a cleartext connection into HTTP/2 in two ways, both before the app sees
anything: a request carrying ``Upgrade: h2c`` gets ``101 Switching Protocols`` at once (with no
``Connection: Upgrade`` or ``HTTP2-Settings`` needed, and whatever key it carries), and a
connection that opens with HTTP/2's preface (``PRI * HTTP/2.0``, "prior knowledge") is served
as HTTP/2 from its first byte. Its HTTP/2 code then has faults any client can reach without a
key (docs/security.md): a DATA frame on a stream already answered raises ``KeyError``, drops the
connection without GOAWAY, answers a request waiting on the same connection with a bare 500,
and leaves a task that SIGTERM no longer ends (pgjones/hypercorn#312, #334 and #365 carry the
fix; none is in 0.18.0, the latest release); PRIORITY frames for over 1,000 streams, a
``CONNECT`` without ``:path`` and a malformed ``HTTP2-Settings`` each end in a traceback.

Hypercorn has no setting for either switch (``alpn_protocols`` only says what TLS offers), and
the app cannot refuse them: the switch happens before any ASGI call. Both are decided in one
method of its HTTP/1.1 protocol, ``H11Protocol._check_protocol``, called with each request's
head before the request reaches the app; it answers 101 or raises the exceptions that make the
connection HTTP/2. :func:`install` replaces that method, while the app serves, by one that
decides nothing: every cleartext connection then stays HTTP/1.1. An ``Upgrade: h2c`` is ignored,
as RFC 9110 section 7.8 allows, and the request is answered in HTTP/1.1 by the whole pipeline;
the preface arrives at the app as a request ``PRI *`` of version ``2.0``, which the pipeline
refuses with 400 and ``Connection: close`` (service/pipeline/framing.py). HTTP/2 over TLS
(ALPN ``h2``, when Hypercorn is given a certificate) does not pass through this method and stays.

This is a private part of Hypercorn: listed in docs/dependencies.md, bounded in pyproject.toml,
and guarded by tests/app/test_pins.py, which serves the app with Hypercorn itself and fails
when a release switches to HTTP/2 anywhere else. :func:`install` also refuses to start when the
method is gone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.protocol.h11 import H11Protocol
from quart import Quart

# The method of Hypercorn's HTTP/1.1 protocol that decides whether a connection becomes h2c.
HOOK = "_check_protocol"

CheckProtocol = Callable[[Any, Any], Awaitable[None]]


async def _stay_http1(protocol: Any, request: Any) -> None:
    """Decide nothing: the request is served on the connection's HTTP/1.1, as it came."""


class _Switch:
    """Holds Hypercorn's own method while the app serves with it replaced."""

    def __init__(self) -> None:
        self.original: CheckProtocol | None = None

    async def start(self) -> None:
        original = getattr(H11Protocol, HOOK, None)
        if original is None:
            # A Hypercorn release without the method: serving on would quietly let h2c in.
            raise RuntimeError(
                f"hypercorn.protocol.h11.H11Protocol.{HOOK} is gone: h2c cannot be turned "
                "off on this Hypercorn (docs/dependencies.md); set HTTP2_CLEARTEXT=true to "
                "serve it anyway, or install the Hypercorn that pyproject.toml allows"
            )
        if original is not _stay_http1:
            self.original = original
            setattr(H11Protocol, HOOK, _stay_http1)

    async def stop(self) -> None:
        if self.original is not None:
            setattr(H11Protocol, HOOK, self.original)
            self.original = None


def install(app: Quart, cleartext_http2: bool) -> None:
    """Keep cleartext connections HTTP/1.1 while ``app`` serves, unless ``cleartext_http2``.

    Done in the serving hooks, so only a process that serves the app (a Hypercorn worker)
    changes Hypercorn, and only for as long as it serves; Hypercorn accepts no connection
    before the app's start-up has finished."""
    if cleartext_http2:
        return
    switch = _Switch()
    app.before_serving(switch.start)
    app.after_serving(switch.stop)
