"""Hostile input beyond the schema, in-process: every route of the app's url_map, every method,
with bodies, query strings, path segments and headers the description does not describe.

Hypothesis generates each request as the ASGI server would hand it to the app (the scope's
``path``, ``raw_path``, ``query_string`` and raw header bytes are set directly, so nothing the
test client would tidy up is tidied): any JSON value at any depth, huge and odd numbers, bytes
that are not UTF-8 (or are UTF-16, or carry a BOM), duplicate keys, NaN and Infinity, control
characters raw and escaped, lone surrogates, repeated and over-long headers, percent-encoding
errors. The app runs with API keys, as in production, and each request carries no key, a wrong
key, a key with only the read scope, or a key with every scope, so both the guard and the
handlers behind it are reached. What every answer must be:

- never a 5xx, and within :data:`ANSWER_WITHIN` seconds (no hang);
- a 4xx is ``application/problem+json`` whose ``status`` is the response's, and no answer
  carries traceback text;
- a request whose head is over ``MAX_HEADER_BYTES`` gets exactly 431; one without a valid key
  on a guarded path exactly 401 (403 for the read-only key on a write or admin route);
- a 2xx only for a request that is valid by the served OpenAPI description: a body that is
  strict JSON (no duplicate key, no NaN) of the documented schema, documented query
  parameters each given once and of their type, documented headers of their pattern. (The
  converse is not required: a valid request may still be a 404, 409 or 422.)

Every rule of the url_map, with every method it answers, is a parametrized case, so a new
route is fuzzed without being listed, and a case fails unless its rule and method were
routed to at least once (not only the router's 404s and 405s).

Settings: :data:`EXAMPLES` examples per rule and method, :data:`INPUT_EXAMPLES` more for the
operations whose body, query or headers the description documents (where input reaches the
handlers and the database); ``HOSTILE_EXAMPLES=N`` raises both for a longer search.
``deadline=None`` (a request's time depends on the machine, not on the input);
``derandomize=True`` and no example database: every run sends the same requests, here and in
CI, so a failure reproduces on the next run (a saved database would not survive a fresh CI
clone). The two property tests are marked slow (`make test-fast` leaves them out); what they
found is kept as plain tests at the end of this module, which `make test-fast` runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote, unquote, unquote_to_bytes

import asyncpg
import jsonschema
import pytest
import pytest_asyncio
import quart.typing
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quart import Quart
from quart import request as quart_request
from quart.testing import QuartClient
from werkzeug.datastructures import Headers
from werkzeug.routing import IntegerConverter, Rule

from service.app import create_app
from service.backends.db import migrate
from service.config import load_settings
from service.contract import PROBE_PATHS
from service.errors import PROBLEM_JSON
from service.ops.keygen import generate_key, key_entry
from service.pipeline.auth import required_scope
from service.pipeline.body import MAX_JSON_DEPTH
from service.pipeline.header_limit import header_bytes
from tools.devstack import with_search_path

# HOSTILE_EXAMPLES=2000 (say) for a longer search; the defaults keep `make test` short.
EXAMPLES = int(os.environ.get("HOSTILE_EXAMPLES", "15"))
INPUT_EXAMPLES = max(EXAMPLES, 80)
ANSWER_WITHIN = 10.0
FULL_KEY = generate_key()
READ_KEY = generate_key()
KEYS = {"full": FULL_KEY, "read": READ_KEY, "wrong": generate_key()}
HOSTILE_SETTINGS: dict[str, Any] = {
    "api_keys": ",".join(
        [
            key_entry("full", FULL_KEY, ("read", "write", "admin")),
            key_entry("reader", READ_KEY, ("read",)),
        ]
    ),
    # No worker runs here: a valid task is queued and answered at once (202), never awaited.
    "task_wait": 0,
    "task_max_n": 10**5,
    "task_client_limit": 10_000,
    "task_queue_limit": 10_000,
}
HOSTILE_CONFIG = load_settings(**HOSTILE_SETTINGS)
MAX_HEADER_BYTES = HOSTILE_CONFIG.max_header_bytes
TRACEBACK = re.compile(rb"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+")


def _described_app() -> tuple[Quart, dict[str, Any]]:
    app = create_app(load_settings(**HOSTILE_SETTINGS))
    document = app.extensions["QUART_SCHEMA"].openapi_provider.schema()
    return app, json.loads(app.json.dumps(document))


_APP, DESCRIPTION = _described_app()
RULES: list[Rule] = sorted(_APP.url_map.iter_rules(), key=lambda rule: (rule.rule, rule.endpoint))
# Every rule with every method it answers (HEAD and OPTIONS included, as Quart adds them).
ROUTES: list[tuple[Rule, str]] = [
    (rule, method) for rule in RULES for method in sorted(rule.methods or ())
]
EXTRA_METHODS = ["PUT", "TRACE", "CONNECT", "FOO"]

# -- generated parts -------------------------------------------------------------------------

HUGE_NUMBERS = [
    "0", "-0", "1", "-1", "00001", "1.0", "1e3", "1E400", "-1e-400", "9" * 19, str(2**63),
    str(2**63 - 1), str(2**64), "-" + str(2**63 + 1), "9" * 4300, "9" * 4301, "1" * 6000,
    "NaN", "Infinity", "-Infinity", "0x10", "1_000", " 7 ", "\u0663", "\uff11", "1e999999",
]  # fmt: skip

odd_text = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec="utf-8", categories=("Cc", "Cf", "Zs", "Zl", "Zp")), max_size=10),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
    st.sampled_from(["", "\x00", "a\x00b", "\ufeff", "\u202e", "x" * 300, "a@example.com"]),
    st.sampled_from(HUGE_NUMBERS),
)
huge_ints = (
    st.integers()
    | st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**100, -(10**300)])
    # Built when drawn: Hypothesis cannot show an int of over 4300 digits in a strategy's repr.
    | st.sampled_from([4299, 4300, 5000]).map(lambda digits: 10**digits)
)
json_scalars = st.none() | st.booleans() | huge_ints | st.floats() | odd_text
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(odd_text | st.sampled_from(["email", "name", "n"]), children, max_size=4)
    ),
    max_leaves=12,
)
documented_fields = st.sampled_from(["email", "name", "n"])


def _dumps(value: Any, ensure_ascii: bool) -> str:
    # NaN and Infinity come out as Python writes them (not JSON, but what a client may send),
    # and integers of any length (Python limits their conversion to 4300 digits).
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        return json.dumps(value, ensure_ascii=ensure_ascii)
    finally:
        sys.set_int_max_str_digits(limit)


@st.composite
def object_text(draw: st.DrawFn) -> str:
    """A JSON object of documented fields and others, keys repeated now and then."""
    pairs = draw(st.lists(st.tuples(documented_fields | odd_text, json_values), max_size=5))
    repeat = draw(st.booleans())
    if pairs and repeat:
        pairs.append((pairs[0][0], draw(json_values)))  # a duplicate key
    ensure_ascii = draw(st.booleans())
    return (
        "{"
        + ",".join(f"{_dumps(k, ensure_ascii)}:{_dumps(v, ensure_ascii)}" for k, v in pairs)
        + "}"
    )


@st.composite
def nested_text(draw: st.DrawFn) -> str:
    depth = draw(st.sampled_from([10, 100, 999, 1000, 5000, 30_000]))
    opening, closing = draw(st.sampled_from([("[", "]"), ('{"n":', "}"), ('{"name":[', "]}")]))
    return opening * depth + "1" + closing * depth


@st.composite
def number_body(draw: st.DrawFn) -> str:
    number = draw(st.sampled_from(HUGE_NUMBERS))
    key = draw(documented_fields)
    return draw(st.sampled_from([number, f'{{"{key}": {number}}}', f'{{"n": {number}}}']))


@st.composite
def mostly(draw: st.DrawFn, common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> Any:
    """``common`` six times in seven. (st.one_of would flatten a nested one_of into its
    branches, each as likely; and a rare choice is `== 3` of a range, since Hypothesis
    favours the ends of a range.)"""
    return draw(rare if draw(st.integers(0, 6)) == 3 else common)


emails = mostly(
    st.from_regex(r"\A[a-z0-9]{1,12}@example\.(com|org)\Z")
    | st.tuples(odd_text, st.sampled_from(["@example.com", "@EXAMPLE.com", "@b\u00fccher.de"])).map(
        "".join
    ),
    odd_text,
)


@st.composite
def shaped_text(draw: st.DrawFn, schema: dict[str, Any], repeat: bool = False) -> str:
    """An object with the schema's own fields (some left out, one extra now and then, one
    repeated if ``repeat``) holding hostile values: what gets past the parser to the handler."""
    names = sorted(schema.get("properties", {}))
    chosen = [name for name in names if draw(st.integers(0, 6)) != 3]
    if chosen and repeat:
        chosen.append(draw(st.sampled_from(chosen)))
    values = {"email": emails, "name": odd_text, "n": huge_ints}
    pairs = [(name, draw(mostly(values.get(name, json_values), json_values))) for name in chosen]
    if draw(st.integers(0, 6)) == 3:
        pairs.append((draw(odd_text), draw(json_values)))
    ensure_ascii = draw(st.booleans())
    return (
        "{"
        + ",".join(f"{_dumps(k, ensure_ascii)}:{_dumps(v, ensure_ascii)}" for k, v in pairs)
        + "}"
    )


json_texts = st.one_of(
    json_values.map(lambda value: _dumps(value, True)),
    json_values.map(lambda value: _dumps(value, False)),
    object_text(),
    nested_text(),
    number_body(),
    # Raw control characters inside a string (invalid JSON), and escaped ones.
    st.sampled_from(['{"name": "a\x01b", "email": "a@example.com"}', '{"name": "\\u0000"}']),
)


@st.composite
def body_bytes(draw: st.DrawFn, schema: dict[str, Any] | None) -> bytes:
    """A body of one kind of hostility, each kind about as likely (the kinds are drawn first,
    so that a short run meets every one of them)."""
    kind = draw(st.sampled_from(BODY_KINDS))
    if kind == "not UTF-8":
        return draw(
            st.binary(max_size=64)
            | st.sampled_from(
                [b"\xff\xfe", b'{"name": "\xc3\x28"}', b'{"n": 1}\x80', b"\xed\xa0\x80"]
            )
        )
    texts = {
        "shaped": shaped_text(schema) if schema else json_texts,
        "repeated key": shaped_text(schema, repeat=True) if schema else object_text(),
        "nested": nested_text(),
        "numbers": number_body(),
        "any JSON": json_texts,
    }
    text: str = draw(texts.get(kind, json_texts))
    if kind == "UTF-16":
        return text.encode("utf-16", "surrogatepass")
    if kind == "latin-1":
        return text.encode("latin-1", "replace")
    encoded = text.encode("utf-8", "surrogatepass")  # lone surrogates as (invalid) UTF-8
    return b"\xef\xbb\xbf" + encoded if kind == "BOM" else encoded


BODY_KINDS = [
    "shaped", "repeated key", "nested", "numbers", "any JSON", "shaped",
    "not UTF-8", "UTF-16", "BOM", "latin-1",
]  # fmt: skip


CONTENT_TYPES = [
    "application/json", "application/json; charset=utf-8", "application/json; charset=latin-1",
    "application/json; charset=utf-16", "application/problem+json", "application/vnd.x+json",
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
    "application/json;;;", "", "*/*",
]  # fmt: skip


@st.composite
def segment(draw: st.DrawFn, converter: Any) -> bytes:
    """A path segment as raw (ASCII) target bytes: what Hypercorn requires of a target."""
    if isinstance(converter, IntegerConverter):
        value = draw(
            st.integers(min_value=0, max_value=40).map(str)
            | st.sampled_from(HUGE_NUMBERS)
            | odd_text
        )
    else:
        value = draw(odd_text | st.from_regex(r"\A[0-9a-f]{32}\Z") | st.just("x" * 5000))
    raw = quote(value.encode("utf-8", "surrogatepass"), safe="")
    return draw(
        st.sampled_from([raw, raw, raw, raw, raw + "%", raw + "%zz", raw + "%ff%fe", raw + "%2F.."])
    ).encode()


def _target(rule: Rule, draw: st.DrawFn) -> bytes:
    parts: list[bytes] = []
    for is_dynamic, text in rule._trace:  # the rule's parts: constants and converters
        if text == "|":
            continue
        parts.append(draw(segment(rule._converters[text])) if is_dynamic else text.encode())
    return b"".join(parts)


@st.composite
def query_string(draw: st.DrawFn, names: list[str]) -> bytes:
    pairs = draw(
        st.lists(
            st.tuples(st.sampled_from([*names, "x", "n[]", ""]) | odd_text, odd_text), max_size=4
        )
    )
    encoded = "&".join(
        quote(k.encode("utf-8", "surrogatepass"), safe="")
        + "="
        + quote(v.encode("utf-8", "surrogatepass"), safe="")
        for k, v in pairs
    )
    junk = draw(st.sampled_from(["", "", "", "&", "%", "%zz", "=%ff%fe", "&&=&", ";n=1", "+%2B"]))
    return (encoded + junk).encode()


HEADER_NAMES = [
    "authorization", "content-type", "idempotency-key", "x-request-id", "x-profile-token",
    "accept", "origin", "access-control-request-method", "cookie", "range", "if-none-match",
    "accept-encoding", "x-forwarded-for", "forwarded", "expect", "transfer-encoding",
]  # fmt: skip
FIELD_BYTES = frozenset([9, *range(0x20, 0x7F), *range(0x80, 0x100)])
# What h11 lets through in a field value: visible ASCII, space, tab and obs-text (0x80-0xff).
header_value = st.one_of(
    st.binary(max_size=40).map(lambda raw: bytes(b for b in raw if b in FIELD_BYTES).strip()),
    st.sampled_from(
        [b"Bearer", b"Bearer ", b"bearer x", b"Basic Zm9vOmJhcg==", b"\xff\xfe", b"a" * 300]
    ),
)
# Now and then a value that takes the head to the limit or past it (431).
big_value = st.sampled_from([8_000, 16_400, 70_000]).map(lambda size: b"v" * size)
header_pair = st.tuples(
    (st.sampled_from(HEADER_NAMES) | st.from_regex(r"\A[a-z][a-z0-9-]{0,30}\Z")).map(str.encode),
    header_value,
)


@dataclass
class Hostile:
    method: str
    target: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    auth: str
    notes: dict[str, Any] = field(default_factory=dict)


@st.composite
def hostile_request(draw: st.DrawFn, rule: Rule, routed: str) -> Hostile:
    method = draw(mostly(st.just(routed), st.sampled_from(EXTRA_METHODS)))
    names = [
        p["name"] for p in _operation(rule, method).get("parameters", []) if p["in"] == "query"
    ]
    operation = _operation(rule, method)
    headers: list[tuple[bytes, bytes]] = []
    # Lists lead with the valid choice: Hypothesis tries (and shrinks towards) the first one.
    auth = draw(st.sampled_from(["full"] * 7 + ["read", "none", "wrong"]))
    if auth != "none":
        headers.append((b"authorization", f"Bearer {KEYS[auth]}".encode()))
    content = operation.get("requestBody", {}).get("content", {}).get("application/json")
    schema = content["schema"] if content else None
    body = draw(
        mostly(body_bytes(schema), st.just(b"")) if schema else st.just(b"") | body_bytes(None)
    )
    content_type = draw(mostly(st.just("application/json"), st.sampled_from(CONTENT_TYPES)))
    if content_type:
        headers.append((b"content-type", content_type.encode()))
    headers += draw(st.lists(header_pair, max_size=3))
    if draw(st.integers(0, 9)) == 3:
        headers.append((draw(st.sampled_from(HEADER_NAMES)).encode(), draw(big_value)))
    return Hostile(method, _target(rule, draw), draw(query_string(names)), headers, body, auth)


# -- what a valid request is, by the description ---------------------------------------------


def _openapi_path(rule: Rule) -> str:
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)


def _operation(rule: Rule, method: str) -> dict[str, Any]:
    operation: dict[str, Any] = (
        DESCRIPTION["paths"].get(_openapi_path(rule), {}).get(method.lower(), {})
    )
    return operation


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise _Duplicate
    return found


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def strict_json(body: bytes) -> tuple[bool, Any]:
    """(True, value) for a body that is strict JSON in UTF-8; (False, None) otherwise."""
    try:
        value = json.loads(
            body.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant
        )
    except (ValueError, RecursionError):
        return False, None
    return True, value


def _valid(schema: dict[str, Any], value: Any) -> bool:
    try:
        jsonschema.validate(value, schema)
    except (jsonschema.ValidationError, RecursionError):
        return False
    return True


def _query_value(schema: dict[str, Any], raw: str) -> Any:
    for choice in schema.get("anyOf", [schema]):
        if choice.get("type") == "integer":
            try:
                return int(raw)
            except ValueError:
                continue
        if choice.get("type") == "string":
            return raw
    return raw


def may_succeed(case: Hostile, operation: dict[str, Any], allowed: set[str]) -> tuple[bool, str]:
    """Whether the description allows a 2xx for this request, and if not, why not."""
    if case.method not in allowed:
        return False, "method not allowed"
    parameters = operation.get("parameters", [])
    query_params = {p["name"]: p["schema"] for p in parameters if p["in"] == "query"}
    if query_params:
        given_names: list[str] = []
        for part in case.query.split(b"&"):
            if not part:
                continue
            raw_name, _, raw_value = part.partition(b"=")
            try:
                name, value = (
                    unquote_to_bytes(raw.replace(b"+", b" ")).decode()
                    for raw in (raw_name, raw_value)
                )
            except UnicodeDecodeError:
                return False, "query string not UTF-8"
            given_names.append(name)
            schema = query_params.get(name)
            if schema is None:
                return False, f"undocumented query parameter {name!r}"
            if not _valid(schema, _query_value(schema, value)):
                return False, f"query parameter {name!r} invalid"
        if len(set(given_names)) != len(given_names):
            return False, "query parameter repeated"
    for parameter in parameters:
        if parameter["in"] != "header":
            continue
        given = [v for n, v in case.headers if n.decode("latin-1") == parameter["name"]]
        for header in given:
            if not _valid(parameter["schema"], header.decode("latin-1")):
                return False, f"header {parameter['name']} invalid"
    content = operation.get("requestBody", {}).get("content", {}).get("application/json")
    if content is not None:
        types = [v for n, v in case.headers if n == b"content-type"]
        if not types or not types[0].split(b";")[0].strip().endswith(b"json"):
            return False, "body not declared as JSON"
        ok, value = strict_json(case.body)
        if not ok:
            return False, "body not strict JSON"
        if not _valid(content["schema"], value):
            return False, "body not of the schema"
    return True, "valid"


# -- running it -------------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared_app(
    service_urls: dict[str, str],
) -> AsyncIterator[tuple[quart.typing.TestAppProtocol, set[tuple[str, str]]]]:
    """The app with API keys (production's guard), its serving hooks run, on a schema and Redis
    prefix of its own: one for the module, since migrating a schema for each of the ~50
    parametrized cases would cost more than their requests. It notes which rule and method
    each request was routed to."""
    schema, prefix = f"test_{uuid.uuid4().hex[:12]}", f"test:{uuid.uuid4().hex[:12]}:"
    admin = await asyncpg.connect(service_urls["DATABASE_URL"])
    redis = aioredis.Redis.from_url(service_urls["REDIS_URL"])
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        await admin.execute(f'SET search_path TO "{schema}"')
        await migrate(admin)
        app = create_app(
            load_settings(
                database_url=with_search_path(service_urls["DATABASE_URL"], schema),
                redis_url=service_urls["REDIS_URL"],
                redis_prefix=prefix,
                db_pool_min_size=1,
                db_pool_max_size=5,
                **HOSTILE_SETTINGS,
            )
        )
        routed: set[tuple[str, str]] = set()

        async def note_route() -> None:
            if quart_request.url_rule is not None:
                routed.add((quart_request.url_rule.rule, quart_request.method))

        # First of the before_request functions, so a request the guard refuses is noted too.
        app.before_request_funcs.setdefault(None, []).insert(0, note_route)
        async with app.test_app() as test_app:
            yield test_app, routed
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()
        keys = [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


@pytest.fixture
def hostile_app(
    shared_app: tuple[quart.typing.TestAppProtocol, set[tuple[str, str]]],
    request: pytest.FixtureRequest,
) -> Iterator[quart.typing.TestAppProtocol]:
    """The shared app, for one route; the test fails unless that rule and method were
    reached (not only the router's 404s and 405s)."""
    test_app, routed = shared_app
    routed.clear()
    yield test_app
    rule, method = request.node.callspec.params["route"]
    assert (rule.rule, method) in routed, f"{method} {rule.rule} was never routed to"


async def send(test_app: quart.typing.TestAppProtocol, case: Hostile) -> tuple[int, Headers, bytes]:
    """The request as Hypercorn would give it: the scope's path percent-decoded from the raw
    ASCII target, the query string and headers as raw bytes."""
    path = unquote(case.target.decode("ascii"))
    headers = [(b"host", b"localhost"), *case.headers]
    if case.body:
        headers.append((b"content-length", str(len(case.body)).encode()))
    client = cast(QuartClient, test_app.test_client())
    response = await asyncio.wait_for(
        client.open(
            "/",  # the test client would encode the path as ASCII; the scope below is used
            method=case.method,
            data=case.body,
            scope_base={
                "path": path,
                "raw_path": case.target,
                "query_string": case.query,
                "headers": headers,
            },
        ),
        ANSWER_WITHIN,
    )
    body = await response.get_data()
    assert isinstance(body, bytes)
    return response.status_code, response.headers, body


async def check(test_app: quart.typing.TestAppProtocol, rule: Rule, case: Hostile) -> int:
    status, headers, body = await send(test_app, case)
    shown = f"{case.method} {case.target[:200]!r}?{case.query[:200]!r} -> {status} {body[:300]!r}"
    assert status < 500, shown
    assert not TRACEBACK.search(body), shown
    size = header_bytes(
        {
            "raw_path": case.target,
            "query_string": case.query,
            "headers": [(b"host", b"localhost"), *case.headers],
        }
    )
    if size > MAX_HEADER_BYTES:
        assert status == 431, shown
        return status
    assert status != 431, shown
    path = unquote(case.target.decode("ascii"))
    # The guard's policy (service/pipeline/auth.py): only the probes are open.
    scope = required_scope(case.method, path, frozenset(), HOSTILE_CONFIG)
    guarded = scope is not None
    assert guarded == (path not in PROBE_PATHS), shown
    if guarded and case.auth in ("none", "wrong"):
        assert status == 401, shown
    if case.auth == "read" and scope not in (None, "read"):
        assert status == 403, shown
    if status >= 400:
        assert headers.get("Content-Type") == PROBLEM_JSON, shown
        if case.method != "HEAD":
            problem = json.loads(body)
            assert problem["status"] == status, shown
            assert problem["title"], shown
    elif status >= 300:
        pytest.fail(f"a redirect: {shown}")
    else:
        allowed = set(rule.methods or ())
        ok, why = may_succeed(case, _operation(rule, case.method), allowed)
        assert ok, f"{why}: {shown}"
        assert not guarded or case.auth in ("full", "read"), shown
    return status


# The operations whose body, query or headers the description documents: more examples there,
# since that is where the input reaches the handlers (and the database).
WITH_INPUT = [
    (rule, method)
    for rule, method in ROUTES
    if "requestBody" in _operation(rule, method)
    or any(p["in"] in ("query", "header") for p in _operation(rule, method).get("parameters", []))
]
HEALTH_CHECKS = [
    HealthCheck.function_scoped_fixture,
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
]


@pytest.mark.slow  # about 20 s: left out of `make test-fast`; the regressions below stay in
@pytest.mark.parametrize("route", ROUTES, ids=lambda route: f"{route[1]} {route[0].rule}")
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=HEALTH_CHECKS,
)
@given(data=st.data())
@pytest.mark.asyncio(loop_scope="module")
async def test_hostile_requests_get_a_problem_never_a_5xx(
    hostile_app: quart.typing.TestAppProtocol, route: tuple[Rule, str], data: st.DataObject
) -> None:
    rule, method = route
    case = data.draw(hostile_request(rule, method), label="request")
    await check(hostile_app, rule, case)


@pytest.mark.slow  # about 20 s: left out of `make test-fast`; the regressions below stay in
@pytest.mark.parametrize("route", WITH_INPUT, ids=lambda route: f"{route[1]} {route[0].rule}")
@settings(
    max_examples=INPUT_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=HEALTH_CHECKS,
)
@given(data=st.data())
@pytest.mark.asyncio(loop_scope="module")
async def test_hostile_input_to_the_routes_that_read_it_gets_a_problem_never_a_5xx(
    hostile_app: quart.typing.TestAppProtocol, route: tuple[Rule, str], data: st.DataObject
) -> None:
    rule, method = route
    case = data.draw(hostile_request(rule, method), label="request")
    await check(hostile_app, rule, case)


# -- What it found, kept as plain tests (the app with keys off, as in test_users.py) ----------


async def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, await response.get_data()
    assert response.content_type == PROBLEM_JSON
    body: dict[str, Any] = await response.get_json()
    assert body["status"] == status
    return body


JSON_TYPE = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/users"), ("PATCH", "/users/1"), ("POST", "/tasks")]
)
async def test_a_deeply_nested_body_is_a_400_not_a_500(
    client: quart.typing.TestClientProtocol, method: str, path: str
) -> None:
    # Python's json module raised RecursionError, which reached the client as a 500.
    for body in (b"[" * 30_000 + b"]" * 30_000, b'{"n":' * 5_000 + b"1" + b"}" * 5_000):
        response = await cast(QuartClient, client).open(
            path, method=method, data=body, headers=JSON_TYPE
        )
        problem = await assert_problem(response, 400)
        assert "nested too deeply" in problem["detail"]


async def test_the_nesting_limit_is_the_services_own_on_every_python(
    client: quart.typing.TestClientProtocol,
) -> None:
    # Python's own limit moves with the version (3.13 parses 5,000 levels, 3.11 not 1,000):
    # the service's is MAX_JSON_DEPTH wherever it runs, and a bracket in a string is no level.
    deepest = b'{"n":' * MAX_JSON_DEPTH + b"1" + b"}" * MAX_JSON_DEPTH
    answer = await client.post("/tasks", data=deepest, headers=JSON_TYPE)
    assert "nested too deeply" not in (await answer.get_data(as_text=True))
    assert answer.status_code == 422  # parsed, then refused by the schema
    quoted = b'{"n": 5, "x": "' + b"[" * 1000 + b'"}'
    answer = await client.post("/tasks", data=quoted, headers=JSON_TYPE)
    assert "nested too deeply" not in (await answer.get_data(as_text=True))
    over = b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)
    problem = await assert_problem(await client.post("/tasks", data=over, headers=JSON_TYPE), 400)
    assert "nested too deeply" in problem["detail"]


async def test_a_repeated_key_in_a_body_is_a_400_not_the_last_value_kept(
    client: quart.typing.TestClientProtocol, db: asyncpg.Connection
) -> None:
    # It was a 201 for the last "name": a proxy that keeps the first would see another user.
    body = b'{"email": "twice@example.com", "name": "First", "name": "Second"}'
    problem = await assert_problem(await client.post("/users", data=body, headers=JSON_TYPE), 400)
    assert "'name' is given twice" in problem["detail"]
    assert await db.fetchval("SELECT count(*) FROM users") == 0


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_nan_and_infinity_are_not_json_and_are_a_400(
    client: quart.typing.TestClientProtocol, constant: str
) -> None:
    body = f'{{"n": {constant}}}'.encode()
    problem = await assert_problem(await client.post("/tasks", data=body, headers=JSON_TYPE), 400)
    assert constant.lstrip("-") in problem["detail"]


async def test_a_number_of_over_4300_digits_is_a_400_that_says_so(
    client: quart.typing.TestClientProtocol,
) -> None:
    # It was a bare 400 ("The browser (or proxy) sent a request that this server could not
    # understand"): Python refuses to convert so many digits.
    body = b'{"n": ' + b"9" * 5_000 + b"}"
    problem = await assert_problem(await client.post("/tasks", data=body, headers=JSON_TYPE), 400)
    assert "over 4300 digits" in problem["detail"]


@pytest.mark.parametrize("query", ["email==%ff%fe", "email=a%c3%28@example.com", "n=%ff"])
async def test_a_query_string_that_is_not_utf8_is_a_400_not_searched_for(
    client: quart.typing.TestClientProtocol, query: str
) -> None:
    # `?email=%ff%fe` was a 200: Werkzeug decoded it as U+FFFD and the service searched for that.
    path = "/heavy-task" if query.startswith("n=") else "/users"
    problem = await assert_problem(await client.get(f"{path}?{query}"), 400)
    assert "UTF-8" in problem["detail"]
    assert "400" in DESCRIPTION["paths"][path]["get"]["responses"]


@pytest.mark.parametrize("path", ["/users//1", "/tasks//..", "/users/1//"])
async def test_a_path_with_double_slashes_is_a_404_not_a_redirect(
    client: quart.typing.TestClientProtocol, path: str
) -> None:
    # It was a 308, an HTML page, to a Location built from the client's Host header.
    response = await client.get(path, headers={"Host": "evil.example"})
    await assert_problem(response, 404)
    assert "Location" not in response.headers
