"""Scale-out on one machine: two API processes and two arq workers sharing PostgreSQL and Redis.

    .venv/bin/python tools/scale_out.py [--tasks 16] [--n 3000000] [--reports 20]

Each process is started with the images' exact commands (the Containerfile's ENTRYPOINT and
CMD: the fail-fast preflight, then Hypercorn with hypercorn.toml, or ``python -m workers``), on
a fresh PostgreSQL schema and a fresh Redis key prefix, all at the same moment. Then it shows:

1. migrations: both APIs migrate at start; the advisory lock lets exactly one apply them;
2. shared data: a user created through one API is read through the other;
3. tasks: ``GET /heavy-task`` sent to both APIs in turn (and ``GET /tasks/{id}`` polled when
   an answer is 202) are run by both workers (counted from each worker's log);
4. the report: ``GET /expensive-operation`` sent at once to both APIs on a cold cache is
   computed once (exactly one ``Cache-Status`` miss), the rest served from the shared cache.

Parts whose code is not there yet (no ``workers/__main__.py``, a route answering 404) are
reported as skipped. Exit status: 0 when every part that ran passed, 1 otherwise. Everything
it creates (schema, keys, processes) is removed at the end. Loopback only; bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import IO, Any

import asyncpg
import httpx
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.backends.db import migration_files  # noqa: E402
from tests.conftest import with_search_path  # noqa: E402
from tests.support.containerfile import AUTH, STAGES, exec_form, host_env  # noqa: E402
from tools.devstack import ensure_services  # noqa: E402

START_TIMEOUT = 30.0
TASK_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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

    def skip(self, part: str, why: str) -> None:
        self.say(part, f"skipped: {why}")


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
    """arq logs one ``→`` line per job it starts."""
    return sum(1 for line in worker_log.splitlines() if " → " in line)


async def main(args: argparse.Namespace) -> int:
    report = Report()
    urls = ensure_services()
    tag = uuid.uuid4().hex[:10]
    schema, prefix = f"scale_{tag}", f"scale:{tag}:"
    admin = await asyncpg.connect(urls["DATABASE_URL"])
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    database_url = with_search_path(urls["DATABASE_URL"], schema)
    redis_client = aioredis.Redis.from_url(urls["REDIS_URL"])
    processes: list[Process] = []
    try:
        api_stage, worker_stage = STAGES["api"], STAGES["worker"]
        env = host_env(
            api_stage,
            DATABASE_URL=database_url,
            REDIS_URL=urls["REDIS_URL"],
            REDIS_PREFIX=prefix,
            DOCS_ENABLED="true",  # /openapi.json tells which routes exist
        )
        ports = [free_port(), free_port()]
        api_command = [*exec_form(api_stage.last("ENTRYPOINT")), *exec_form(api_stage.last("CMD"))]
        apis = [
            Process(
                f"api-{i + 1}",
                [*api_command, "--bind", f"127.0.0.1:{port}", "--workers", str(args.api_workers)],
                env,
            )
            for i, port in enumerate(ports)
        ]
        processes += apis
        have_workers = (ROOT / "workers" / "__main__.py").exists()
        workers: list[Process] = []
        if have_workers:
            worker_command = [
                *exec_form(worker_stage.last("ENTRYPOINT")),
                *exec_form(worker_stage.last("CMD")),
            ]
            workers = [Process(f"worker-{i + 1}", worker_command, env) for i in range(2)]
            processes += workers
        api_urls = [f"http://127.0.0.1:{port}" for port in ports]
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=TASK_TIMEOUT, headers=AUTH) as http:
            for url, process in zip(api_urls, apis, strict=True):
                await wait_serving(http, url, process)
            report.say("start", f"2 APIs serving {time.monotonic() - started:.2f} s after launch")

            # 1. migrations applied once although both APIs migrated at start
            scoped = await asyncpg.connect(database_url)
            rows = await scoped.fetch("SELECT version FROM schema_migrations")
            await scoped.close()
            appliers = [a.name for a in apis if "migrations applied: none" not in a.output()]
            report.check(
                "migrations",
                sorted(r["version"] for r in rows) == [v for v, _, _ in migration_files()]
                and len(appliers) == 1,
                f"{len(rows)} migration(s) recorded once each; applied by {appliers}",
            )

            # 2. one database behind both
            created = await http.post(
                f"{api_urls[0]}/users", json={"email": f"{tag}@example.com", "name": "Scale"}
            )
            seen = await http.get(f"{api_urls[1]}/users", params={"email": f"{tag}@example.com"})
            report.check(
                "shared data",
                created.status_code == 201 and seen.json().get("users") == [created.json()],
                "a user created through api-1 is read through api-2",
            )

            routes = set((await http.get(f"{api_urls[0]}/openapi.json")).json()["paths"])

            # 3. tasks spread over both workers
            if not have_workers:
                report.skip("tasks", "workers/__main__.py is not there (the arq worker)")
            elif "/heavy-task" not in routes:
                report.skip("tasks", "GET /heavy-task is not routed yet")
            else:
                before = [jobs_started(w.output()) for w in workers]
                started = time.monotonic()
                results = await asyncio.gather(
                    *(run_task(http, api_urls[i % 2], args.n) for i in range(args.tasks))
                )
                elapsed = time.monotonic() - started
                await asyncio.sleep(0.5)  # let the workers' last log lines land
                per_worker = [
                    jobs_started(w.output()) - b for w, b in zip(workers, before, strict=True)
                ]
                expected = sum(i * i for i in range(args.n))
                report.check(
                    "tasks",
                    all(int(r) == expected for r in results) and min(per_worker) > 0,
                    f"{args.tasks} tasks (n={args.n}) through both APIs in {elapsed:.2f} s; "
                    f"jobs started per worker: {per_worker}",
                )

            # 4. one cold report, computed once across both APIs
            if "/expensive-operation" not in routes:
                report.skip("report", "GET /expensive-operation is not routed yet")
            else:
                # Cold: this run's key prefix is new, so nothing of the report is cached yet.
                responses = await asyncio.gather(
                    *(
                        http.get(f"{api_urls[i % 2]}/expensive-operation")
                        for i in range(args.reports)
                    )
                )
                statuses = Counter(r.headers.get("cache-status", "(none)") for r in responses)
                # RFC 9211: "fwd=miss" went to the origin (computed it), unless "collapsed",
                # which says it waited for another request's computation instead.
                misses = sum(
                    count
                    for value, count in statuses.items()
                    if re.search(r"fwd=|miss", value, re.IGNORECASE) and "collapsed" not in value
                )
                bodies = {r.text for r in responses}
                report.check(
                    "report",
                    misses == 1
                    and len(bodies) == 1
                    and all(r.status_code == 200 for r in responses),
                    f"{args.reports} concurrent requests over both APIs on a cold cache: "
                    f"Cache-Status {dict(statuses)}; computed {misses} time(s)",
                )
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=16, help="tasks to submit")
    parser.add_argument("--n", type=int, default=3_000_000, help="N of each heavy task")
    parser.add_argument("--reports", type=int, default=20, help="concurrent report requests")
    parser.add_argument("--api-workers", type=int, default=1, help="Hypercorn workers per API")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(asyncio.run(main(parser.parse_args())))
