"""The built images, run by the container engine (podman with runc) against this machine's
PostgreSQL and Redis on the host network: they serve the requests of docs/api.md, the engine's own
health checks pass, a `podman stop` under load drops no request in flight, the processes run
as uid 10001, and the API runs on a read-only root filesystem.

Collected only when named (`make image-test`, after `make images`): a missing image FAILS
here, it is never skipped. Figures are printed (-s shows them)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from service.config import Settings
from tools import ROOT
from tools.containerfile import AUTH, STAGES, TEST_API_KEYS, healthcheck_command
from tools.images import PODMAN, image_name, inspect, run_limits

HYPERCORN = tomllib.loads((ROOT / "hypercorn.toml").read_text())
GRACEFUL_TIMEOUT = HYPERCORN["graceful_timeout"]
API, WORKER = image_name("api"), image_name("worker")
# The API's one writable place on its read-only root, a tmpfs; the multiprocess metrics folder
# is made inside it by the app (0700, its uid: it refuses a folder others can write).
METRICS_TMPFS = "/tmp/metrics"
METRICS_DIR = f"{METRICS_TMPFS}/prometheus"
JSON = {**AUTH, "Content-Type": "application/json"}


def podman(*args: str, timeout: float = 60, check: bool = True) -> str:
    result = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()


def container_env(image: str, settings: Settings, port: int) -> list[str]:
    env = {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "REDIS_PREFIX": settings.redis_prefix,
        "API_KEYS": TEST_API_KEYS,
        "TASK_ID_SECRET": "image-test-task-id-secret",
        "HEALTHCHECK_URL": f"http://127.0.0.1:{port}/healthz",
        # Small jobs finish in well under a second; a few processes are plenty on 2 cores.
        "WORKER_PROCESSES": "2",
    }
    if image == API:  # the worker is one process: in-memory metrics
        env["PROMETHEUS_MULTIPROC_DIR"] = METRICS_DIR
    return [arg for item in env.items() for arg in ("--env", "=".join(item))]


@contextmanager
def running(image: str, settings: Settings, port: int, *command: str) -> Iterator[str]:
    """A detached container of ``image`` on the host network, its root read-only; removed
    afterwards. One tmpfs each: the API's multiprocess metrics folder; the worker's /tmp, where
    multiprocessing's forkserver (its compute pool) puts its socket."""
    writable = "/tmp" if image == WORKER else METRICS_TMPFS
    name = f"image-test-{uuid.uuid4().hex[:8]}"
    podman(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        "--log-driver",
        "k8s-file",
        *run_limits(),
        # Read-only root, and no tmpfs on /tmp or /run either: only the metrics folder.
        "--read-only",
        "--read-only-tmpfs=false",
        "--tmpfs",
        f"{writable}:rw,size=16m,mode=1777",
        *container_env(image, settings, port),
        image,
        *command,
    )
    try:
        yield name
    finally:
        logs = podman("logs", name, check=False)
        print(f"\n[{image} logs, last lines]\n" + "\n".join(logs.splitlines()[-5:]))
        podman("rm", "--force", "--time", "0", name, check=False)


def api_command(port: int) -> list[str]:
    # The image's CMD plus the documented bind override: port 8000 is not ours on a shared host.
    return [
        "hypercorn",
        "--config",
        "hypercorn.toml",
        "--bind",
        f"127.0.0.1:{port}",
        "service.app:create_app()",
    ]


def wait_healthy(name: str, timeout: float = 60) -> str:
    """Run the image's HEALTHCHECK through the engine until it passes; the engine's status."""
    deadline = time.monotonic() + timeout
    while True:
        state = json.loads(podman("inspect", "--format", "{{json .State}}", name))
        assert state["Running"], (
            f"{name} exited: {state} {podman('logs', name, check=False)[-2000:]}"
        )
        probe = subprocess.run(
            [*PODMAN, "healthcheck", "run", name], capture_output=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            break
        assert time.monotonic() < deadline, f"{name} never became healthy"
        time.sleep(1)
    health = json.loads(podman("inspect", "--format", "{{json .State.Health}}", name))
    status: str = health["Status"]
    return status


def process_uids(name: str) -> set[str]:
    """Real uids of the container's processes, read from the host's /proc."""
    pid = podman("inspect", "--format", "{{.State.Pid}}", name)
    uids = set()
    for child in [pid, *podman("top", name, "hpid").split()[1:]]:
        status = Path(f"/proc/{child}/status").read_text()
        uids.add(re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE).group(1))  # type: ignore[union-attr]
    return uids


@pytest.fixture(scope="module")
def images() -> dict[str, dict[str, object]]:
    found = {}
    for image in (API, WORKER):
        exists = subprocess.run([*PODMAN, "image", "exists", image], check=False)
        assert exists.returncode == 0, f"no {image}: run make images first"
        found[image] = inspect(image)
    return found


def test_images_carry_labels_healthchecks_and_a_numeric_non_root_user(
    images: dict[str, dict[str, object]],
) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for target, image in (("api", API), ("worker", WORKER)):
        found = images[image]
        labels = found["Labels"]
        assert isinstance(labels, dict)
        revision = labels["org.opencontainers.image.revision"]
        # a commit of this repository
        subprocess.run(
            ["git", "-C", str(ROOT), "cat-file", "-e", f"{revision}^{{commit}}"], check=True
        )
        assert labels["org.opencontainers.image.version"] == version
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", labels["org.opencontainers.image.created"]
        )
        assert labels["org.opencontainers.image.source"] not in ("", "unknown")
        # The Python the image says it carries is the one it runs.
        carried = podman(
            "run", "--rm", *run_limits(), "--entrypoint", "python", image, "-c",
            "import sys; print('%d.%d' % sys.version_info[:2])",
        )  # fmt: skip
        assert labels["python.version"] == carried
        assert labels["org.opencontainers.image.base.name"] not in ("", "unknown")
        health = found["Healthcheck"]
        assert isinstance(health, dict)
        assert health["Test"] == ["CMD", *healthcheck_command(STAGES[target])]
        assert found["User"] == "10001:10001"
        # No pip settings baked in: not in the environment, not on disk, not in the history.
        config = found["Config"]
        assert isinstance(config, dict)
        assert not [e for e in config["Env"] if e.startswith(("PIP_INDEX", "PIP_CERT"))]
        leftovers = podman(
            "run",
            "--rm",
            *run_limits(),
            "--entrypoint",
            "sh",
            image,
            "-c",
            "ls /run/secrets /etc/pip.conf /root/.config/pip 2>/dev/null; true",
        )
        assert leftovers == ""
        history = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", image)
        assert "index-url" not in history
        assert "BEGIN CERTIFICATE" not in history


def test_images_serve_the_readme_requests_healthy_read_only_and_non_root(
    images: dict[str, dict[str, object]], settings: Settings, port: int
) -> None:
    base = f"http://127.0.0.1:{port}"
    with (
        running(WORKER, settings, port) as worker,
        running(API, settings, port, *api_command(port)) as api,
    ):
        assert wait_healthy(api) == "healthy"
        assert wait_healthy(worker) == "healthy"
        for name in (api, worker):
            assert process_uids(name) == {"10001"}
            assert podman("exec", name, "id", "-u") == "10001"
            # /var/tmp is world-writable: only a read-only root refuses the write.
            assert (
                "Read-only file system"
                in subprocess.run(
                    [*PODMAN, "exec", name, "touch", "/var/tmp/x"],
                    capture_output=True,
                    text=True,
                    check=False,
                ).stderr
            )
        with httpx.Client(base_url=base, headers=AUTH, timeout=40) as http:
            assert (
                http.get("/users", params={"email": "a@b.c"}, headers={"Authorization": ""})
            ).status_code == 401
            created = http.post("/users", json={"email": "ada@example.com", "name": "Ada Lovelace"})
            assert created.status_code == 201, created.text
            location = created.headers["location"]
            found = http.get("/users", params={"email": "ADA@example.com"})
            assert [u["email"] for u in found.json()["users"]] == ["ada@example.com"]
            assert (http.get(location)).json()["name"] == "Ada Lovelace"
            patched = http.patch(location, json={"name": "Ada"})
            assert patched.json()["name"] == "Ada"
            assert (http.get("/users", params={"limit": 2})).status_code == 200
            duplicate = http.post("/users", json={"email": "Ada@Example.com", "name": "Copy"})
            assert duplicate.status_code == 409
            assert duplicate.headers["content-type"] == "application/problem+json"
            assert (http.post("/users", json={"email": "nope"})).status_code == 422
            assert (http.get("/users/999999")).status_code == 404
            # CPU work on the worker container, through Redis
            heavy = http.get("/heavy-task", params={"n": 1000000})
            assert heavy.json() == {"result": 333332833333500000}, heavy.text
            submitted = http.post("/tasks", json={"n": 1000})
            assert submitted.status_code == 202
            task = submitted.headers["location"]
            for _ in range(100):
                state = (http.get(task)).json()
                if state["status"] == "complete":
                    break
                time.sleep(0.1)
            assert state["status"] == "complete", state
            assert (http.delete(location)).status_code == 204
            assert (http.get("/healthz")).json() == {"status": "ok"}
            ready = (http.get("/readyz")).json()
            assert ready["checks"] == {"postgres": "ok", "redis": "ok"}
            # The image runs in production mode, where the API description is off (DOCS_ENABLED).
            assert http.get("/openapi.json").status_code == 404
            report = http.get("/expensive-operation")
            assert report.status_code == 200
            assert report.json()["result"]["total_users"] == 0
            # Both Hypercorn workers write their metrics to the tmpfs; a scrape sums them.
            metrics = http.get("/metrics")
            assert metrics.status_code == 200
            assert "service_processes" in metrics.text
        files = podman("exec", api, "ls", METRICS_DIR)
        assert files.split(), "no multiprocess metric files on the tmpfs"


def _outcome(answer: httpx.Response | BaseException) -> str:
    if isinstance(answer, httpx.Response):
        return f"{answer.status_code} {answer.text[:80]}"
    return type(answer).__name__


def _new_connection_outcome(port: int) -> str:
    try:
        # A client connecting during the drain waits in the listen backlog until the first
        # Hypercorn worker exits (service/framework/drain.py): bounded by the drain, not by 5 s.
        response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=GRACEFUL_TIMEOUT + 5)
    except httpx.ConnectError:
        return "refused"
    except (httpx.ReadError, httpx.RemoteProtocolError):
        return "reset"
    except httpx.TimeoutException:
        return "hung"
    return f"served {response.status_code}"


async def test_engine_stop_under_load_drops_no_request_in_flight(
    images: dict[str, dict[str, object]], settings: Settings, port: int
) -> None:
    in_flight = 8
    base = f"http://127.0.0.1:{port}"
    with (
        running(WORKER, settings, port) as worker,
        running(API, settings, port, *api_command(port)) as api,
    ):
        wait_healthy(api)
        wait_healthy(worker)
        limits = httpx.Limits(max_connections=in_flight + 1)
        async with httpx.AsyncClient(
            base_url=base, headers=AUTH, timeout=60, limits=limits
        ) as http:
            # Each a CPU job of about 2 s on the worker here (two compute processes: 8 s in all
            # on a quiet machine), so every request is still held open when the stop comes: the
            # worker starts each job the moment it is queued, and 10**7 took 0.7 s on a fast one.
            sizes = [30_000_000 + i for i in range(in_flight)]
            requests = [
                asyncio.create_task(http.get("/heavy-task", params={"n": n})) for n in sizes
            ]
            await asyncio.sleep(1.0)
            assert not any(r.done() for r in requests), "the load finished before the stop"
            started = time.monotonic()
            stop = asyncio.create_task(
                asyncio.to_thread(
                    podman, "stop", "--time", str(GRACEFUL_TIMEOUT + 10), api, timeout=90
                )
            )
            await asyncio.sleep(0.5)
            late = await asyncio.gather(
                *(asyncio.to_thread(_new_connection_outcome, port) for _ in range(5))
            )
            answers = await asyncio.gather(*requests, return_exceptions=True)
            await stop
            stopped_after = time.monotonic() - started
        state = json.loads(podman("inspect", "--format", "{{json .State}}", api))
    # Answered in full: the result (200), or, where TASK_WAIT (30 s, inside the 35 s drain)
    # ran out first on a busy machine, the task's Location (202), as the route promises.
    # Dropped: a reset, a timeout, or any other answer.
    answered = [a for a in answers if isinstance(a, httpx.Response) and a.status_code == 200]
    waited_out = [
        a
        for a in answers
        if isinstance(a, httpx.Response) and a.status_code == 202 and "location" in a.headers
    ]
    dropped = [a for a in answers if a not in answered and a not in waited_out]
    print(
        f"\n[podman stop under load] in flight: {in_flight}; answered 200: {len(answered)}, "
        f"202 with the task's Location: {len(waited_out)}; dropped: {len(dropped)} "
        f"{Counter(_outcome(a) for a in dropped)}; "
        f"new connections after the stop: {dict(Counter(late))}; "
        f"stopped after {stopped_after:.1f} s, exit code {state['ExitCode']}"
    )
    assert dropped == []
    expected = {n: sum(i * i for i in range(n)) for n in sizes}
    for answer in answered:
        assert answer.json()["result"] == expected[int(answer.request.url.params["n"])]
    # Drained and exited by itself, before podman's --time ran out and it would have killed it.
    assert state["ExitCode"] == 0
    assert "hung" not in late
