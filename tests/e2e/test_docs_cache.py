"""The docs page's files behind the admin key, as Hypercorn serves them in production mode: only
the browser may keep them (``Cache-Control: private``), never a shared cache."""

from __future__ import annotations

import re

import httpx

from service.config import Settings
from tests.app.test_auth import bearer
from tests.e2e.test_auth import production_env
from tools.hypercorn_process import hypercorn
from tools.private_servers import free_port


def test_docs_files_behind_the_admin_key_are_cached_privately(settings: Settings) -> None:
    env = production_env(settings, DOCS_ENABLED="true")
    with (
        hypercorn(free_port(), env) as (base_url, _),
        httpx.Client(base_url=base_url, timeout=10) as http,
    ):
        page = http.get("/docs", headers=bearer("admin"))
        assert page.status_code == 200
        sources = re.findall(r'src="(/docs/assets/[^"]+)"', page.text)
        sources += re.findall(r'href="(/docs/assets/[^"]+)"', page.text)
        assert len(sources) == 3, page.text
        other_release = "/docs/assets/0123456789abcdef/" + sources[0].rsplit("/", 1)[1]
        for source in [*sources, other_release]:
            assert http.get(source).status_code == 401
            served = http.get(source, headers=bearer("admin"))
            assert served.status_code == 200, source
            assert served.headers["Cache-Control"].startswith("private, "), source
            again = http.get(
                source, headers={**bearer("admin"), "If-None-Match": served.headers["ETag"]}
            )
            assert again.status_code == 304, source
            assert again.headers["Cache-Control"].startswith("private, "), source
