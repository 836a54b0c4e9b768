"""One typed settings object, read from the environment once and shared with the workers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(SystemExit):
    """A setting has a bad value; the message names the environment variable."""


class Settings(BaseSettings):
    """Every knob of the service. Each field is read from the upper-case variable of its name."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    environment: Literal["development", "production"] = "development"

    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    db_pool_min_size: int = Field(default=2, ge=0, le=1000)
    db_pool_max_size: int = Field(default=10, ge=1, le=1000)
    # Without a timeout, pool.acquire() waits forever when every connection is busy.
    db_acquire_timeout: float = Field(default=5.0, gt=0)
    db_connect_timeout: float = Field(default=5.0, gt=0)
    db_statement_timeout_ms: int = Field(default=10_000, ge=0)

    redis_url: str = "redis://127.0.0.1:6379/0"
    # redis-py sets no socket timeouts by default and its default pool raises when full.
    redis_pool_max_size: int = Field(default=50, ge=1, le=10_000)
    redis_pool_timeout: float = Field(default=2.0, gt=0)
    redis_socket_timeout: float = Field(default=1.0, gt=0)
    redis_connect_timeout: float = Field(default=1.0, gt=0)
    # Every key the service and its workers write starts with this, so deployments (and
    # tests) can share one Redis.
    redis_prefix: str = Field(default="svc:", min_length=1, max_length=64)

    # The cached report of GET /expensive-operation (service/cache.py, service/reports.py).
    cache_ttl: float = Field(default=600.0, gt=0)
    # Each stored value lives cache_ttl less up to this fraction of it, at random.
    cache_ttl_jitter: float = Field(default=0.1, ge=0, lt=1)
    # The single-flight lock expires after this long even if its owner dies; keep it above the
    # report's computing time (itself bounded by DB_STATEMENT_TIMEOUT_MS per query).
    cache_lock_ttl: float = Field(default=30.0, gt=0)
    # How long a request waits for another process's computation before computing itself.
    cache_lock_wait: float = Field(default=10.0, gt=0)
    # Each cache command's bound; after a failure Redis is skipped for cache_retry_interval.
    cache_redis_timeout: float = Field(default=0.5, gt=0)
    cache_retry_interval: float = Field(default=5.0, gt=0)
    cache_outage_log_interval: float = Field(default=60.0, gt=0)
    report_window_days: int = Field(default=30, ge=1, le=3660)
    report_top_domains: int = Field(default=10, ge=1, le=1000)

    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    readiness_timeout: float = Field(default=1.0, gt=0)

    @field_validator("database_url")
    @classmethod
    def _postgres_scheme(cls, value: str) -> str:
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value


def load_settings(**overrides: object) -> Settings:
    """Read the settings from the environment, with ``overrides`` taking precedence.

    A bad value raises :class:`ConfigError` whose message names the variable (but not its
    value, which may hold a password), so a start with a typo stops at once and says where.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        problems = [
            f"{str(item['loc'][0]).upper() if item['loc'] else '?'}: {item['msg']}"
            for item in error.errors()
        ]
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
