"""A raw client for protocol-edge tests: HTTP/1.1 heads and HTTP/2 frames (the ``h2`` library)
over one socket, recording what the server sends back, whichever protocol it answers in."""

from __future__ import annotations

import base64
import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions

Header = tuple[str, str]


@dataclass
class Reply:
    """What the server sent on one connection."""

    raw: bytes = b""
    # "http1" once the server answered in HTTP/1.1, "h2" once it spoke HTTP/2 (after a 101,
    # or from its first byte); None before it sent anything.
    protocol: str | None = None
    # HTTP/2 events the client decoded.
    events: list[h2.events.Event] = field(default_factory=list)
    closed: bool = False

    def answers(self) -> list[tuple[int, dict[bytes, bytes], bytes]]:
        """Each whole HTTP/1.1 response received, in order: status, headers (names in lower
        case), body (by its Content-Length; a 101 has none)."""
        found, rest = [], self.raw
        while rest.startswith(b"HTTP/1.1 "):
            head, complete, after = rest.partition(b"\r\n\r\n")
            if not complete:
                break
            lines = head.split(b"\r\n")
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(b":") for line in lines[1:])
            }
            length = int(headers.get(b"content-length", b"0"))
            if len(after) < length:
                break
            found.append((int(lines[0].split()[1]), headers, after[:length]))
            rest = after[length:]
        return found

    def statuses(self) -> list[int]:
        """The status of each whole HTTP/1.1 response, in order (a 101 included)."""
        return [status for status, _, _ in self.answers()]

    def first_answer(self) -> tuple[dict[bytes, bytes], bytes]:
        """The headers and body of the first HTTP/1.1 response."""
        _, headers, body = self.answers()[0]
        return headers, body

    def complete_http1_answers(self) -> int:
        """How many whole HTTP/1.1 responses have arrived."""
        return len(self.answers())


class Wire:
    """One connection to the server, spoken to in HTTP/1.1 or HTTP/2 as a test decides."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self.reply = Reply()
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Send bytes; a server that has closed the connection is not an error here (what it
        sent before closing is still read)."""
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def read(self, until: Callable[[Reply], bool], within: float | None = None) -> Reply:
        """Read until ``until(reply)`` holds, the server closes the connection, or ``within``
        seconds pass (the wire's timeout by default)."""
        deadline = time.monotonic() + (self.timeout if within is None else within)
        while not until(self.reply) and not self.reply.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                self.reply.closed = True
                break
            self._received(chunk)
        return self.reply

    def drain(self, within: float = 2.0) -> Reply:
        """Whatever the server sends within ``within`` seconds, or until it closes."""
        return self.read(lambda reply: False, within)

    def _received(self, chunk: bytes) -> None:
        reply = self.reply
        reply.raw += chunk
        if reply.protocol is None:
            if reply.raw.startswith(b"HTTP/1.1 101 "):
                _, found, rest = reply.raw.partition(b"\r\n\r\n")
                if not found:
                    return
                reply.protocol, chunk = "h2", rest
                self._flush()  # the preface and SETTINGS, held back until the switch
            elif reply.raw.startswith(b"HTTP/"):
                reply.protocol = "http1"
            else:
                reply.protocol = "h2"
        if reply.protocol == "h2" and chunk:
            try:
                reply.events += self.h2.receive_data(chunk)
            except h2.exceptions.ProtocolError:
                reply.closed = True
            self._flush()

    def _flush(self) -> None:
        self.send(self.h2.data_to_send())

    # -- HTTP/2 -----------------------------------------------------------------------

    def preface(self) -> None:
        """HTTP/2 by prior knowledge: the connection preface and the client's SETTINGS."""
        self.h2.initiate_connection()
        self._flush()

    def upgrade_head(self, target: str = "/healthz", settings: str | None = None) -> bytes:
        """An HTTP/1.1 GET asking to switch to h2c (RFC 7540 section 3.2, which RFC 9113
        deprecates); the client's HTTP/2 preface is held back until a 101. ``settings``
        replaces the ``HTTP2-Settings`` value the client would send."""
        own = (self.h2.initiate_upgrade_connection() or b"").decode()
        return (
            f"GET {target} HTTP/1.1\r\nHost: localhost\r\n"
            "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            f"HTTP2-Settings: {own if settings is None else settings}\r\n\r\n"
        ).encode()

    def headers(self, stream_id: int, headers: list[Header], *, end_stream: bool) -> None:
        """A HEADERS frame, sent at once if the connection speaks HTTP/2 (else held back)."""
        self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        if self.reply.protocol != "http1":
            self._flush()

    def data(self, stream_id: int, body: bytes, *, end_stream: bool = False) -> None:
        self.h2.send_data(stream_id, body, end_stream=end_stream)
        if self.reply.protocol != "http1":
            self._flush()

    def frames(self, data: bytes) -> None:
        """Frames the ``h2`` library would not send (it keeps to the protocol), as bytes."""
        self.send(data)


def responded(stream_id: int) -> Callable[[Reply], bool]:
    """A condition for :meth:`Wire.read`: an answer on the HTTP/2 stream, or any HTTP/1.1 one."""

    def holds(reply: Reply) -> bool:
        if reply.protocol == "http1":
            return reply.complete_http1_answers() > 0
        return any(
            isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id
            for event in reply.events
        )

    return holds


def bad_settings() -> str:
    """An ``HTTP2-Settings`` value that is base64url but no SETTINGS payload (seven bytes, not a
    multiple of six)."""
    return base64.urlsafe_b64encode(b"\x00\x01\x00\x00\x10\x00\x00").decode().rstrip("=")
