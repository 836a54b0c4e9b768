"""Median latency of a small job through GET /heavy-task, on an idle machine.

Starts nothing: point it at a running service (``make run``), e.g.
``python bench/task_latency.py --url http://127.0.0.1:8000 --requests 200``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()
    samples = []
    with httpx.Client(base_url=args.url, timeout=30) as http:
        http.get("/heavy-task", params={"n": args.n}).raise_for_status()  # warm-up
        for _ in range(args.requests):
            start = time.perf_counter()
            response = http.get("/heavy-task", params={"n": args.n})
            samples.append((time.perf_counter() - start) * 1000)
            response.raise_for_status()
    samples.sort()
    print(
        f"GET /heavy-task?n={args.n}: {len(samples)} requests, "
        f"median {statistics.median(samples):.1f} ms, "
        f"p90 {samples[int(len(samples) * 0.9)]:.1f} ms, max {samples[-1]:.1f} ms"
    )


if __name__ == "__main__":
    main()
