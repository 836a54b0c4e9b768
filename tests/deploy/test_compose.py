"""compose.yaml against the code: every service, target, port, variable and health check it
names exists in the Containerfile, hypercorn.toml, Settings or the modules, and the PostgreSQL
connection budget it implies fits. (No container engine runs here; this is what can be proven
without one.)"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from service.config import Settings
from tests.support.containerfile import STAGES, TEST_API_KEYS, healthcheck_command
from tests.support.hypercorn import ROOT

COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
HYPERCORN = tomllib.loads((ROOT / "hypercorn.toml").read_text())
APP_SERVICES = ("api", "worker")
# Read by the code but not through Settings: the health probe's URL.
OTHER_VARIABLES = {"HEALTHCHECK_URL"}


# What an operator sets for each variable compose requires (${NAME:?error}).
REQUIRED = {
    "API_KEYS": TEST_API_KEYS,
    "POSTGRES_PASSWORD": "pg-secret",
    "REDIS_PASSWORD": "redis-secret",
    "TASK_ID_SECRET": "a-task-id-secret-for-the-test",
}


def interpolate(value: str) -> str:
    """Compose's ${NAME:-default} with nothing set: the default; ${NAME:?error}, which compose
    requires the operator to set: the value in REQUIRED."""
    value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: REQUIRED[m.group(1)], value)


def test_no_secret_falls_back_to_a_known_value() -> None:
    text = (ROOT / "compose.yaml").read_text()
    # Every secret is required (${NAME:?...}); none has a default an attacker could know.
    for name in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "TASK_ID_SECRET", "API_KEYS"):
        uses = re.findall(r"\$\{" + name + r"(:.)?", text)
        assert uses, name
        assert all(use == ":?" for use in uses), (name, uses)


def test_redis_requires_the_password_the_app_sends() -> None:
    redis = SERVICES["redis"]
    command = " ".join(redis["command"])
    assert '--requirepass "$$REDIS_PASSWORD"' in command
    assert interpolate(redis["environment"]["REDIS_PASSWORD"]) == REQUIRED["REDIS_PASSWORD"]
    for name in APP_SERVICES:
        url = interpolate(SERVICES[name]["environment"]["REDIS_URL"])
        assert urlsplit(url).password == REQUIRED["REDIS_PASSWORD"]


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, duration
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def replicas(service: str) -> int:
    return int(SERVICES[service].get("deploy", {}).get("replicas", 1))


def test_the_stack_has_its_services_each_pinned_or_built_from_a_containerfile_target() -> None:
    assert set(SERVICES) == {"postgres", "redis", "api", "worker"}
    assert replicas("api") >= 2
    assert replicas("worker") >= 2
    for name in APP_SERVICES:
        build = SERVICES[name]["build"]
        assert (ROOT / build["context"] / build["dockerfile"]) == ROOT / "Containerfile"
        assert build["target"] == name
        assert build["target"] in STAGES
    for name in ("postgres", "redis"):
        assert re.fullmatch(r"[a-z]+:\d+\.\d+(\.\d+)?-\w+", SERVICES[name]["image"])


@pytest.mark.parametrize("name", APP_SERVICES)
def test_every_variable_is_one_the_code_reads(name: str) -> None:
    known = {field.upper() for field in Settings.model_fields} | OTHER_VARIABLES
    environment = SERVICES[name]["environment"]
    assert set(environment) <= known, set(environment) - known
    # What the code would do with them: they parse, and they point at the stack's services.
    settings = Settings.model_validate({k.lower(): interpolate(v) for k, v in environment.items()})
    database, redis_url = urlsplit(settings.database_url), urlsplit(settings.redis_url)
    postgres = SERVICES["postgres"]["environment"]
    assert database.hostname == "postgres"
    assert database.port == 5432
    assert database.username == postgres["POSTGRES_USER"]
    assert database.password == interpolate(postgres["POSTGRES_PASSWORD"])
    assert database.path == f"/{postgres['POSTGRES_DB']}"
    assert redis_url.hostname == "redis"
    assert (redis_url.port or 6379) == 6379
    assert settings.environment == "production"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_health_checks_are_the_images_own_and_their_modules_exist(name: str) -> None:
    test = SERVICES[name]["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert test[1:] == healthcheck_command(STAGES[name])
    module = test[3]
    assert importlib.util.find_spec(module) is not None
    for dependency, condition in SERVICES[name]["depends_on"].items():
        assert dependency in SERVICES
        assert condition["condition"] != "service_healthy" or "healthcheck" in SERVICES[dependency]


def test_api_port_is_the_one_hypercorn_binds_and_stops_outlast_the_drain() -> None:
    bind_port = HYPERCORN["bind"][0].rsplit(":", 1)[1]
    for mapping in SERVICES["api"]["ports"]:
        host, container = str(mapping).rsplit(":", 1)
        assert container == bind_port
        low, _, high = host.partition("-")
        # one host port per replica
        assert int(high or low) - int(low) + 1 == replicas("api")
    assert seconds(SERVICES["api"]["stop_grace_period"]) > HYPERCORN["graceful_timeout"]


def test_workers_get_longer_to_stop_than_their_jobs_get_to_finish() -> None:
    environment = SERVICES["worker"]["environment"]
    settings = Settings.model_validate({k.lower(): interpolate(v) for k, v in environment.items()})
    assert seconds(SERVICES["worker"]["stop_grace_period"]) > settings.worker_shutdown_grace


def test_postgres_connection_budget_fits_max_connections() -> None:
    command = SERVICES["postgres"]["command"]
    max_connections = int(command[command.index("-c") + 1].split("=")[1])
    pool_max = {
        name: int(SERVICES[name]["environment"]["DB_POOL_MAX_SIZE"]) for name in APP_SERVICES
    }
    api_connections = replicas("api") * HYPERCORN["workers"] * pool_max["api"]
    worker_connections = replicas("worker") * pool_max["worker"]
    # a few left for migrations, the preflight and an operator's psql
    assert api_connections + worker_connections + 5 <= max_connections
