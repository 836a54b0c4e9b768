"""Who may call what: API keys with scopes, rate limits, CORS and response headers.

The policy is decided from the request, not declared on each route, so a route added anywhere
is covered the moment it exists: the method gives the scope (``read`` for GET and HEAD,
``write`` for POST, PUT, PATCH and DELETE, ``admin`` for anything else), a few paths need
``admin`` whatever the method (metrics, profiling, the docs when not public), and only the
health checks are open. Install it with ``install(app, settings)`` from ``create_app``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Mapping

from quart import Quart, Response, current_app, g, request

from service.apikeys import ApiKey, parse_api_keys
from service.config import Settings, split_list
from service.errors import APIError
from service.pipeline.ratelimit import RateLimiter

log = logging.getLogger(__name__)

# Probes of orchestrators and load balancers: never a key, never a rate limit.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
DOCS_PATHS = frozenset({"/docs", "/openapi.json"})
# Paths at or under these need the admin scope, whatever the method.
ADMIN_PATH_PREFIXES = ("/metrics", "/debug", "/profile", "/profiling", "/admin")
# Opt-in profiling (`X-Profile-Token`, pipeline/instrument.py) changes no scope here: a request
# with a wrong token, or from a key without admin, is served as usual, so nothing reveals that
# profiling exists; observe profiles only an admin key's request that carries the token.
METHOD_SCOPES: Mapping[str, str] = {
    "GET": "read",
    "HEAD": "read",
    "OPTIONS": "read",
    "POST": "write",
    "PUT": "write",
    "PATCH": "write",
    "DELETE": "write",
}
# Any method not in the table (TRACE, CONNECT, extensions) needs the strongest scope.
OTHER_METHOD_SCOPE = "admin"
# GET /heavy-task (the Flask route, kept as a GET) enqueues work like POST /tasks does.
WRITE_PATHS = frozenset({"/heavy-task"})

CORS_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"]
CORS_EXPOSED = ["Location", "Retry-After", "RateLimit", "RateLimit-Policy", "X-Request-ID"]
REALM = 'Bearer realm="api"'


def _at_or_under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def required_scope(
    method: str,
    path: str,
    header_names: frozenset[str],
    settings: Settings,
) -> str | None:
    """The scope a request needs, or None when it is open to anyone.

    ``header_names`` are lower-case. This is the whole policy; a test walks every route with it.
    """
    if path in OPEN_PATHS:
        return None
    if path in DOCS_PATHS or _at_or_under(path, "/docs"):
        return None if settings.docs_public else "admin"
    if any(_at_or_under(path, prefix) for prefix in ADMIN_PATH_PREFIXES):
        return "admin"
    if path in WRITE_PATHS and method in ("GET", "HEAD"):
        return "write"
    if (
        method == "OPTIONS"
        and settings.cors_allow_origins
        and "access-control-request-method" in header_names
    ):
        # A browser's CORS preflight never carries credentials; it learns only the CORS policy.
        return None
    return METHOD_SCOPES.get(method, OTHER_METHOD_SCOPE)


def find_key(authorization: str | None, keys: tuple[ApiKey, ...]) -> ApiKey | None:
    """The configured key a ``Bearer`` header carries, or None.

    Every configured digest is compared, in constant time, so the time taken says nothing about
    which key or how much of one matched.
    """
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    digest = hashlib.sha256(token.encode()).digest()
    found = None
    for key in keys:
        if hmac.compare_digest(digest, key.digest):
            found = key
    return found


def install(app: Quart, settings: Settings) -> None:
    """Guard every request of ``app``: keys and scopes, rate limits, CORS, headers."""
    keys = parse_api_keys(settings.api_keys)
    enforced = bool(keys)
    limiter = RateLimiter(settings) if settings.rate_limited else None
    if not enforced:

        @app.before_serving
        async def _warn_open() -> None:
            # At serving time, not in create_app: Hypercorn configures logging (JSON lines)
            # after it has loaded the app, and this line should look like every other.
            log.warning(
                "!!! NO API KEYS CONFIGURED: every route is OPEN to anyone who can reach this "
                "service (ENVIRONMENT=%s). Set API_KEYS (`python -m service keygen`) before "
                "exposing it; ENVIRONMENT=production refuses to start without them. !!!",
                settings.environment,
            )

    @app.before_request
    async def _guard() -> None:
        path = request.path
        if path in DOCS_PATHS and not settings.docs_served:
            raise APIError(404, "The API description is not served here (DOCS_ENABLED).")
        scope = required_scope(
            request.method,
            path,
            frozenset(name.lower() for name in request.headers.keys()),  # noqa: SIM118
            settings,
        )
        # Open paths are served without looking at a key: profiling them needs keys off too.
        g.api_key_admin = not enforced
        if scope is None:
            return
        key = find_key(request.headers.get("Authorization"), keys)
        g.api_key_name = key.name if key else None
        g.api_key_admin = not enforced or (key is not None and "admin" in key.scopes)
        redis_client = current_app.extensions.get("redis")
        if limiter is not None and redis_client is not None:
            # Counted before the key is judged, so a flood of bad keys is limited too.
            identity = f"key:{key.name}" if key else f"addr:{request.remote_addr or '-'}"
            verdict = await limiter.hit(redis_client, scope, identity)
            if verdict is not None:
                g.rate_limit_headers = verdict.headers()
                if not verdict.allowed:
                    raise APIError(
                        429,
                        f"Over the limit of {verdict.limit} {scope} requests per "
                        f"{verdict.window} s; retry after {verdict.reset} s.",
                        headers={"Retry-After": str(verdict.reset), **verdict.headers()},
                    )
        if not enforced:
            return
        if key is None:
            if not request.headers.get("Authorization"):
                detail, challenge = "Send an API key as `Authorization: Bearer <key>`.", REALM
            else:
                detail, challenge = "The API key is not valid.", f'{REALM}, error="invalid_token"'
            raise APIError(401, detail, headers={"WWW-Authenticate": challenge})
        if scope not in key.scopes:
            challenge = f'{REALM}, error="insufficient_scope", scope="{scope}"'
            raise APIError(
                403,
                f"This API key lacks the {scope!r} scope this request needs.",
                headers={"WWW-Authenticate": challenge},
            )

    @app.after_request
    async def _exposure_headers(response: Response) -> Response:
        # Responses carry users' data: no shared or browser cache may keep them, unless a
        # route says otherwise.
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        for name, value in g.get("rate_limit_headers", {}).items():
            response.headers.setdefault(name, value)
        return response

    origins = split_list(settings.cors_allow_origins)
    if origins:
        import quart_cors

        quart_cors.cors(
            app,
            allow_origin=origins,
            allow_headers=CORS_HEADERS,
            allow_methods=sorted(METHOD_SCOPES),
            expose_headers=CORS_EXPOSED,
            allow_credentials=False,
            max_age=600,
        )
