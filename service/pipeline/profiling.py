"""Opt-in profiling: a request carrying ``X-Profile-Token`` (PROFILING_TOKEN) from an admin
key is answered with its pyinstrument profile, as HTML, instead of its response."""

from __future__ import annotations

import hmac

from pyinstrument import Profiler
from quart import Response, request

from service.config import Settings
from service.pipeline.state import RequestState, Setup

PROFILE_HEADER = "X-Profile-Token"


def _wants_profile(settings: Settings, state: RequestState) -> bool:
    if settings.profiling_token is None:
        return False
    given = request.headers.get(PROFILE_HEADER)
    if not given:
        return False
    expected = settings.profiling_token.get_secret_value()
    # Profiling is admin work: with API keys enforced, only an admin key's request is profiled
    # (auth.identify sets the flag); any other is served as usual, revealing nothing.
    return hmac.compare_digest(given.encode(), expected.encode()) and state.admin


def start_profile(setup: Setup, state: RequestState) -> None:
    """Profile the request when it carries the profiling token (and may: see _wants_profile)."""
    if _wants_profile(setup.resources.settings, state):
        profiler = Profiler(async_mode="enabled")
        profiler.start()
        state.profiler = profiler


def finish_profile(setup: Setup, state: RequestState, response: Response) -> Response:
    """Answer the profile (HTML) instead of the response, for a profiled request."""
    profiler, state.profiler = state.profiler, None
    if profiler is None:
        return response
    profiler.stop()
    return Response(profiler.output_html(), status=200, content_type="text/html")


def stop_profile(setup: Setup, state: RequestState) -> None:
    """At teardown: a profile still running (the request was cancelled) is stopped."""
    profiler, state.profiler = state.profiler, None
    if profiler is not None and profiler.is_running:
        profiler.stop()
