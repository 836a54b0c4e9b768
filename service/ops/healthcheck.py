"""Container health probe without curl: ``python -m service healthcheck`` exits 0 on a 200.

The URL is ``HEALTHCHECK_URL`` (default ``http://127.0.0.1:8000/healthz``, the port that
hypercorn.toml binds); set it when the server is bound elsewhere.
"""

from __future__ import annotations

import os
import sys
import urllib.request

from service.contract import LIVENESS_PATH

DEFAULT_URL = f"http://127.0.0.1:8000{LIVENESS_PATH}"


def main() -> int:
    """0 when the URL answers 200, 1 when it answers otherwise or not at all, 2 for a bad URL."""
    url = os.environ.get("HEALTHCHECK_URL", DEFAULT_URL)
    if not url.startswith(("http://", "https://")):
        print(f"HEALTHCHECK_URL must be an http(s) URL, not {url!r}", file=sys.stderr)
        return 2
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (scheme checked)
            status: int = response.status
    except OSError as error:
        print(f"{url}: {error}", file=sys.stderr)
        return 1
    return 0 if status == 200 else 1
