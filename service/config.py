"""One typed settings object, read from the environment once and shared with the workers."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Annotated, Literal, Self
from urllib.parse import parse_qs, urlsplit

from pydantic import (
    Field,
    PlainSerializer,
    PlainValidator,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Seconds the client waits past DB_STATEMENT_TIMEOUT_MS before it gives up on a query.
DB_COMMAND_MARGIN = 1.0
# The statements one report computation runs (sql/reports.sql, in one transaction).
REPORT_STATEMENTS = 3
# Seconds the cache lock outlives the report's worst case, for the store and the release.
CACHE_LOCK_MARGIN = 5.0
# Without a statement timeout the report has no worst case: these stand in.
CACHE_LOCK_TTL_UNBOUNDED = 30.0
CACHE_LOCK_WAIT_UNBOUNDED = 10.0

_DEVELOPMENT_TASK_ID_SECRET = "development-only-task-id-secret"  # noqa: S105 (refused in production)
_PG_SSLMODES = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})


# -- API_KEYS: the configured keys, as hashes (a key itself is made by service/ops/keygen.py) --

SCOPES = ("read", "write", "admin")

_KEY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_KEY_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ApiKey:
    """One configured key: a name (for logs and rate limits), its SHA-256 digest, its scopes.

    A key is 32 random bytes, so an unsalted SHA-256 of it cannot be reversed or guessed; the
    configuration holds only that hash, never the key."""

    name: str
    digest: bytes = field(repr=False)
    scopes: frozenset[str]


def format_api_keys(keys: tuple[ApiKey, ...]) -> str:
    """The ``API_KEYS`` text of parsed keys: the inverse of :func:`parse_api_keys`."""
    return ",".join(
        f"{key.name}:{key.digest.hex()}:{'+'.join(s for s in SCOPES if s in key.scopes)}"
        for key in keys
    )


def parse_api_keys(value: str) -> tuple[ApiKey, ...]:
    """Parse ``API_KEYS``: comma-separated ``name:sha256hex:scope+scope`` entries.

    Raises ValueError saying which entry is wrong (by position and name, never echoing a hash).
    """
    keys: list[ApiKey] = []
    seen: set[str] = set()
    for position, raw in enumerate(value.split(","), start=1):
        entry = raw.strip()
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) != 3:
            raise ValueError(f"entry {position} is not name:sha256hex:scope+scope")
        name, digest, scope_text = (part.strip() for part in parts)
        if not _KEY_NAME.fullmatch(name):
            raise ValueError(f"entry {position}: the name must be 1-64 of A-Z a-z 0-9 _ . -")
        if name in seen:
            raise ValueError(f"entry {position}: the name {name!r} is used twice")
        if not _KEY_HEX.fullmatch(digest.lower()):
            raise ValueError(
                f"entry {position} ({name}): the hash must be 64 hex digits (SHA-256 of the key)"
            )
        scopes = frozenset(scope.strip() for scope in scope_text.split("+") if scope.strip())
        unknown = scopes - set(SCOPES)
        if not scopes or unknown:
            raise ValueError(
                f"entry {position} ({name}): scopes must be some of {'+'.join(SCOPES)}"
            )
        seen.add(name)
        keys.append(ApiKey(name=name, digest=bytes.fromhex(digest), scopes=scopes))
    return tuple(keys)


def _api_keys(value: object) -> tuple[ApiKey, ...]:
    if isinstance(value, str):
        return parse_api_keys(value)
    if isinstance(value, tuple | list) and all(isinstance(key, ApiKey) for key in value):
        return tuple(value)
    raise ValueError("must be comma-separated name:sha256hex:scope+scope entries")


# Read as text (`name:sha256hex:scope+scope,...`), held parsed; dumped back as the same text.
ApiKeys = Annotated[
    tuple[ApiKey, ...],
    NoDecode,
    PlainValidator(_api_keys),
    PlainSerializer(format_api_keys, return_type=str),
]


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(value: object) -> tuple[Network, ...]:
    if isinstance(value, tuple | list) and all(
        isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network) for item in value
    ):
        return tuple(value)
    if not isinstance(value, str):
        raise ValueError("must be comma-separated IP addresses or networks")
    found = []
    for item in split_list(value):
        try:
            found.append(ipaddress.ip_network(item))  # an address is a /32 (or /128) network
        except ValueError as error:
            raise ValueError(
                f"each entry must be an IP address or network (10.0.0.0/8, 127.0.0.1, ::1); "
                f"{item!r} is not: {error}"
            ) from None
    return tuple(found)


def _format_networks(networks: tuple[Network, ...]) -> str:
    return ",".join(str(network) for network in networks)


# Read as text (`10.0.0.0/8,127.0.0.1`), held parsed; dumped back as the same text.
Networks = Annotated[
    tuple[Network, ...],
    NoDecode,
    PlainValidator(_networks),
    PlainSerializer(_format_networks, return_type=str),
]


class ConfigError(SystemExit):
    """A setting has a bad value; the message names the environment variable."""


class Settings(BaseSettings):
    """Every knob of the service. Each field is read from the upper-case variable of its name."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    environment: Literal["development", "production"] = "development"
    # Log lines: JSON, or one readable line per event; auto is text on a terminal outside
    # production, JSON otherwise. Read by service/obs/logs.py before the settings are (so a
    # bad setting is logged too); validated here.
    log_format: Literal["auto", "json", "text"] = "auto"

    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    db_pool_min_size: int = Field(default=2, ge=0, le=1000)
    db_pool_max_size: int = Field(default=10, ge=1, le=1000)
    # Without a timeout, pool.acquire() waits forever when every connection is busy.
    db_acquire_timeout: float = Field(default=5.0, gt=0)
    db_connect_timeout: float = Field(default=5.0, gt=0)
    # Enforced by PostgreSQL; 0 turns it off (and with it the client's bound, below).
    db_statement_timeout_ms: int = Field(default=10_000, ge=0)

    # DATABASE_URL is a PgBouncer in transaction mode: no statement cache, no session state
    # (PgBouncer sets statement_timeout with its connect_query), and migrations go to
    # DATABASE_DIRECT_URL, since their advisory lock needs one session.
    db_pgbouncer: bool = False
    # PostgreSQL itself, bypassing any pooler: what migrations use when it is set.
    database_direct_url: str | None = None

    redis_url: str = "redis://127.0.0.1:6379/0"
    # redis-py sets no socket timeouts by default and its default pool raises when full.
    redis_pool_max_size: int = Field(default=50, ge=1, le=10_000)
    redis_pool_timeout: float = Field(default=2.0, gt=0)
    redis_socket_timeout: float = Field(default=1.0, gt=0)
    redis_connect_timeout: float = Field(default=1.0, gt=0)
    # Comma-separated host:port of Redis Sentinels; when set, the Redis of REDIS_URL (its
    # password, database number and TLS options still apply) is the primary that these
    # Sentinels name REDIS_SENTINEL_MASTER, followed through failovers.
    redis_sentinels: str = ""
    redis_sentinel_master: str = "mymaster"
    # The service's own keys (queue, health, cache, rate limits) start with this; arq's job
    # keys (arq:job:*, arq:result:*, arq:retry:*, ...) do not, so give each deployment its
    # own Redis database rather than a prefix alone.
    redis_prefix: str = Field(default="svc:", min_length=1, max_length=64)

    # The cached report of GET /expensive-operation (backends/cache.py, routes/reports.py).
    cache_ttl: float = Field(default=600.0, gt=0)
    # Each stored value lives cache_ttl less up to this fraction of it, at random.
    cache_ttl_jitter: float = Field(default=0.1, ge=0, lt=1)
    # The single-flight lock expires after this long even if its owner dies. Unset: the
    # report's worst case (see report_worst_case) plus a margin; set, it must exceed it.
    cache_lock_ttl: float | None = Field(default=None, gt=0)
    # How long a request waits for another process's computation before computing itself.
    # Unset: the report's worst case; set, it must be at least that.
    cache_lock_wait: float | None = Field(default=None, gt=0)
    # Each cache command's bound; after a failure Redis is skipped for cache_retry_interval.
    cache_redis_timeout: float = Field(default=0.5, gt=0)
    cache_retry_interval: float = Field(default=5.0, gt=0)
    cache_outage_log_interval: float = Field(default=60.0, gt=0)
    report_window_days: int = Field(default=30, ge=1, le=3660)
    report_top_domains: int = Field(default=10, ge=1, le=1000)

    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    # Request target plus header names and values, in bytes; larger gets 431. hypercorn.toml
    # sets the same for its own buffers.
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    readiness_timeout: float = Field(default=1.0, gt=0)
    # Concurrent /readyz probes in one process share one check, and its result for this long.
    readiness_cache: float = Field(default=1.0, ge=0)

    # Tasks (arq): the API's limits and the worker's settings.
    # About 10 s of one core for the largest sum: well within TASK_TIMEOUT.
    task_max_n: int = Field(default=10**8, ge=1)
    # Outstanding tasks (queued or running) beyond which submissions get 503.
    task_queue_limit: int = Field(default=100, ge=1)
    # Outstanding tasks one client (API key; client address when keys are off) may have;
    # past it, submissions get 429. Keeps one client from filling the queue for all others.
    task_client_limit: int = Field(default=10, ge=1)
    # The key idempotent task ids are derived under (HMAC), so ids cannot be computed from a
    # key name and an Idempotency-Key. Required in production; development uses a fixed one.
    task_id_secret: SecretStr = Field(default=SecretStr(_DEVELOPMENT_TASK_ID_SECRET), min_length=16)
    task_retry_after: int = Field(default=5, ge=1)
    # How long GET /heavy-task waits for the result before answering 202.
    task_wait: float = Field(default=30.0, ge=0)
    # A computation running longer is ended (its child process killed) and the task fails.
    task_timeout: float = Field(default=120.0, gt=0)
    task_result_ttl: int = Field(default=24 * 3600, ge=60)
    task_max_tries: int = Field(default=3, ge=1)
    # A running job is leased to its worker for this long and renewed while it runs; a job
    # whose worker died runs again elsewhere one lease after the last renewal.
    task_lease: float = Field(default=5.0, ge=0.5, le=300)
    # Event streams (GET /tasks/{id}/events): a comment this often keeps proxies from closing
    # a quiet stream; a stream ends after TASK_EVENTS_MAX_AGE seconds (below hypercorn.toml's
    # read_timeout) and the client resumes it with Last-Event-ID; one client (API key; client
    # address when keys are off) may hold TASK_EVENTS_CLIENT_LIMIT open per API process.
    task_events_heartbeat: float = Field(default=15.0, gt=0, le=60)
    task_events_max_age: float = Field(default=60.0, gt=0, le=3600)
    task_events_client_limit: int = Field(default=10, ge=1)
    # Child processes computing tasks in each worker; 0 means one per core.
    worker_processes: int = Field(default=0, ge=0, le=256)
    # The longest an idle worker waits between polls of the queue. A queued job, an abort and
    # a freed slot wake it at once (workers/worker.py); the polls catch what no message tells.
    worker_poll_delay: float = Field(default=0.5, gt=0, le=5)
    # CPU priority (nice) of the compute processes: on a machine shared with the API, requests
    # are served first and the sums take the idle CPU. 0 leaves them at the worker's priority.
    worker_niceness: int = Field(default=10, ge=0, le=19)
    worker_health_interval: int = Field(default=5, ge=1)
    # On SIGTERM, running jobs get this long to finish before they are cut off (and retried).
    worker_shutdown_grace: int = Field(default=30, ge=0)

    # --- who may call what: API keys, docs exposure, CORS, rate limits (service/pipeline/auth.py,
    # service/pipeline/ratelimit.py) ---
    # Comma-separated `name:sha256hex:scope+scope` (scopes: read, write, admin); the hash is
    # the SHA-256 of the key. `python -m service keygen` prints a key and its entry. Required
    # in production; in development an empty value leaves the service open. Parsed once, here.
    api_keys: ApiKeys = ()
    # /docs and /openapi.json: unset means on in development, off in production.
    docs_enabled: bool | None = None
    # When on, the docs need no key; otherwise they need the admin scope.
    docs_public: bool = False
    # Comma-separated origins allowed to call from a browser (https://app.example.com);
    # empty means no CORS headers at all.
    cors_allow_origins: str = ""
    # Comma-separated addresses and networks of the proxies (load balancers) in front. A request
    # whose peer is one of them gets its client's address from X-Forwarded-For (the rightmost
    # entry that is not itself a trusted proxy): rate limits, task limits and log lines use it.
    # Empty: the peer's address is the client's, and forwarded headers are ignored.
    trusted_proxies: Networks = ()
    # Unset means on in production, off in development (so local load tests measure the app).
    rate_limit_enabled: bool | None = None
    rate_limit_window: int = Field(default=60, ge=1, le=86_400)
    # Requests per window, per key (or per client address without a key), for each scope.
    rate_limit_read: int = Field(default=600, ge=1)
    rate_limit_write: int = Field(default=120, ge=1)
    rate_limit_admin: int = Field(default=60, ge=1)
    # Seconds between a process's batched syncs with Redis (service/pipeline/ratelimit.py).
    rate_limit_sync_interval: float = Field(default=0.05, gt=0, le=5)
    # API processes sharing the limits (replicas x Hypercorn workers): each takes a share of
    # 1/N of what is left per sync, and limits itself to 1/N of the limit while Redis is down.
    rate_limit_processes: int = Field(default=2, ge=1, le=10_000)
    # A sync that waits longer than this on Redis's socket fails (confirmed by a PING before
    # Redis counts as down).
    rate_limit_timeout: float = Field(default=1.0, gt=0)

    # Observability: blocking detection, slow queries, profiling, worker metrics.
    # The event loop held longer than this (seconds) logs a warning with the blocking stack.
    loop_block_threshold: float = Field(default=0.1, gt=0, le=60)
    # Queries slower than this (seconds) are logged (name, duration, parameter count).
    slow_query_threshold: float = Field(default=0.1, ge=0)
    # Unset: profiling is off. Set: a request with `X-Profile-Token: <token>` gets its
    # pyinstrument profile (HTML) instead of its body.
    profiling_token: SecretStr | None = Field(default=None, min_length=16)
    # The arq worker serves its Prometheus metrics here; 0 serves none.
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    worker_metrics_host: str = "127.0.0.1"

    @field_validator("database_url")
    @classmethod
    def _postgres_scheme(cls, value: str) -> str:
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        for mode in parse_qs(urlsplit(value).query).get("sslmode", []):
            if mode not in _PG_SSLMODES:
                raise ValueError(f"sslmode must be one of {', '.join(sorted(_PG_SSLMODES))}")
        return value

    @field_validator("database_direct_url")
    @classmethod
    def _direct_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinel_addresses(cls, value: str) -> str:
        for item in split_list(value):
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("each Sentinel must be host:port")
        return value

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """The Sentinels of REDIS_SENTINELS, or none."""
        found = []
        for item in split_list(self.redis_sentinels):
            host, _, port = item.rpartition(":")
            found.append((host.strip("[]"), int(port)))
        return found

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("cors_allow_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        for origin in split_list(value):
            if not origin.startswith(("http://", "https://")) or origin.count("/") != 2:
                raise ValueError("each origin must be scheme://host[:port], without a path")
        return value

    @model_validator(mode="after")
    def _pool_bounds(self) -> Self:
        # asyncpg would refuse it only when the pool opens, inside a Hypercorn worker, whose
        # supervisor then exits 0 (pgjones/hypercorn#269): refuse it here, naming both.
        if self.db_pool_min_size > self.db_pool_max_size:
            raise ValueError(
                f"DB_POOL_MIN_SIZE ({self.db_pool_min_size}) must not exceed "
                f"DB_POOL_MAX_SIZE ({self.db_pool_max_size})"
            )
        return self

    @model_validator(mode="after")
    def _cache_lock_covers_the_report(self) -> Self:
        # A lock that expires while its owner still computes, or a waiter that gives up first,
        # sets several processes computing the same report exactly when PostgreSQL is slow.
        worst = self.report_worst_case
        if worst is None:
            return self
        why = (
            f"the report's worst case of {worst:g} s (DB_ACQUIRE_TIMEOUT "
            f"{self.db_acquire_timeout:g} s + {REPORT_STATEMENTS} statements x "
            f"DB_STATEMENT_TIMEOUT_MS {self.db_statement_timeout_ms} ms + "
            f"{DB_COMMAND_MARGIN:g} s each)"
        )
        if self.cache_lock_ttl is not None and self.cache_lock_ttl <= worst:
            raise ValueError(
                f"CACHE_LOCK_TTL ({self.cache_lock_ttl:g}) must exceed {why}, or the lock "
                "expires while its owner still computes; leave it unset to derive it"
            )
        if self.cache_lock_wait is not None and self.cache_lock_wait < worst:
            raise ValueError(
                f"CACHE_LOCK_WAIT ({self.cache_lock_wait:g}) must be at least {why}, or waiters "
                "compute the report alongside an owner still at work; leave it unset to derive it"
            )
        return self

    @model_validator(mode="after")
    def _migrations_bypass_pgbouncer(self) -> Self:
        if self.db_pgbouncer and not self.database_direct_url:
            raise ValueError(
                "DB_PGBOUNCER needs DATABASE_DIRECT_URL: migrations take a session lock that "
                "PgBouncer's transaction mode cannot hold, so they connect to PostgreSQL itself"
            )
        return self

    @model_validator(mode="after")
    def _closed_in_production(self) -> Self:
        if self.environment == "production" and not self.api_keys:
            raise ValueError(
                "API_KEYS must hold at least one key when ENVIRONMENT=production "
                "(make one with `python -m service keygen`)"
            )
        return self

    @model_validator(mode="after")
    def _task_secret_in_production(self) -> Self:
        if self.environment == "production" and self.task_id_secret.get_secret_value() == (
            _DEVELOPMENT_TASK_ID_SECRET
        ):
            raise ValueError(
                "TASK_ID_SECRET must be set when ENVIRONMENT=production "
                "(for example `python -c 'import secrets; print(secrets.token_hex(32))'`)"
            )
        return self

    @property
    def db_command_timeout(self) -> float | None:
        """The client's bound on every query: the statement timeout plus a margin.

        PostgreSQL enforces ``statement_timeout`` itself, so it cannot help when the server (or
        the network to it) stops answering; past this bound the client gives up. The margin
        lets the server's own cancel, which names the cause, arrive first when it still can.
        """
        if not self.db_statement_timeout_ms:
            return None
        return self.db_statement_timeout_ms / 1000 + DB_COMMAND_MARGIN

    @property
    def report_worst_case(self) -> float | None:
        """The longest one report computation can hold the cache lock: the pool's acquire
        wait plus each statement's client bound. None without a statement timeout."""
        if self.db_command_timeout is None:
            return None
        return self.db_acquire_timeout + REPORT_STATEMENTS * self.db_command_timeout

    @property
    def cache_lock_ttl_seconds(self) -> float:
        """``CACHE_LOCK_TTL``, or derived: the report's worst case plus a margin."""
        if self.cache_lock_ttl is not None:
            return self.cache_lock_ttl
        worst = self.report_worst_case
        return CACHE_LOCK_TTL_UNBOUNDED if worst is None else worst + CACHE_LOCK_MARGIN

    @property
    def cache_lock_wait_seconds(self) -> float:
        """``CACHE_LOCK_WAIT``, or derived: the report's worst case, so that waiting for the
        owner is never longer than computing the report oneself would be."""
        if self.cache_lock_wait is not None:
            return self.cache_lock_wait
        worst = self.report_worst_case
        return CACHE_LOCK_WAIT_UNBOUNDED if worst is None else worst

    @property
    def docs_served(self) -> bool:
        """Whether /docs and /openapi.json are served."""
        if self.docs_enabled is None:
            return self.environment == "development"
        return self.docs_enabled

    @property
    def rate_limited(self) -> bool:
        """Whether requests are counted against the rate limits."""
        if self.rate_limit_enabled is None:
            return self.environment == "production"
        return self.rate_limit_enabled


def split_list(value: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated setting."""
    return [item.strip() for item in value.split(",") if item.strip()]


def load_settings(**overrides: object) -> Settings:
    """Read the settings from the environment, with ``overrides`` taking precedence.

    A bad value raises :class:`ConfigError` whose message names the variable (but not its
    value, which may hold a password), so a start with a typo stops at once and says where.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        problems = [
            f"{str(item['loc'][0]).upper()}: {item['msg']}"
            if item["loc"]
            else item["msg"].removeprefix("Value error, ")
            for item in error.errors()
        ]
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
