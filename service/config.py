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

    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    readiness_timeout: float = Field(default=1.0, gt=0)

    # Tasks (arq): the API's limits and the worker's settings.
    task_max_n: int = Field(default=10**9, ge=1)
    # Outstanding tasks (queued or running) beyond which submissions get 503.
    task_queue_limit: int = Field(default=100, ge=1)
    task_retry_after: int = Field(default=5, ge=1)
    # How long GET /heavy-task waits for the result before answering 202.
    task_wait: float = Field(default=30.0, ge=0)
    # A computation running longer is ended (its child process killed) and the task fails.
    task_timeout: float = Field(default=120.0, gt=0)
    task_result_ttl: int = Field(default=24 * 3600, ge=60)
    task_max_tries: int = Field(default=3, ge=1)
    # Child processes computing tasks in each worker; 0 means one per core.
    worker_processes: int = Field(default=0, ge=0, le=256)
    # arq polls the queue; 0.5 s (its default) would add 250 ms to every small task.
    worker_poll_delay: float = Field(default=0.02, gt=0, le=5)
    worker_health_interval: int = Field(default=5, ge=1)
    # On SIGTERM, running jobs get this long to finish before they are cut off (and retried).
    worker_shutdown_grace: int = Field(default=30, ge=0)

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
