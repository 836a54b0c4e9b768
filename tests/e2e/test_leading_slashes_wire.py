"""A path that begins with ``//`` over the wire: Hypercorn with hypercorn.toml and API keys,
HTTP/1.1 and HTTP/2 (prior knowledge), the path sent as written (``curl --path-as-is``). Every
method gets a 404 problem, whatever the key, and nothing behind the path is reached; the same
path with one slash is still served, and still guarded."""

from __future__ import annotations

import httpx
import pytest

from service.config import Settings
from service.errors import PROBLEM_JSON
from service.ops.keygen import generate_key, key_entry
from tests.support.worker_procs import settings_env
from tools.hypercorn_process import hypercorn
from tools.private_servers import free_port

KEYS = {"reader": generate_key(), "admin": generate_key()}
SCOPES = {"reader": ("read",), "admin": ("read", "write", "admin")}
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# As sent: `/%2F` is decoded by Hypercorn to `//` in the path the app sees.
PATHS = ["//users/1", "//users", "///users/1", "//metrics", "//healthz", "/%2Fusers/1"]


def auth(name: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"} if name else {}


def send(client: httpx.Client, method: str, url: str, headers: dict[str, str]) -> httpx.Response:
    # A body wherever a route reads one: served, it would change the user. (Over HTTP/2 all
    # on one connection: each refusal reads the body first, so the connection lives on;
    # service/errors.py says why.)
    if method in ("POST", "PUT", "PATCH"):
        return client.request(method, url, headers=headers, json={"name": "Changed"})
    return client.request(method, url, headers=headers)


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/2"])
def test_a_leading_double_slash_is_a_404_on_every_method_over_the_wire(
    settings: Settings, version: str
) -> None:
    env = settings_env(settings, api_keys=",".join(key_entry(n, KEYS[n], SCOPES[n]) for n in KEYS))
    http2 = version == "HTTP/2"
    with (
        hypercorn(free_port(), env, "--workers", "0") as (base_url, _),
        httpx.Client(http1=not http2, http2=http2, timeout=10) as client,
    ):
        user = client.post(
            f"{base_url}/users",
            json={"email": "ada@example.com", "name": "Ada"},
            headers=auth("admin"),
        ).json()
        for key in ("reader", "admin", None):
            for method in METHODS:
                for path in PATHS:
                    response = send(client, method, f"{base_url}{path}", auth(key))
                    shown = (key, method, path, response.status_code, response.text[:200])
                    assert response.http_version == version, shown
                    assert response.status_code == 404, shown
                    if method != "HEAD":
                        assert response.headers["content-type"] == PROBLEM_JSON, shown
                        assert response.json()["status"] == 404, shown
        # Nothing was changed or deleted; with one slash the routes and their guards are as
        # before: a read key is refused the metrics, and reads the user.
        assert client.get(f"{base_url}/users/1", headers=auth("reader")).json() == user
        assert client.get(f"{base_url}/metrics", headers=auth("reader")).status_code == 403
        assert client.get(f"{base_url}/metrics", headers=auth("admin")).status_code == 200


def test_refusals_of_a_body_over_http2_leave_the_connection_serving(settings: Settings) -> None:
    """Every refusal reads the body first over HTTP/2 (service/errors.py): before, the next
    request on the connection met `Server disconnected` (pgjones/hypercorn#329)."""
    env = settings_env(settings, api_keys=",".join(key_entry(n, KEYS[n], SCOPES[n]) for n in KEYS))
    admin = auth("admin")
    with (
        hypercorn(free_port(), env, "--workers", "0") as (base_url, _),
        httpx.Client(http1=False, http2=True, timeout=10) as client,
    ):
        as_text, as_json = {"content-type": "text/plain"}, {"content-type": "application/json"}
        user = {"email": "a@example.com", "name": "A"}
        refusals = [
            (client.build_request("POST", f"{base_url}/users", json=user), 401),
            (client.build_request("POST", f"{base_url}/nowhere", json=user, headers=admin), 404),
            (client.build_request("POST", f"{base_url}//users", json=user, headers=admin), 404),
            (client.build_request("PUT", f"{base_url}/users", json=user, headers=admin), 405),
            (client.build_request("POST", f"{base_url}/users", content=b"x=1",
                                  headers={**admin, **as_text}), 415),
            (client.build_request("POST", f"{base_url}/users", content=b"{",
                                  headers={**admin, **as_json}), 400),
            (client.build_request("POST", f"{base_url}/users", json={"email": "nope"},
                                  headers=admin), 422),
        ]  # fmt: skip
        for _ in range(5):
            for request, status in refusals:
                response = client.send(request)
                shown = (request.method, request.url.raw_path)
                assert (response.http_version, response.status_code) == ("HTTP/2", status), shown
            assert client.get(f"{base_url}/healthz").status_code == 200
