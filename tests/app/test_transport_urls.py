"""DATABASE_URL and REDIS_URL with TLS and passwords: accepted by the settings, used by the app."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.app import create_app
from service.config import ConfigError, Settings, load_settings
from tests.conftest import free_port


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:s3cret@db.internal:5432/app?sslmode=require",
        "postgresql://app:s3cret@db.internal/app?sslmode=verify-full&sslrootcert=/etc/ca.pem",
        "postgres://app@db.internal/app?sslmode=disable",
    ],
)
def test_database_url_accepts_passwords_and_sslmode(url: str) -> None:
    assert load_settings(database_url=url).database_url == url


def test_database_url_rejects_an_unknown_sslmode_without_echoing_the_url() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(database_url="postgresql://app:s3cret@db/app?sslmode=required")
    assert "DATABASE_URL" in str(caught.value)
    assert "verify-full" in str(caught.value)
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "rediss://cache.internal:6380/0",
        "rediss://:s3cret@cache.internal:6380/0?ssl_cert_reqs=required",
        "redis://:s3cret@cache.internal:6379/0",
        "redis://app:s3cret@cache.internal:6379/1",
    ],
)
def test_redis_url_accepts_tls_and_passwords(url: str) -> None:
    assert load_settings(redis_url=url).redis_url == url


def test_a_cors_origin_with_a_path_stops_the_start() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(cors_allow_origins="https://app.example.com/path")
    assert "CORS_ALLOW_ORIGINS" in str(caught.value)
    allowed = "https://app.example.com, http://localhost:3000"
    assert load_settings(cors_allow_origins=allowed).cors_allow_origins == allowed


async def test_the_app_connects_to_postgres_with_an_sslmode_in_the_url(
    settings: Settings,
) -> None:
    # `prefer` uses TLS where the server offers it and plain TCP where not: both work here.
    with_mode = settings.model_copy(
        update={"database_url": settings.database_url + "&sslmode=prefer"}
    )
    async with create_app(with_mode).test_app() as test_app:
        body = await (await test_app.test_client().get("/readyz")).get_json()
    assert body["checks"]["postgres"] == "ok"


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A private redis-server on a free port that requires a password; stopped afterwards."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    port, password = free_port(), "s3cret-pw"
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password,
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = redis.Redis(port=port, password=password, socket_timeout=1)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.close()
        yield port, password
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.slow
async def test_the_app_authenticates_to_redis_with_the_password_in_the_url(
    settings: Settings, redis_with_password: tuple[int, str]
) -> None:
    port, password = redis_with_password
    for url, expected in (
        (f"redis://:{password}@127.0.0.1:{port}/0", "ok"),
        (f"redis://:wrong@127.0.0.1:{port}/0", "unavailable"),
    ):
        configured = settings.model_copy(update={"redis_url": url})
        async with create_app(configured).test_app() as test_app:
            body = await (await test_app.test_client().get("/readyz")).get_json()
        assert body["checks"]["redis"].startswith(expected), url
