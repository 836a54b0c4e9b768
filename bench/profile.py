"""Where a request's CPU time goes: py-spy on a running Hypercorn worker under the users load.

    .venv/bin/python -m bench.profile                       # the service, production config
    .venv/bin/python -m bench.profile --system service-dev --duration 20

Starts what ``python -m bench`` starts (a fresh database, a private Redis, the system), puts
the users load on it with wrk, records one Hypercorn worker with ``py-spy record --format raw``
(idle frames left out, so the shares are of the time the worker spends on the CPU), and prints
the share of samples in which each part of the stack appears (inclusive, so shares overlap:
a log line written inside a hook counts for both), then the service's own functions. The raw
file and a flame graph (SVG) stay in bench/.logs/profile-<time>/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench import database, scenarios
from bench.load import finish_wrk, start_wrk, wrk_command
from bench.options import BENCH, SYSTEMS, Options, say
from bench.procs import Group, _cmdline
from bench.run import stopping
from bench.systems import Backends, check_tools, start_private_redis, start_system

# (part, frame pattern, exclusion) in the order printed: a sample counts for a part when one of
# its frames matches the pattern and no frame below that one matches the exclusion (so a
# decorator's share leaves out the view it wraps). Parts overlap: a log line written inside a
# hook counts for both. A pattern of None: the samples with no Quart frame at all.
PARTS: list[tuple[str, str | None, str | None]] = [
    ("outside the app: Hypercorn, h11, the loop (no Quart frame)", None, None),
    ("  h11 itself", r"\(h11/", None),
    ("Quart's ASGI layer besides handle_request (sending the response)",
     r"^ASGIHTTPConnection\.", r"^Quart\.handle_request "),
    ("Quart: handle_request and below (the whole request)", r"^Quart\.handle_request ", None),
    ("  the request context (URL binding, headers)", r"^Quart\.request_context ", None),
    ("  before_request hooks (all)", r"^Quart\.preprocess_request ", None),
    ("  query-string validation (the wrapper, without the view)", r"^validate_query",
     r"^list_users "),
    ("  the view (list_users and below)", r"^list_users ", None),
    ("    asyncpg Connection.fetch (the query)", r"^Connection\.fetch ", None),
    ("    query timing (service/obs/querylog.py)", r"\(service/obs/querylog\.py", None),
    ("    connection wrapper without the query",
     r"^(connection\.__aenter__|connection\.__aexit__|_raise_for) \(service/", r"^Queries\."),
    ("    pool release", r"^Pool\.release ", None),
    ("  building the response (make_response)", r"^Quart\.make_response ", None),
    ("  after_request hooks (all)", r"^Quart\.process_response ", None),
    ("  teardown hooks and context exit", r"^Quart\.do_teardown_request ", None),
    ("  the pipeline's before steps (Pipeline.before_request)", r"^Pipeline\.before_request ",
     None),
    ("  the pipeline's after steps (Pipeline.after_request)", r"^Pipeline\.after_request ", None),
    ("request id (assign, echo)", r"^(assign|echo) \(service/pipeline/request_id", None),
    ("auth: key and scope, key verdict (identify, judge)",
     r"^(identify|judge) \(service/pipeline/auth", None),
    ("  the key lookup (find_key)", r"^find_key \(service/pipeline/auth", None),
    ("rate limit step (count, RateLimiter.hit)", r"^count \(service/pipeline/ratelimit", None),
    ("  redis-py client (the Redis round trip's CPU)", r"\(redis/", None),
    ("body checks", r"\(service/pipeline/body", None),
    ("exposure headers (after)", r"^exposure \(service/pipeline/headers", None),
    ("metrics (record_metrics)", r"^record_metrics \(service/pipeline/timing", None),
    ("request log line (log_request)", r"^log_request \(service/pipeline/access_log", None),
    ("  prometheus_client (labels, observe, inc)", r"\(prometheus_client/", None),
    ("    multiprocess value writes", r"\(prometheus_client/(mmap_dict|values)\.py", None),
    ("  logging module (every line logged)", r"\(logging/__init__\.py", None),
    ("    the JSON formatter", r"\(service/obs/logs\.py", None),
    ("loop watch: activity steps, ticker",
     r"(_activity|_tick) \(service/(obs/loopwatch|pipeline/activity)", None),
    ("JSON encoding (json module)", r"\(json/", None),
]  # fmt: skip
IDLE = re.compile(r"^(Condition\.wait|Event\.wait) \(threading\.py")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--system", default="service", choices=SYSTEMS)
    parser.add_argument("--duration", type=int, default=15, help="seconds recorded")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    return parser.parse_args(argv)


def _worker_pid(group: Group) -> int:
    """One Hypercorn worker (a spawned child) of the group."""
    for pid in group.pids():
        text = " ".join(_cmdline(pid))
        if "multiprocessing" in text and "resource_tracker" not in text:
            return pid
    raise RuntimeError(f"no Hypercorn worker in {group.name}")


def record(pid: int, seconds: int, rate: int, out: Path, fmt: str) -> None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    subprocess.run(
        [py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(rate),
         "--format", fmt, "--output", str(out), "--nonblocking"],
        check=True, capture_output=True,
    )  # fmt: skip


def summarise(raw: Path) -> list[str]:
    """The shares of the parts (inclusive) and of the service's own functions."""
    stacks: list[tuple[list[str], int]] = []
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if stack and number.isdigit():
            stacks.append((stack.split(";"), int(number)))
    # py-spy takes a thread waiting on a lock with a timeout (the loop watch's watcher thread,
    # which wakes every few ms and goes back to sleep) for a running one: not CPU time.
    stacks = [(frames, n) for frames, n in stacks if not IDLE.search(frames[-1])]
    total = sum(count for _, count in stacks) or 1
    out = [f"{total} samples on the CPU"]
    in_app = re.compile(r"^(Quart|ASGIHTTPConnection)\.")
    for name, pattern, exclude in PARTS:
        hits = 0
        for frames, count in stacks:
            if pattern is None:
                hits += 0 if any(in_app.search(f) for f in frames) else count
                continue
            where = [i for i, f in enumerate(frames) if re.search(pattern, f)]
            if where and not (exclude and any(re.search(exclude, f) for f in frames[where[0] :])):
                hits += count
        out.append(f"{100 * hits / total:5.1f}%  {name}")
    own: Counter[str] = Counter()
    for frames, count in stacks:
        for frame in {f for f in frames if "(service/" in f}:
            own[re.sub(r":\d+\)$", ")", frame)] += count
    out.append("")
    out.append("the service's own functions (inclusive):")
    out += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(25)]
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    check_tools()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    logs = BENCH / ".logs" / f"profile-{stamp}"
    server, name = database.server_url(), database.new_database_name()
    started: list[Group] = []
    opts = Options(args.users, args.duration, 2, 1, args.connections, 1, 1, 1, 1,
                   [args.system], ["users"], False, logs, "none")  # fmt: skip
    try:
        url = database.prepare(server, name, args.users)
        with stopping(started):
            backends = Backends(url, start_private_redis(logs, started), None)
            system = start_system(args.system, backends, logs, started)
            ctx = scenarios.Context(opts, backends)
            scenarios.warm_up(system, ctx)
            pid = _worker_pid(system.groups[0])
            load = start_wrk(wrk_command(system, "users", args.connections, args.duration + 8,
                                         args.users))  # fmt: skip
            say(f"recording worker {pid} for {args.duration} s")
            record(pid, args.duration, args.rate, logs / "profile.raw", "raw")
            record(pid, 5, args.rate, logs / "profile.svg", "flamegraph")
            figures = finish_wrk(load, args.duration + 8)
    finally:
        database.drop_database(server, name)
    print(f"{args.system}: {figures.rps:.0f} req/s during the recording")
    print("\n".join(summarise(logs / "profile.raw")))
    print(f"\nraw stacks and a flame graph in {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
