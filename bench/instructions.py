"""Instructions per request, counted by valgrind: where the service's cost per request goes,
step by step, without the noise of a shared machine.

    .venv/bin/python -m bench.instructions                       # floor, service, no pipeline
    .venv/bin/python -m bench.instructions floor service 'service-without:request log line'

CPU time per request moves by tens of percent between runs on a busy machine, so it cannot
tell a change of 2% from noise; the number of instructions a request executes can
(``valgrind --tool=callgrind`` counts them, the same count run after run whatever else the
machine does). This runs each app *in this process*, under callgrind, driving its ASGI
callable directly with the users lookup (``GET /users?email=`` of an existing user, 4 at a
time on a pool of 4): no socket and no Hypercorn, so what it counts is the app's own work,
Quart's included; PostgreSQL's work is another process and is not counted. Instrumentation
is switched on only around each variant's requests (``callgrind_control``), after a warm-up.

Variants:

- ``floor``: bench/floor.py's minimal Quart app (the benchmark's ``quart-lookup``);
- ``service``: ``create_app()`` as configured (development defaults; ``--production`` sets an
  API key sent with every request and rate limits on);
- ``service-without:STEP[,STEP...]``: the service with those steps of
  service/pipeline/__init__.py's ``STEPS`` left out (``ALL`` for every step) and, with
  ``header_limit`` among them, without the header-size wrapper: what each step costs;
- ``service-public:PART[,PART...]``: the service with the saving it draws from a library's
  private part replaced by the library's public path, for each PART of ``PUBLIC_PATHS``
  (``ALL`` for every one): what each such reliance is worth (docs/dependencies.md, "Private parts of
  libraries").

Background work that runs by the clock (the loop watch's ticker, the pool sampler) is not
started, since under valgrind a second lasts a fiftieth as many requests; for the same reason
``--production`` syncs the rate limiter every 2.5 s instead of every 50 ms.
``--server`` counts instead the whole server process: each variant is served by Hypercorn
with hypercorn.toml in-process (``--workers 0``) under callgrind, and sent the same lookups
over loopback, 4 keep-alive connections at a time; what it counts is Hypercorn, h11 and the
app, the denominator of "a share of a request's CPU". One server per variant, about a minute
each.

The benchmark (``python -m bench``) stays the measure of the whole server; this one says which
part of it moved. Needs valgrind (Debian: ``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import glob
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import database
from bench.options import ROOT, BenchError, say

DEFAULT_VARIANTS = ("floor", "service", "service-without:ALL,header_limit")
WITHOUT = "service-without:"
PUBLIC = "service-public:"
# What a ``service-public:`` variant can put back on the public path, each by its name.
PUBLIC_PATHS = {
    "make_response": "quart-schema's make_response wrapper kept on the app",
    "aiosql": "aiosql's own asyncpg adapter (MaybeAcquire on every query)",
}
# (owner, attribute, value): set while a variant runs, put back after.
Swap = tuple[Any, str, Any]
CONCURRENCY = 4
ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.instructions", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("variants", nargs="*", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--requests", type=int, default=200, help="counted per variant")
    parser.add_argument("--production", action="store_true", help="API key and rate limits")
    parser.add_argument(
        "--server", action="store_true", help="count the whole Hypercorn process (--workers 0)"
    )
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _build(variant: str) -> tuple[Any, list[Swap]]:
    """The variant's ASGI app, and what is swapped in while it runs."""
    if variant == "floor":
        from bench.floor import lookup_app

        return lookup_app(), []
    if variant.startswith(PUBLIC):
        parts = set(variant.removeprefix(PUBLIC).split(","))
        if "ALL" in parts:
            parts = set(PUBLIC_PATHS)
        if parts - set(PUBLIC_PATHS):
            raise SystemExit(f"no such public path: {', '.join(sorted(parts - set(PUBLIC_PATHS)))}")
        app = _service(set())
        return app, _public_swaps(app, parts)
    if variant != "service" and not variant.startswith(WITHOUT):
        raise SystemExit(f"unknown variant {variant!r}")
    left_out = set(variant.removeprefix(WITHOUT).split(",")) if variant != "service" else set()
    return _service(left_out), []


def _service(left_out: set[str]) -> Any:
    """``create_app()`` without the steps in ``left_out``, and without the clock-driven
    watchers (see the module's docstring)."""
    import service.pipeline as pipeline
    from service.app import create_app
    from service.obs.watchers import Watchers

    if "ALL" in left_out:
        left_out |= {step.name for step in pipeline.STEPS}
    unknown = left_out - {step.name for step in pipeline.STEPS} - {"ALL", "header_limit"}
    if unknown:
        raise SystemExit(f"no such step: {', '.join(sorted(unknown))}")
    steps = tuple(step for step in pipeline.STEPS if step.name not in left_out)
    saved = pipeline.install.__defaults__
    pipeline.install.__defaults__ = (steps, pipeline.WRAPPERS)
    try:
        app = create_app()
    finally:
        pipeline.install.__defaults__ = saved
    # The watchers' serving hooks are taken off again: their timers would be counted.
    for hooks in (app.before_serving_funcs, app.after_serving_funcs):
        hooks[:] = [
            hook for hook in hooks if not isinstance(getattr(hook, "__self__", None), Watchers)
        ]
    if "header_limit" in left_out:
        app.asgi_app = type(app).asgi_app.__get__(app)  # type: ignore[method-assign]
    return app


def _public_swaps(app: Any, parts: set[str]) -> list[Swap]:
    """What puts ``app`` back on the public path for each of ``parts``."""

    swaps: list[Swap] = []
    if "make_response" in parts:
        from quart_schema.extension import wrap_make_response

        swaps.append((app, "make_response", wrap_make_response(app.make_response)))
    if "aiosql" in parts:
        import aiosql

        from service.backends.db import SQL_DIR
        from service.routes import users

        swaps.append((users, "queries", aiosql.from_path(SQL_DIR / "users.sql", "asyncpg")))
    return swaps


class _Swapped:
    """Sets each swap's value for the time of a ``with``, then puts the old one back."""

    def __init__(self, swaps: list[Swap]) -> None:
        self.swaps = swaps
        self.saved: list[Swap] = []

    def __enter__(self) -> None:
        self.saved = [(owner, name, getattr(owner, name)) for owner, name, _ in self.swaps]
        for owner, name, value in self.swaps:
            setattr(owner, name, value)

    def __exit__(self, *exc: object) -> None:
        for owner, name, value in reversed(self.saved):
            setattr(owner, name, value)


def _scope(email: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/users", "raw_path": b"/users",
        "query_string": f"email={email}".encode(), "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip


async def _lookups(app: ASGIApp, emails: list[str], count: int, headers: Any) -> None:
    async def one(email: str) -> None:
        received = False

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.Event().wait()  # the client never leaves
            raise AssertionError("unreachable")

        status: list[int] = []

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(_scope(email, headers), receive, send)
        if status != [200]:
            raise RuntimeError(f"the lookup answered {status}")

    async def worker(start: int) -> None:
        for i in range(start, count, CONCURRENCY):
            await one(emails[i % len(emails)])

    await asyncio.gather(*(worker(k) for k in range(CONCURRENCY)))


def _control(flag: str) -> None:
    # callgrind_control asks valgrind, which answers between two of this process's basic
    # blocks: keep running (a little busy loop) until it has.
    asker = subprocess.Popen(["callgrind_control", flag, str(os.getpid())],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    while asker.poll() is None:
        sum(range(1000))


def _counted(out: str) -> int:
    newest = max(glob.glob(f"{out}.*"), key=os.path.getmtime)
    for line in Path(newest).read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {newest}")


async def _inner(args: argparse.Namespace, emails: list[str]) -> None:
    key = os.environ.get("BENCH_KEY")
    headers = [(b"host", b"127.0.0.1"), (b"user-agent", b"bench"), (b"accept", b"*/*")]
    if key:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    built = [_build(variant) for variant in args.variants]
    apps = [app for app, _ in built]
    for app in apps:
        await app.startup()
    for app, swaps in built:
        with _Swapped(swaps):
            await _lookups(app, emails, 400, headers)  # warm: statements prepared, caches filled
    out = os.environ["BENCH_CALLGRIND_OUT"]
    _control("--instr=on")
    _control("-z")
    _control("-d")
    idle = _counted(out)  # what the asking itself costs
    for variant, (app, swaps) in zip(args.variants, built, strict=True):
        gc.collect()
        gc.freeze()
        with _Swapped(swaps):
            _control("-z")
            await _lookups(app, emails, args.requests, headers)
            _control("-d")
        per_request = (_counted(out) - idle) / args.requests
        print(f"RESULT\t{variant}\t{per_request:.0f}", flush=True)
    for app in apps:
        await app.shutdown()


def _environment(url: str, folder: Path, production: bool) -> dict[str, str]:
    from service.ops.keygen import generate_key, key_entry
    from tools.devstack import ensure_services

    env = {
        **os.environ,
        **ensure_services(dict(os.environ)),
        "DATABASE_URL": url,
        "PYTHONPATH": str(ROOT),
        # The same dict and set layouts in every run (string hashes are seeded per process).
        "PYTHONHASHSEED": "0",
        "REDIS_PREFIX": f"bench:instructions:{secrets.token_hex(4)}:",
        "DB_POOL_MIN_SIZE": str(CONCURRENCY),
        "DB_POOL_MAX_SIZE": str(CONCURRENCY),
        # Under valgrind every query and every loop tick is slow by the clock: no warnings.
        "SLOW_QUERY_THRESHOLD": "600",
        "LOOP_BLOCK_THRESHOLD": "60",
        "BENCH_EMAILS": str(folder / "emails.txt"),
        "BENCH_CALLGRIND_OUT": str(folder / "callgrind.out"),
    }
    for setting in ("ENVIRONMENT", "API_KEYS", "RATE_LIMIT_ENABLED"):
        env.pop(setting, None)
    if production:
        key = generate_key()
        env.update(
            ENVIRONMENT="production",
            API_KEYS=key_entry("bench", key, ("read", "write", "admin")),
            TASK_ID_SECRET=secrets.token_hex(32),
            RATE_LIMIT_ENABLED="true",
            RATE_LIMIT_READ=str(10**9),
            RATE_LIMIT_WRITE=str(10**9),
            RATE_LIMIT_ADMIN=str(10**9),
            # The limiter syncs by the clock (every 50 ms by default), and valgrind runs about
            # 50 times slower: syncing every 2.5 s keeps its syncs per request near a real run.
            RATE_LIMIT_SYNC_INTERVAL="2.5",
            BENCH_KEY=key,
        )
    return env


async def _emails(url: str, count: int) -> list[str]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT email FROM users ORDER BY id LIMIT $1", count)
    finally:
        await conn.close()
    return [row["email"] for row in rows]


CONTROL_PATH = "/_bench/callgrind"


def served_app() -> ASGIApp:
    """``BENCH_VARIANT``'s app for Hypercorn (``--server``), its swaps in place for good, and
    one path of its own in front: ``CONTROL_PATH?FLAG`` passes FLAG to callgrind_control from
    inside the server (a process waiting in epoll would not answer it)."""
    app, swaps = _build(os.environ["BENCH_VARIANT"])
    _Swapped(swaps).__enter__()

    async def served(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == CONTROL_PATH:
            _control(scope["query_string"].decode())
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await app(scope, receive, send)

    return served


async def _over_http(base_url: str, emails: list[str], count: int, key: str | None) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=120) as http:

        async def worker(start: int) -> None:
            for i in range(start, count, CONCURRENCY):
                answer = await http.get("/users", params={"email": emails[i % len(emails)]},
                                        headers=headers)  # fmt: skip
                if answer.status_code != 200:
                    raise RuntimeError(f"the lookup answered {answer.status_code}")

        await asyncio.gather(*(worker(k) for k in range(CONCURRENCY)))


def _wait_until_answering(base_url: str, process: subprocess.Popen[bytes]) -> None:
    """Until the server answers HTTP at all (the floor has no /healthz); minutes under valgrind."""
    import time

    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before serving")
        try:
            httpx.get(f"{base_url}/users?email=nobody%40example.com", timeout=10)
            return
        except httpx.TransportError:
            time.sleep(0.5)
    raise RuntimeError(f"the server at {base_url} did not answer within 300 s")


def _count_served(variant: str, env: dict[str, str], folder: Path, requests: int) -> float:
    """Instructions per lookup of the whole Hypercorn process serving ``variant``."""
    import httpx

    from tools.private_servers import free_port

    port = free_port()
    out = folder / f"server-{port}.out"
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p",
        sys.executable, "-m", "hypercorn", "--config", str(ROOT / "hypercorn.toml"),
        "--workers", "0", "--bind", f"127.0.0.1:{port}", "bench.instructions:served_app()",
    ]  # fmt: skip
    log = (folder / f"server-{port}.log").open("wb")
    process = subprocess.Popen(
        command, env={**env, "BENCH_VARIANT": variant}, cwd=ROOT, stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    emails = Path(env["BENCH_EMAILS"]).read_text().split()
    key = env.get("BENCH_KEY")

    def control(flag: str) -> None:
        httpx.get(f"{base_url}{CONTROL_PATH}?{flag}", timeout=120).raise_for_status()

    try:
        _wait_until_answering(base_url, process)
        asyncio.run(_over_http(base_url, emails, 400, key))  # warm
        control("--instr=on")
        control("-z")
        control("-d")
        idle = _counted(str(out))
        control("-z")
        asyncio.run(_over_http(base_url, emails, requests, key))
        control("-d")
        return (_counted(str(out)) - idle) / requests
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.inner:
        import uvloop

        uvloop.install()
        asyncio.run(_inner(args, Path(os.environ["BENCH_EMAILS"]).read_text().split()))
        return 0
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        raise BenchError("valgrind is not installed (Debian: apt-get install valgrind).")
    server, name = database.server_url(), database.new_database_name()
    try:
        url = database.prepare(server, name, 20_000)
        with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
            folder = Path(tmp)
            (folder / "emails.txt").write_text("\n".join(asyncio.run(_emails(url, 2000))))
            env = _environment(url, folder, args.production)
            if args.server:
                say(f"counting {len(args.variants)} servers under callgrind (about 1 min each)")
                results = [
                    [variant, f"{_count_served(variant, env, folder, args.requests):.0f}"]
                    for variant in args.variants
                ]
                return _report(args, results, "through Hypercorn (--workers 0)")
            say(f"counting {len(args.variants)} variants under callgrind (about 20 s each)")
            command = [
                "valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={folder / 'callgrind.out'}.%p",
                sys.executable, "-m", "bench.instructions", "--inner",
                "--requests", str(args.requests), *args.variants,
            ]  # fmt: skip
            done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
            results = [line.split("\t")[1:] for line in done.stdout.splitlines()
                       if line.startswith("RESULT\t")]  # fmt: skip
            if done.returncode != 0 or len(results) != len(args.variants):
                tail = "\n".join(done.stderr.splitlines()[-15:])
                raise RuntimeError(f"the counting run failed ({done.returncode}):\n{tail}")
    finally:
        database.drop_database(server, name)
    return _report(args, results, "in-process")


def _report(args: argparse.Namespace, results: list[list[str]], where: str) -> int:
    base = float(results[0][1])
    config = "production" if args.production else "development"
    print(f"Instructions per users lookup, {where} ({config} configuration), "
          f"{args.requests} requests each")  # fmt: skip
    print(f"{'instructions':>12}  {'x first':>7}  variant")
    for variant, count in results:
        print(f"{float(count) / 1000:11.0f}k  {float(count) / base:7.3f}  {variant}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
