"""Scale-out on one machine: two API processes and two arq workers sharing PostgreSQL and Redis.

    python -m tools scale-out [--tasks 16] [--n 3000000] [--reports 20]     (make scale-out)

Each process is started with the images' exact commands (the Containerfile's ENTRYPOINT and
CMD: the fail-fast preflight, then Hypercorn with hypercorn.toml, or ``python -m workers``), on
a fresh PostgreSQL schema and a fresh Redis key prefix, all at the same moment. Then it shows:

1. migrations: both APIs migrate at start; the advisory lock lets exactly one apply them;
2. shared data: a user created through one API is read through the other;
3. tasks: ``GET /heavy-task`` sent to both APIs in turn (and ``GET /tasks/{id}`` polled when
   an answer is 202) are run by both workers (counted from each worker's log);
4. the report: ``GET /expensive-operation`` sent at once to both APIs on a cold cache is
   computed once (exactly one ``Cache-Status`` miss), the rest served from the shared cache.

Exit status: 0 when every part passed, 1 otherwise. Everything it creates (schema, keys,
processes) is removed at the end. Loopback only; bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from typing import IO, Any

import asyncpg
import httpx
import redis.asyncio as aioredis

from service.backends.db import migration_files
from tools import ROOT
from tools.containerfile import AUTH, STAGES, exec_form, host_env
from tools.devstack import ensure_services, with_search_path
from tools.private_servers import free_port

START_TIMEOUT = 30.0
TASK_TIMEOUT = 120.0


class Process:
    """One of the stack's processes, its output in a temporary file (a pipe could fill up)."""

    def __init__(self, name: str, command: list[str], env: dict[str, str]) -> None:
        self.name = name
        # closed in stop(), after the process is gone
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self.popen = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


class Report:
    def __init__(self) -> None:
        self.failed = False

    def say(self, part: str, message: str) -> None:
        print(f"[{part}] {message}", flush=True)

    def check(self, part: str, ok: bool, message: str) -> None:
        self.failed |= not ok
        self.say(part, f"{'ok' if ok else 'FAILED'}: {message}")


async def wait_serving(http: httpx.AsyncClient, url: str, process: Process) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited:\n{process.output()}")
        try:
            if (await http.get(f"{url}/healthz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{process.name} did not serve within {START_TIMEOUT} s")


async def run_task(http: httpx.AsyncClient, api: str, n: int) -> Any:
    """The Flask route: 200 with the result, or 202 and the task polled until it is done."""
    response = await http.get(f"{api}/heavy-task", params={"n": n})
    if response.status_code == 200:
        return response.json()["result"]
    if response.status_code != 202:
        raise RuntimeError(f"/heavy-task answered {response.status_code}: {response.text}")
    location = response.headers["location"]
    deadline = time.monotonic() + TASK_TIMEOUT
    while time.monotonic() < deadline:
        status = (await http.get(f"{api}{location}")).json()
        if status.get("status") == "complete":
            return status.get("result")
        if status.get("status") == "failed":
            raise RuntimeError(f"task {location} failed: {status}")
        await asyncio.sleep(0.25)
    raise RuntimeError(f"task {location} not done within {TASK_TIMEOUT} s")


def jobs_started(worker_log: str) -> int:
    """arq logs one ``→`` line per job it starts; the worker writes JSON lines, in which the
    arrow is escaped, so the messages are read, not the raw lines."""
    started = 0
    for line in worker_log.splitlines():
        try:
            message = str(json.loads(line).get("message", ""))
        except (ValueError, AttributeError):
            message = line
        started += " → " in message
    return started


def image_command(stage: str) -> list[str]:
    """The image's exact start command: its ENTRYPOINT, then its CMD."""
    return [*exec_form(STAGES[stage].last("ENTRYPOINT")), *exec_form(STAGES[stage].last("CMD"))]


def start_processes(
    env: dict[str, str], ports: list[int], api_workers: int
) -> tuple[list[Process], list[Process]]:
    """Both APIs (one per port) and both workers, started at the same moment."""
    apis = [
        Process(
            f"api-{i + 1}",
            [*image_command("api"), "--bind", f"127.0.0.1:{port}", "--workers", str(api_workers)],
            env,
        )
        for i, port in enumerate(ports)
    ]
    workers = [Process(f"worker-{i + 1}", image_command("worker"), env) for i in range(2)]
    return apis, workers


async def check_migrations(report: Report, database_url: str, apis: list[Process]) -> None:
    """Migrations applied once although both APIs migrated at start."""
    scoped = await asyncpg.connect(database_url)
    try:
        rows = await scoped.fetch("SELECT version FROM schema_migrations")
    finally:
        await scoped.close()
    appliers = [a.name for a in apis if "migrations applied: none" not in a.output()]
    report.check(
        "migrations",
        sorted(r["version"] for r in rows) == [v for v, _, _ in migration_files()]
        and len(appliers) == 1,
        f"{len(rows)} migration(s) recorded once each; applied by {appliers}",
    )


async def check_shared_data(
    report: Report, http: httpx.AsyncClient, api_urls: list[str], tag: str
) -> None:
    """One database behind both APIs."""
    email = f"{tag}@example.com"
    created = await http.post(f"{api_urls[0]}/users", json={"email": email, "name": "Scale"})
    seen = await http.get(f"{api_urls[1]}/users", params={"email": email})
    report.check(
        "shared data",
        created.status_code == 201 and seen.json().get("users") == [created.json()],
        "a user created through api-1 is read through api-2",
    )


async def check_tasks(
    report: Report,
    http: httpx.AsyncClient,
    api_urls: list[str],
    workers: list[Process],
    tasks: int,
    n: int,
) -> None:
    """Tasks sent to both APIs in turn are run by both workers, with the right results."""
    before = [jobs_started(w.output()) for w in workers]
    started = time.monotonic()
    try:
        results = await asyncio.gather(*(run_task(http, api_urls[i % 2], n) for i in range(tasks)))
    except RuntimeError as error:
        report.check("tasks", False, str(error))
        return
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.5)  # the workers write their last log lines after the results
    per_worker = [jobs_started(w.output()) - b for w, b in zip(workers, before, strict=True)]
    expected = sum(i * i for i in range(n))
    report.check(
        "tasks",
        all(int(r) == expected for r in results) and min(per_worker) > 0,
        f"{tasks} tasks (n={n}) through both APIs in {elapsed:.2f} s; "
        f"jobs started per worker: {per_worker}",
    )


async def check_report(
    report: Report, http: httpx.AsyncClient, api_urls: list[str], requests: int
) -> None:
    """One cold report, computed once across both APIs.

    Cold: this run's key prefix is new, so nothing of the report is cached yet.
    """
    responses = await asyncio.gather(
        *(http.get(f"{api_urls[i % 2]}/expensive-operation") for i in range(requests))
    )
    statuses = Counter(r.headers.get("cache-status", "(none)") for r in responses)
    # RFC 9211: "fwd=miss" went to the origin (computed it), unless "collapsed", which says
    # it waited for another request's computation instead.
    misses = sum(
        count
        for value, count in statuses.items()
        if re.search(r"fwd=|miss", value, re.IGNORECASE) and "collapsed" not in value
    )
    bodies = {r.text for r in responses}
    report.check(
        "report",
        misses == 1 and len(bodies) == 1 and all(r.status_code == 200 for r in responses),
        f"{requests} concurrent requests over both APIs on a cold cache: "
        f"Cache-Status {dict(statuses)}; computed {misses} time(s)",
    )


async def demonstrate(
    args: argparse.Namespace,
    report: Report,
    env: dict[str, str],
    tag: str,
    processes: list[Process],
) -> None:
    """Start the stack (appending to ``processes``, which the caller stops), then each part."""
    ports = [free_port(), free_port()]
    apis, workers = start_processes(env, ports, args.api_workers)
    processes += [*apis, *workers]
    api_urls = [f"http://127.0.0.1:{port}" for port in ports]
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=TASK_TIMEOUT, headers=AUTH) as http:
        for url, process in zip(api_urls, apis, strict=True):
            await wait_serving(http, url, process)
        report.say("start", f"2 APIs serving {time.monotonic() - started:.2f} s after launch")
        await check_migrations(report, env["DATABASE_URL"], apis)
        await check_shared_data(report, http, api_urls, tag)
        await check_tasks(report, http, api_urls, workers, args.tasks, args.n)
        await check_report(report, http, api_urls, args.reports)


async def run(args: argparse.Namespace) -> int:
    """The demonstration on a schema and a key prefix of its own, removed afterwards."""
    report = Report()
    urls = ensure_services()
    tag = uuid.uuid4().hex[:10]
    schema, prefix = f"scale_{tag}", f"scale:{tag}:"
    admin = await asyncpg.connect(urls["DATABASE_URL"])
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    redis_client = aioredis.Redis.from_url(urls["REDIS_URL"])
    env = host_env(
        STAGES["api"],
        DATABASE_URL=with_search_path(urls["DATABASE_URL"], schema),
        REDIS_URL=urls["REDIS_URL"],
        REDIS_PREFIX=prefix,
    )
    processes: list[Process] = []
    try:
        await demonstrate(args, report, env, tag, processes)
    finally:
        for process in processes:
            code = process.stop()
            if code != 0:
                report.check("stop", False, f"{process.name} exited {code}:\n{process.output()}")
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()
        keys = [k async for k in redis_client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await redis_client.delete(*keys)
        await redis_client.aclose()
    return 1 if report.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools scale-out", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--tasks", type=int, default=16, help="tasks to submit")
    parser.add_argument("--n", type=int, default=3_000_000, help="N of each heavy task")
    parser.add_argument("--reports", type=int, default=20, help="concurrent report requests")
    parser.add_argument("--api-workers", type=int, default=1, help="Hypercorn workers per API")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return asyncio.run(run(args))
