"""Who may call what: API keys with scopes.

The policy is decided from the request, not declared on each route, so a route added anywhere
is covered the moment it exists: the method gives the scope (``read`` for GET, HEAD and
OPTIONS, ``write`` for POST, PUT, PATCH and DELETE, ``admin`` for anything else), a few paths
need ``admin`` whatever the method (metrics, profiling, the docs when not public), and only the
probes are open. Two steps of the pipeline (service/pipeline/__init__.py) apply it:
:func:`identify` finds the scope and the key, and, after the rate limiter has counted the
request, :func:`judge` refuses it when the key is missing, wrong, or lacks the scope.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Mapping

from quart import request

from service.backends.resources import Resources
from service.config import ApiKey, Settings
from service.contract import METHODS, PROBE_PATHS, READ_METHODS
from service.errors import APIError
from service.pipeline.state import RequestState, Setup, header

log = logging.getLogger(__name__)

DOCS_PATHS = frozenset({"/docs", "/openapi.json"})
# Paths at or under these need the admin scope, whatever the method.
ADMIN_PATH_PREFIXES = ("/metrics", "/debug", "/profile", "/profiling", "/admin")
# Opt-in profiling (`X-Profile-Token`, pipeline/profiling.py) changes no scope here: a request
# with a wrong token, or from a key without admin, is served as usual, so nothing reveals that
# profiling exists; only an admin key's request that carries the token is profiled.
METHOD_SCOPES: Mapping[str, str] = {
    method: "read" if method in READ_METHODS else "write" for method in sorted(METHODS)
}
# Any method not in the table (TRACE, CONNECT, extensions) needs the strongest scope.
OTHER_METHOD_SCOPE = "admin"
# GET /heavy-task (the Flask route, kept as a GET) enqueues work like POST /tasks does.
WRITE_PATHS = frozenset({"/heavy-task"})

REALM = 'Bearer realm="api"'
_NO_NAMES: frozenset[str] = frozenset()


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
    if path in PROBE_PATHS:
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


async def warn_when_open(held: Resources) -> None:
    """A serving hook: say loudly that a service without keys is open to anyone.

    At serving time, not in create_app: Hypercorn configures logging (JSON lines) after it has
    loaded the app, and this line should look like every other.
    """
    settings = held.settings
    if settings.api_keys:
        return
    log.warning(
        "!!! NO API KEYS CONFIGURED: every route is OPEN to anyone who can reach this "
        "service (ENVIRONMENT=%s). Set API_KEYS (`python -m service keygen`) before "
        "exposing it; ENVIRONMENT=production refuses to start without them. !!!",
        settings.environment,
    )


def identify(setup: Setup, state: RequestState) -> None:
    """The scope the request needs and the key it carries (judged later, by :func:`judge`)."""
    settings = setup.resources.settings
    current = state.request
    path = current.path
    if path in DOCS_PATHS and not settings.docs_served:
        raise APIError(404, "The API description is not served here (DOCS_ENABLED).")
    method = current.method
    # The header names matter only to a CORS preflight (OPTIONS): not gathered for the rest.
    names = (
        frozenset(name.decode("latin-1") for name in state.raw_headers)
        if method == "OPTIONS"
        else _NO_NAMES
    )
    scope = required_scope(method, path, names, settings)
    enforced = bool(settings.api_keys)
    # Open paths are served without looking at a key: profiling them needs keys off too.
    state.admin = not enforced
    state.scope = scope
    if scope is None:
        return
    key = find_key(header(state, b"authorization"), settings.api_keys)
    state.key = key
    state.admin = not enforced or (key is not None and "admin" in key.scopes)


def judge(setup: Setup, state: RequestState) -> None:
    """401 without a valid key, 403 for a key without the scope; nothing when keys are off."""
    scope = state.scope
    if scope is None or not setup.resources.settings.api_keys:
        return
    key = state.key
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
