"""Protocol edges on the wire, against Hypercorn with hypercorn.toml serving the app in production
mode (docs/security.md lists each edge and how it is handled).

- HTTP/2 without TLS: each frame sequence that wedged or crashed Hypercorn 0.18's h2c, sent
  by prior knowledge or after an upgrade. The server must answer in HTTP/1.1, log no
  traceback, go on serving, and stop on SIGTERM within ``graceful_timeout``.
- ``Content-Length`` with ``Transfer-Encoding``: 400, ``Connection: close``, and a request
  pipelined behind it never answered.
- WebSocket handshakes: through the key, the header limit, the request id and the log line.
- Validation errors: the answer stays small whatever the request holds.
"""

from __future__ import annotations

import json
import re
import signal
import string
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import h2.events
import httpx
import hyperframe.frame
import pytest

from service.config import Settings
from service.errors import PROBLEM_JSON
from tests.app.test_auth import bearer
from tests.e2e.test_auth import production_env
from tests.support.wire import Reply, Wire, bad_settings, responded
from tools import ROOT
from tools.hypercorn_process import hypercorn, output
from tools.private_servers import free_port

GRACEFUL_TIMEOUT = tomllib.loads((ROOT / "hypercorn.toml").read_text())["graceful_timeout"]
# Hypercorn polls for the end of the drain and then runs the shutdown hooks (5 s at most).
STOP_MARGIN = 10
TRACEBACK = re.compile(r"Traceback \(most recent call last\)")
KEY = bearer("all")["Authorization"]


@contextmanager
def served(settings: Settings, **extra: str) -> Iterator[tuple[str, int, subprocess.Popen[bytes]]]:
    """The API under Hypercorn (hypercorn.toml: two workers) in production mode, with keys."""
    with hypercorn(free_port(), production_env(settings, **extra)) as (base_url, process):
        yield base_url, int(base_url.rsplit(":", 1)[1]), process


def assert_serves_then_stops(base_url: str, process: subprocess.Popen[bytes]) -> str:
    """A plain request is answered, and SIGTERM ends the server within graceful_timeout; its
    output, which holds no traceback, is returned."""
    assert httpx.get(f"{base_url}/healthz", timeout=10).status_code == 200
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(GRACEFUL_TIMEOUT + STOP_MARGIN)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {GRACEFUL_TIMEOUT + STOP_MARGIN} s after SIGTERM")
    logged = output(process)
    assert not TRACEBACK.search(logged), logged
    return logged


# -- HTTP/2 without TLS -------------------------------------------------------------------

POST_USERS = [
    (":method", "POST"),
    (":path", "/users"),
    (":scheme", "http"),
    (":authority", "localhost"),
    ("content-type", "application/json"),
]
# A request that waits for its body on the same connection.
WAITING = [*POST_USERS, ("authorization", KEY), ("content-length", "30")]


def _data_after_the_answer(wire: Wire, first: int) -> None:
    """``POST /users`` without a key and without END_STREAM, another request waiting for its
    body beside it, then a DATA frame on the first once its 401 has arrived."""
    wire.headers(first, POST_USERS, end_stream=False)
    wire.headers(first + 2, WAITING, end_stream=False)
    wire.read(responded(first))
    wire.data(first, b"{}")


def data_after_the_answer(wire: Wire) -> None:
    wire.preface()
    _data_after_the_answer(wire, 1)


def data_after_the_answer_after_an_upgrade(wire: Wire) -> None:
    wire.send(wire.upgrade_head())
    # The 101 and the answer to the GET on stream 1, or the GET answered in HTTP/1.1.
    wire.read(responded(1))
    if wire.reply.protocol == "h2":
        _data_after_the_answer(wire, 3)


def priority_for_1100_idle_streams(wire: Wire) -> None:
    wire.preface()
    wire.frames(
        b"".join(
            hyperframe.frame.PriorityFrame(stream_id, depends_on=0, stream_weight=16).serialize()
            for stream_id in range(1, 2 * 1100, 2)
        )
    )


def connect_without_path(wire: Wire) -> None:
    wire.preface()
    wire.headers(1, [(":method", "CONNECT"), (":authority", "localhost:443")], end_stream=False)


def malformed_http2_settings_in_an_upgrade(wire: Wire) -> None:
    wire.send(wire.upgrade_head(settings=bad_settings()))


def bare_upgrade_h2c(wire: Wire) -> None:
    """``Upgrade: h2c`` alone: no ``Connection: Upgrade``, no ``HTTP2-Settings``."""
    wire.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nUpgrade: h2c\r\n\r\n")


# Each sequence, and the HTTP/1.1 status its first request gets with h2c off: HTTP/2's
# preface is refused (400, then the connection closes); an upgrade is ignored (the GET is
# answered).
SEQUENCES: list[tuple[Callable[[Wire], None], int]] = [
    (data_after_the_answer, 400),
    (data_after_the_answer_after_an_upgrade, 200),
    (priority_for_1100_idle_streams, 400),
    (connect_without_path, 400),
    (malformed_http2_settings_in_an_upgrade, 200),
    (bare_upgrade_h2c, 200),
]


@pytest.mark.parametrize(
    ("sequence", "status"), SEQUENCES, ids=[sequence.__name__ for sequence, _ in SEQUENCES]
)
def test_h2c_frame_sequences_are_answered_in_http1_and_the_server_still_stops(
    settings: Settings, sequence: Callable[[Wire], None], status: int
) -> None:
    with served(settings) as (base_url, port, process):
        wire = Wire(port)
        sequence(wire)
        reply = wire.read(lambda reply: reply.complete_http1_answers() > 0, within=5)
        if reply.protocol == "h2":
            wire.drain()
        wire.close()
        assert_serves_then_stops(base_url, process)
    assert reply.protocol == "http1", reply.raw[:300]
    assert reply.statuses()[0] == status, reply.raw[:600]
    if status == 400:
        head, _, body = reply.raw.partition(b"\r\n\r\n")
        assert b"connection: close" in head.lower()
        assert json.loads(body)["detail"] == (
            "HTTP/2 without TLS is not served here; send HTTP/1.1."
        )


def test_h2c_is_served_when_http2_cleartext_is_set(settings: Settings) -> None:
    with served(settings, HTTP2_CLEARTEXT="true") as (base_url, port, process):
        wire = Wire(port)
        wire.preface()
        wire.headers(
            1,
            [(":method", "GET"), (":path", "/healthz"), (":scheme", "http"),
             (":authority", "localhost")],
            end_stream=True,
        )  # fmt: skip
        reply = wire.read(responded(1))
        wire.close()
        assert_serves_then_stops(base_url, process)
    assert reply.protocol == "h2"
    (answer,) = [event for event in reply.events if isinstance(event, h2.events.ResponseReceived)]
    # header_encoding is set: names and values come as str.
    assert dict(answer.headers)[":status"] == "200"  # type: ignore[index,comparison-overlap]


# -- HTTP/1.1 framing ------------------------------------------------------------------------

FRAMED_TWICE = {
    "Content-Length first": b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
    "Transfer-Encoding first": b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
    "Transfer-Encoding obs-folded": b"Content-Length: 4\r\nTransfer-Encoding:\r\n chunked\r\n",
}


def test_content_length_with_transfer_encoding_is_refused_and_closes(settings: Settings) -> None:
    body = b'{"n": 10}'
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    pipelined = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with served(settings) as (base_url, port, process):
        for what, framing in FRAMED_TWICE.items():
            wire = Wire(port)
            wire.send(
                b"POST /tasks HTTP/1.1\r\nHost: localhost\r\nAuthorization: " + KEY.encode()
                + b"\r\nContent-Type: application/json\r\n" + framing + b"\r\n" + chunked
                + pipelined
            )  # fmt: skip
            reply = wire.read(lambda reply: reply.complete_http1_answers() > 1, within=5)
            wire.close()
            # One answer, then the connection closed: the pipelined GET is never read.
            assert reply.statuses() == [400], (what, reply.raw)
            assert reply.closed, what
            head = reply.raw.partition(b"\r\n\r\n")[0]
            assert b"connection: close" in head.lower(), what
            assert b"content-type: " + PROBLEM_JSON.encode() in head.lower(), what
            assert b"x-request-id: " in head.lower(), what
        logged = assert_serves_then_stops(base_url, process)
    refusals = [
        line
        for line in logged.splitlines()
        if '"route": "/tasks"' in line and '"status": 400' in line
    ]
    assert len(refusals) == len(FRAMED_TWICE), logged


# -- WebSocket handshakes --------------------------------------------------------------------

WEBSOCKET = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


def refused_handshake(port: int, *lines: bytes) -> Reply:
    """A handshake for ``/users/1``, and everything the server sends until it closes."""
    wire = Wire(port)
    wire.send(
        b"GET /users/1 HTTP/1.1\r\nHost: localhost\r\n" + WEBSOCKET + b"".join(lines) + b"\r\n"
    )
    reply = wire.drain(within=5)
    wire.close()
    return reply


def test_a_websocket_handshake_passes_every_step_and_is_refused(settings: Settings) -> None:
    with served(settings) as (base_url, port, process):
        without_key = refused_handshake(port)
        with_key = refused_handshake(port, b"Authorization: " + KEY.encode() + b"\r\n")
        oversized = refused_handshake(port, b"X-Pad: " + b"a" * 30_000 + b"\r\n")
        logged = assert_serves_then_stops(base_url, process)
    assert without_key.statuses() == [401], without_key.raw
    assert with_key.statuses() == [400], with_key.raw
    assert oversized.statuses() == [431], oversized.raw
    ids = []
    for reply in (without_key, with_key, oversized):
        # Answered, never switched, and the connection closed after the answer.
        assert reply.closed, reply.raw
        headers, body = reply.first_answer()
        assert headers[b"content-type"] == PROBLEM_JSON.encode(), reply.raw
        assert headers[b"x-content-type-options"] == b"nosniff", reply.raw
        assert headers[b"connection"] == b"close", reply.raw
        assert json.loads(body)["status"] == reply.statuses()[0]
        ids.append(headers.get(b"x-request-id", b"").decode())
    assert all(ids[:2]), ids
    assert b"ratelimit" in with_key.first_answer()[0], with_key.raw
    lines = [json.loads(line) for line in logged.splitlines() if '"service.request"' in line]
    handshakes = [line for line in lines if line["route"] == "/users/<int:user_id>"]
    assert sorted(line["status"] for line in handshakes) == [400, 401], lines
    assert {line["request_id"] for line in handshakes} == set(ids[:2])


# -- Validation errors -----------------------------------------------------------------------

# Under a few KB whatever the request holds (service/errors.py says how it is bounded).
SMALL = 5000


def test_validation_answers_stay_small_whatever_the_request_holds(settings: Settings) -> None:
    # 3,300 distinct names of two letters: 10 KB, under the header limit.
    letters = string.ascii_letters + string.digits
    names = [a + b for a in letters for b in letters][:3300]
    # Six bytes a character once escaped in JSON; 60 of them fit 31 times in the header limit.
    long_name = "\u00e9" * 60
    with served(settings) as (base_url, _, process):
        with httpx.Client(base_url=base_url, headers=bearer("all"), timeout=30) as http:
            many_params = http.get("/users?" + "&".join(names))
            many_keys = http.post(
                "/tasks",  # 6,000 keys in 58 KB, under the body limit
                content=json.dumps({f"k{i}": 1 for i in range(6000)}, separators=(",", ":")),
                headers={"Content-Type": "application/json"},
            )
            long_params = http.get("/users", params={f"{long_name}{i}": "1" for i in range(31)})
            long_keys = http.post("/tasks", json={long_name * 2 + str(i): 1 for i in range(60)})
        assert_serves_then_stops(base_url, process)
    for answer, status in (
        (many_params, 400), (many_keys, 400), (long_params, 422), (long_keys, 422),
    ):  # fmt: skip
        assert answer.status_code == status, answer.text[:500]
        assert answer.headers["content-type"] == PROBLEM_JSON
        assert len(answer.content) < SMALL, (len(answer.content), answer.text[:500])
    for answer, count in ((long_params, 31), (long_keys, 61)):
        problem = answer.json()
        assert 1 <= len(problem["errors"]) <= 10, problem
        assert len(problem["errors"]) + problem["errors_omitted"] == count, problem
