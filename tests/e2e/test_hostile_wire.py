"""Hostile input on the wire: raw bytes over a socket to Hypercorn (hypercorn.toml) serving
the app with API keys, for what only the wire can carry and the in-process test
(tests/app/test_hostile.py) cannot: bytes that are not ASCII in the request target, a NUL or
obs-text in a header, percent-encoding errors as sent, repeated and over-long headers,
conflicting Content-Length, bad chunked framing, a body shorter than its Content-Length.

What is acceptable on the wire, and asserted for every request here:

- never a 5xx, never traceback text, and an answer (or a closed connection) within
  :data:`ANSWER_WITHIN` seconds: no hang;
- an answer from the app is a 4xx ``application/problem+json`` whose ``status`` is the
  response's (a 2xx only where the request is valid: a probe with an odd but harmless header);
- Hypercorn's HTTP/1 parser (h11) refuses some requests before the app sees them: a target
  or header with bytes h11 does not allow (non-ASCII in the target, NUL, a header without a
  colon), two Content-Length values, a negative one, a bad chunk size, a head over h11's
  buffer (64 KiB). Its answer is a bare ``400`` (or ``431`` for the head) with an empty body
  and ``Connection: close``: no problem+json, since the app never ran, but nothing to
  misread either. That is accepted here, and only with an empty body and no request id;
- a body shorter than its Content-Length, the client then silent: the server waits for the
  rest until Hypercorn's ``read_timeout`` (70 s in hypercorn.toml, 2 s here) closes the
  connection, without an answer, and other connections are served meanwhile. A client that
  closes its side instead gets the connection closed at once.

A few fixed cases, then Hypothesis (:data:`EXAMPLES` examples, derandomized, no database:
the same requests on every run) over targets and headers made of raw bytes.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.config import Settings
from service.errors import PROBLEM_JSON
from service.ops.keygen import generate_key, key_entry
from tools.hypercorn_process import hypercorn
from tools.private_servers import free_port

ANSWER_WITHIN = 10.0
READ_TIMEOUT = 2
EXAMPLES = 40
KEY = generate_key()
AUTH = b"Authorization: Bearer " + KEY.encode() + b"\r\n"
TRACEBACK = re.compile(rb"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+")
JSON = b"Content-Type: application/json\r\n"


def env_of(settings: Settings) -> dict[str, str]:
    return {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "REDIS_PREFIX": settings.redis_prefix,
        "API_KEYS": key_entry("wire", KEY, ("read", "write", "admin")),
        "TASK_WAIT": "0",
        "TASK_MAX_N": "1000",
    }


@pytest.fixture
def wire_port(settings: Settings) -> Iterator[int]:
    """Hypercorn with hypercorn.toml (one worker process, its read timeout shortened so a
    silent client is dropped within the test's time), on this test's schema and prefix."""
    with hypercorn(
        free_port(), env_of(settings), "--workers", "0", "--read-timeout", str(READ_TIMEOUT)
    ) as (base_url, _):
        yield int(base_url.rsplit(":", 1)[1])


@dataclass
class Answer:
    status: int | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    closed: bool = False  # the server closed the connection
    seconds: float = 0.0

    def __str__(self) -> str:
        return f"{self.status} {self.headers.get(b'content-type')!r} {self.body[:200]!r}"


def exchange(port: int, request: bytes, *, close_write: bool = False) -> Answer:
    """Send raw bytes on a new connection; read one response, or until the server closes.
    The socket timeout bounds the wait: a timeout fails the caller's assertions."""
    answer = Answer()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WITHIN) as sock:
        try:
            sock.sendall(request)
            if close_write:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered and closed before the whole request was sent
        received = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    answer.closed = True
                    break
                received += chunk
                head, found, body = received.partition(b"\r\n\r\n")
                if found:
                    lines = head.split(b"\r\n")
                    headers = dict(
                        (name.strip().lower(), value.strip())
                        for name, _, value in (line.partition(b":") for line in lines[1:])
                    )
                    if len(body) >= int(headers.get(b"content-length", b"0")):
                        answer.status = int(lines[0].split()[1])
                        answer.headers, answer.body = headers, body
                        break
        except TimeoutError:
            pass
        except ConnectionResetError:
            answer.closed = True
    answer.seconds = time.monotonic() - started
    return answer


def assert_acceptable(answer: Answer, shown: str, *, valid: bool = False) -> None:
    shown = f"{shown} -> {answer}"
    assert answer.status is not None or answer.closed, (
        f"no answer within {ANSWER_WITHIN} s: {shown}"
    )
    assert not TRACEBACK.search(answer.body), shown
    if answer.status is None:
        return
    assert answer.status < 500, shown
    if answer.status < 400:
        assert valid, shown
        assert 200 <= answer.status < 300, shown
        return
    if answer.headers.get(b"content-type") == PROBLEM_JSON.encode():
        assert json.loads(answer.body)["status"] == answer.status, shown
        return
    # Refused by Hypercorn's parser before the app ran: a bare status, nothing else.
    assert answer.status in (400, 431), shown
    assert answer.body == b"", shown
    assert b"x-request-id" not in answer.headers, shown


def head(target: bytes, *lines: bytes, method: bytes = b"GET") -> bytes:
    return method + b" " + target + b" HTTP/1.1\r\nHost: localhost\r\n" + AUTH + b"".join(lines)


FIXED: list[tuple[str, bytes, bool]] = [
    # (what, request, valid: may it get a 2xx)
    ("non-ASCII in the path", head(b"/users/\xff\xfe") + b"\r\n", False),
    ("non-ASCII in the query", head(b"/users?email=\xc3\x28") + b"\r\n", False),
    ("percent-escape that is not UTF-8", head(b"/users?email=%ff%fe") + b"\r\n", False),
    ("broken percent-escape", head(b"/users?email=%zz&limit=%") + b"\r\n", False),
    ("percent-escape in the path", head(b"/tasks/%ff%00%2F") + b"\r\n", False),
    ("NUL escaped in the query", head(b"/users?email=a%00b") + b"\r\n", False),
    ("// in the path", head(b"//users//1") + b"\r\n", False),
    ("a number of 5000 digits as the id", head(b"/users/" + b"9" * 5000) + b"\r\n", False),
    ("obs-text in a header", head(b"/healthz", b"X-Odd: \xff\xfe\x80\r\n") + b"\r\n", True),
    ("obs-text as the key", b"GET /users HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe"
     b"\r\n\r\n", False),
    ("NUL in a header", head(b"/healthz", b"X-Odd: a\x00b\r\n") + b"\r\n", False),
    ("a header without a colon", head(b"/healthz", b"X-Odd\r\n") + b"\r\n", False),
    ("a non-ASCII header name", head(b"/healthz", b"X-\xff: a\r\n") + b"\r\n", False),
    ("500 repeated headers", head(b"/healthz", b"X-Odd: a\r\n" * 500) + b"\r\n", True),
    ("repeated Content-Type", head(b"/users", JSON * 3, b"Content-Length: 2\r\n", method=b"POST")
     + b"\r\n{}", False),
    ("a 20 KiB header (the app's 431)", head(b"/healthz", b"X-Pad: " + b"a" * 20_000 + b"\r\n")
     + b"\r\n", False),
    ("a 100 KiB header (h11's 431)", head(b"/healthz", b"X-Pad: " + b"a" * 100_000 + b"\r\n")
     + b"\r\n", False),
    ("a 20 KiB target", head(b"/users?email=" + b"a" * 20_000) + b"\r\n", False),
    ("two Content-Lengths", head(b"/users", JSON, b"Content-Length: 2\r\nContent-Length: 3\r\n",
     method=b"POST") + b"\r\n{}", False),
    ("a negative Content-Length", head(b"/users", JSON, b"Content-Length: -1\r\n",
     method=b"POST") + b"\r\n{}", False),
    ("a Content-Length of 30 digits", head(b"/users", JSON, b"Content-Length: " + b"9" * 30
     + b"\r\n", method=b"POST") + b"\r\n{}", False),
    ("Content-Length and chunked", head(b"/users", JSON, b"Content-Length: 2\r\n",
     b"Transfer-Encoding: chunked\r\n", method=b"POST") + b"\r\n2\r\n{}\r\n0\r\n\r\n", False),
    ("a bad chunk size", head(b"/users", JSON, b"Transfer-Encoding: chunked\r\n",
     method=b"POST") + b"\r\nzz\r\n{}\r\n0\r\n\r\n", False),
    ("a chunk longer than its size", head(b"/users", JSON, b"Transfer-Encoding: chunked\r\n",
     method=b"POST") + b"\r\n2\r\n{}}}}\r\n0\r\n\r\n", False),
    ("a chunked body of deep nesting", head(b"/tasks", JSON, b"Transfer-Encoding: chunked\r\n",
     method=b"POST") + b"\r\n4e20\r\n" + b"[" * 20_000 + b"\r\n0\r\n\r\n", False),
    ("a TLS hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", False),
]  # fmt: skip


def test_hostile_bytes_on_the_wire_get_a_4xx_never_a_5xx_or_a_hang(wire_port: int) -> None:
    for what, request, valid in FIXED:
        assert_acceptable(exchange(wire_port, request), what, valid=valid)
    # Still serving.
    assert exchange(wire_port, head(b"/healthz") + b"\r\n").status == 200


def test_a_body_shorter_than_its_content_length_is_not_a_hang(wire_port: int) -> None:
    short = head(b"/users", JSON, b"Content-Length: 100\r\n", method=b"POST") + b'\r\n{"a":'
    # The client closes its side: the connection is closed at once, with no answer.
    closed = exchange(wire_port, short, close_write=True)
    assert_acceptable(closed, "short body, then EOF")
    assert closed.seconds < READ_TIMEOUT
    # The client stays silent: nothing until the read timeout closes the connection, and
    # other requests are served meanwhile.
    with socket.create_connection(("127.0.0.1", wire_port), timeout=ANSWER_WITHIN) as silent:
        silent.sendall(short)
        assert exchange(wire_port, head(b"/healthz") + b"\r\n").status == 200
        started = time.monotonic()
        assert silent.recv(65536) == b"", "an answer to a request whose body never came"
        assert time.monotonic() - started < READ_TIMEOUT + 5


# -- Hypothesis: targets and headers of raw bytes ---------------------------------------------

# Routes that read no query or header of their own: any odd but well-formed extra is harmless.
NO_INPUT = [b"/healthz", b"/readyz", b"/expensive-operation", b"/metrics", b"/openapi.json"]
# Routes that read the query: each request adds a parameter they refuse, so never a 2xx.
WITH_INPUT = [b"/users", b"/heavy-task", b"/users/1", b"/tasks/" + b"0" * 32]
VISIBLE = bytes(range(0x21, 0x7F))
FIELD = bytes([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])


@st.composite
def mostly(
    draw: st.DrawFn, common: st.SearchStrategy[bytes], rare: st.SearchStrategy[bytes]
) -> bytes:
    """``common`` six times in seven: bytes h11 lets through, so most requests reach the app
    (the refusals of h11 itself are the fixed cases above)."""
    return draw(rare if draw(st.integers(0, 6)) == 3 else common)


raw_bytes = st.binary(max_size=12)
visible = st.lists(st.sampled_from(VISIBLE), max_size=12).map(bytes)
escapes = st.sampled_from([b"%", b"%z", b"%zz", b"%ff", b"%c3%28", b"%00", b"%2F", b"%25", b"+"])
piece = st.lists(mostly(visible, raw_bytes) | escapes, max_size=4).map(b"".join)
header_name = mostly(
    st.from_regex(rb"\A[A-Za-z][A-Za-z0-9-]{0,20}\Z"), st.binary(min_size=1, max_size=8)
)
# Field bytes (obs-text included); now and then anything but CR and LF, which end the line.
header_value = mostly(
    st.lists(st.sampled_from(FIELD), max_size=30).map(bytes).map(bytes.strip),
    st.binary(max_size=30).map(lambda raw: raw.replace(b"\r", b"").replace(b"\n", b"")),
)


@st.composite
def raw_request(draw: st.DrawFn) -> tuple[bytes, bool]:
    valid_route = draw(st.booleans())
    path = draw(st.sampled_from(NO_INPUT if valid_route else WITH_INPUT))
    query = draw(piece) + b"=" + draw(piece)
    if not valid_route:
        query += b"&colour=blue"  # refused by the query's model (extra="forbid"): a 422
    headers = b"".join(
        name + b": " + value + b"\r\n"
        for name, value in draw(st.lists(st.tuples(header_name, header_value), max_size=4))
    )
    repeats = draw(st.sampled_from([0, 0, 2, 100]))
    headers += b"X-Again: x\r\n" * repeats
    request = head(path + b"?" + query, headers) + b"\r\n"
    # A 2xx is acceptable only where the request is valid: a route that reads no query, with
    # headers h11 lets through (it refuses the rest before the app). Otherwise a 4xx.
    return request, valid_route


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=raw_request())
def test_raw_targets_and_headers_get_a_4xx_never_a_5xx(
    wire_port: int, case: tuple[bytes, bool]
) -> None:
    request, valid = case
    assert_acceptable(exchange(wire_port, request), repr(request[:300]), valid=valid)
