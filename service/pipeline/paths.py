"""A path that begins with ``//`` names no route.

Werkzeug strips the leading slashes of a path, both in the request (``request.path``) and in
its matcher (``MapAdapter.match``), so ``//users/1`` was served as ``/users/1``, and a DELETE on
it deleted the user; ``merge_slashes = False`` (service/framework/__init__.py) covers ``//``
inside a path only. The path read here is the server's, in the ASGI scope: percent-decoded by
Hypercorn, so ``/%2Fusers/1`` is refused too, over HTTP/1.1 and HTTP/2 alike.
"""

from __future__ import annotations

from werkzeug.exceptions import NotFound

from service.pipeline.state import RequestState, Setup


def refuse_leading_double_slash(setup: Setup, state: RequestState) -> None:
    """A 404, as for any path no route serves, before the key is looked at: whatever the
    method and the key, nothing behind such a path is reached."""
    current = state.request
    if current.scope["path"].startswith("//"):
        # Logged and counted as what it is, a request that matched no route.
        current.url_rule = None
        current.view_args = None
        raise NotFound()
