"""Requests an intermediary could frame otherwise than this server: refused, connection closed.

Hypercorn's HTTP/1.1 parser (h11) answers most framing faults itself (two Content-Length values,
a bad chunk, an unknown transfer coding: a bare 400 and a closed connection). Two reach the app:

- ``Content-Length`` together with ``Transfer-Encoding`` (also when the latter is obs-folded:
  h11 unfolds it). h11 reads the body as the ``Transfer-Encoding`` says and keeps the connection
  open, so a proxy in front that framed it by ``Content-Length`` would take the rest of the body
  for the next request, and the two would answer different requests from then on. RFC 9112
  section 6.1: such a message may be smuggling, and the server MUST close the connection after
  responding to it. Refused with 400 before any other step (a 401 for a missing key would keep
  the connection open just the same), and ``Connection: close`` ends the connection: whatever
  the client pipelined behind it is never read.
- HTTP/2's preface, ``PRI * HTTP/2.0``, while HTTP/2 without TLS is off
  (service/framework/h2c.py): it reaches the app as a request of version ``2.0``, which no
  HTTP/1.1 client sends. 400 (not 505: a status any client can cause must not count as the
  service's error), and the connection closed before its frames are read as requests.
"""

from __future__ import annotations

from service.errors import APIError
from service.pipeline.state import RequestState, Setup

CLOSE = {"Connection": "close"}


def refuse_ambiguous(setup: Setup, state: RequestState) -> None:
    """400 and ``Connection: close`` for a request framed two ways, or HTTP/2's preface."""
    headers = state.raw_headers
    if b"transfer-encoding" in headers and b"content-length" in headers:
        raise APIError(
            400,
            "The request has both Content-Length and Transfer-Encoding; send one of them.",
            headers=CLOSE,
        )
    if state.request.http_version == "2.0":
        raise APIError(400, "HTTP/2 without TLS is not served here; send HTTP/1.1.", headers=CLOSE)
