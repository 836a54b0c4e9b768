"""The many-host run's load: mixed requests through the load balancer, one JSON line each.

``python -m tools.cluster_load URL SECONDS OUT STOP``: user lookups and creates, the report,
and tasks (submitted, then polled by id), from a few concurrent loops, each pausing between
requests, until the file STOP exists or SECONDS pass; then every accepted task is followed
until it ends (bounded).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

import httpx

LOOPS = 6
PAUSE = 0.02
KINDS = ("lookup", "create", "report", "task")
# Each kind's HTTP method: the balancer retries a failed request only when it is idempotent.
METHODS = {"lookup": "GET", "create": "POST", "report": "GET", "task": "POST"}


class Recorder:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.accepted: list[tuple[str, float]] = []

    def record(self, kind: str, started: float, status: int, **extra: Any) -> None:
        latency, now = time.monotonic() - started, time.time()
        line: dict[str, Any] = {"t": now, "kind": kind, "method": METHODS[kind], "status": status}
        line["latency"] = round(latency, 4)
        line["start"] = round(now - latency, 4)
        line.update(extra)
        self.out.write(json.dumps(line) + "\n")


async def _one(http: httpx.AsyncClient, kind: str, recorder: Recorder, turn: int) -> None:
    started = time.monotonic()
    try:
        if kind == "lookup":
            response = await http.get("/users", params={"email": "load@example.com"})
        elif kind == "create":
            email = f"u{uuid.uuid4().hex[:12]}@example.com"
            response = await http.post("/users", json={"email": email, "name": "Load"})
        elif kind == "report":
            response = await http.get("/expensive-operation")
        else:
            # Every 25th task runs ~0.2 s, so a worker killed mid-run may well hold one.
            n = 2_000_000 if turn % 25 == 0 else 200_000 + turn
            response = await http.post("/tasks", json={"n": n})
    except httpx.HTTPError as error:
        recorder.record(kind, started, 0, error=type(error).__name__)
        return
    extra = {}
    if response.status_code >= 500:
        # Who refused: the service's problem+json, or HAProxy's own page (no server left).
        is_problem = response.headers.get("content-type", "").startswith("application/problem")
        extra["by"] = "service" if is_problem else "balancer"
    recorder.record(kind, started, response.status_code, **extra)
    if kind == "task" and response.status_code == 202:
        recorder.accepted.append((response.json()["id"], time.time()))


async def _loop(
    http: httpx.AsyncClient, index: int, until: float, stop: Path, recorder: Recorder
) -> None:
    turn = index
    while time.monotonic() < until and not os.path.exists(stop):  # noqa: ASYNC240 (one stat)
        await _one(http, KINDS[turn % len(KINDS)], recorder, turn)
        turn += 1
        await asyncio.sleep(PAUSE)


async def _follow(http: httpx.AsyncClient, recorder: Recorder, within: float) -> dict[str, str]:
    """Every accepted task's final state: complete, failed, lost (404) or unfinished."""
    states: dict[str, str] = {}
    pending = [task_id for task_id, _ in recorder.accepted]
    deadline = time.monotonic() + within
    while pending and time.monotonic() < deadline:
        for task_id in list(pending):
            try:
                response = await http.get(f"/tasks/{task_id}")
            except httpx.HTTPError:
                continue
            if response.status_code == 404:
                states[task_id] = "lost"
            elif response.status_code == 200 and response.json()["status"] in (
                "complete",
                "failed",
            ):
                states[task_id] = response.json()["status"]
            else:
                continue
            pending.remove(task_id)
        await asyncio.sleep(0.5)
    states.update(dict.fromkeys(pending, "unfinished"))
    return states


async def run(
    url: str, seconds: float, out_path: Path, stop: Path, follow_within: float = 120
) -> None:
    with out_path.open("w") as out:
        recorder = Recorder(out)
        async with httpx.AsyncClient(base_url=url, timeout=15) as http:
            await http.post("/users", json={"email": "load@example.com", "name": "Load"})
            until = time.monotonic() + seconds
            await asyncio.gather(*(_loop(http, i, until, stop, recorder) for i in range(LOOPS)))
            states = await _follow(http, recorder, follow_within)
        accepted_at = dict(recorder.accepted)
        for task_id, state in states.items():
            out.write(json.dumps({"task": task_id, "state": state, "t": accepted_at[task_id]}))
            out.write("\n")


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1], float(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])))
