"""Operator commands: ``python -m service migrate``, ``python -m service doctor``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from .config import ConfigError, load_settings
from .db import migrate_database


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="apply the migrations in sql/migrations")
    doctor = commands.add_parser(
        "doctor", help="check a running deployment against the five causes of slow requests"
    )
    doctor.add_argument("--url", default="http://127.0.0.1:8000", help="the API's base URL")
    doctor.add_argument(
        "--window", type=float, default=300, help="seconds back a blocked loop counts"
    )
    doctor.add_argument("--worker-metrics-url", help="the worker's metrics (WORKER_METRICS_PORT)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        settings = load_settings()
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    if args.command == "migrate":
        applied = asyncio.run(migrate_database(settings))
        print(f"migrations applied: {', '.join(applied) if applied else 'none (up to date)'}")
    if args.command == "doctor":
        from .doctor import diagnose, render_table, worst

        checks = asyncio.run(
            diagnose(
                settings, args.url, window=args.window, worker_metrics_url=args.worker_metrics_url
            )
        )
        print(render_table(checks))
        return 1 if worst(checks) == "fail" else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
