"""Operator commands: ``python -m service migrate``, ``keygen``, ``doctor``, ``preflight``,
``healthcheck``. (Development tools are ``python -m tools <command>`` instead.)

Each command is a module of service/ops/; this one reads the command line, and the settings for
the commands that need them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import TYPE_CHECKING

from service.ops import healthcheck

if TYPE_CHECKING:
    from service.config import Settings


def parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per operator command."""
    root = argparse.ArgumentParser(prog="python -m service")
    commands = root.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="apply the migrations in sql/migrations")
    keygen_parser = commands.add_parser("keygen", help="print a new API key and its API_KEYS entry")
    keygen_parser.add_argument(
        "--name", default="client", help="the key's name (logs, rate limits)"
    )
    # The scopes spelled out, not read from service.config: the health probe below runs every
    # few seconds and must not wait for pydantic to load (about a second on a busy machine).
    keygen_parser.add_argument(
        "--scopes", default="read", help="comma-separated, of read, write, admin (default: read)"
    )
    doctor = commands.add_parser(
        "doctor",
        help="check a running deployment: server, event loops, indexes, connections, Redis "
        "and the cache, the worker",
    )
    doctor.add_argument("--url", default="http://127.0.0.1:8000", help="the API's base URL")
    doctor.add_argument(
        "--window", type=float, default=300, help="seconds back a blocked loop counts"
    )
    doctor.add_argument("--worker-metrics-url", help="the worker's metrics (WORKER_METRICS_PORT)")
    doctor.add_argument(
        "--api-key-env",
        default="DOCTOR_API_KEY",
        help="environment variable holding an admin API key, for a deployment that enforces keys "
        "(default: DOCTOR_API_KEY); a key is never taken on the command line, where ps shows it",
    )
    preflight_parser = commands.add_parser(
        "preflight",
        help="exit 3 unless PostgreSQL and Redis answer; then migrate if asked, else exit 6 if "
        "the schema lacks this image's migrations; exec COMMAND",
    )
    preflight_parser.add_argument(
        "--needs",
        help="comma-separated dependencies to check, of postgres and redis (default: both)",
    )
    preflight_parser.add_argument("--migrate", action="store_true", help="migrate first")
    preflight_parser.add_argument("argv", metavar="COMMAND", nargs=argparse.REMAINDER)
    commands.add_parser(
        "healthcheck",
        help="exit 0 when HEALTHCHECK_URL (default http://127.0.0.1:8000/healthz) answers 200: "
        "the API image's health check",
    )
    return root


def main(argv: list[str] | None = None) -> int:
    commands = parser()
    args = commands.parse_args(argv)
    if args.command == "healthcheck":
        return healthcheck.main()
    # Imported here: the health probe above must stay quick, and needs none of them.
    if args.command == "keygen":
        from service.ops import keygen

        return keygen.main(args.name, args.scopes)
    from service.config import ConfigError, load_settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        settings = load_settings()
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    if args.command == "preflight":
        return _preflight(commands, args, settings)
    if args.command == "migrate":
        return _migrate(settings)
    if args.command == "doctor":
        return _doctor(args, settings)
    return 0


def _preflight(
    commands: argparse.ArgumentParser, args: argparse.Namespace, settings: Settings
) -> int:
    from service.ops import preflight

    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    given = preflight.DEPENDENCIES if args.needs is None else args.needs.split(",")
    needs = tuple(name.strip() for name in given if name.strip())
    unknown = set(needs) - set(preflight.DEPENDENCIES)
    if unknown or not needs:
        commands.error(f"--needs takes {','.join(preflight.DEPENDENCIES)}, not {args.needs!r}")
    if args.migrate and "postgres" not in needs:
        commands.error("--migrate needs postgres")
    return preflight.run(settings, command, needs=needs, migrate=args.migrate)


def _migrate(settings: Settings) -> int:
    import asyncpg

    from service.backends.db import MigrationChanged, MigrationRefused, migrate_database
    from service.ops import preflight

    try:
        applied = asyncio.run(migrate_database(settings))
    except (OSError, TimeoutError, asyncpg.PostgresError) as error:
        # Not a traceback: which variable to look at, and what PostgreSQL said.
        print(
            f"cannot migrate: the PostgreSQL of DATABASE_URL refused or did not answer "
            f"({type(error).__name__}: {error}); set DATABASE_URL to a server you may use",
            file=sys.stderr,
        )
        return 3
    except MigrationChanged as error:
        print(f"cannot migrate: {error}", file=sys.stderr)
        return preflight.MIGRATION_CHANGED_EXIT
    except MigrationRefused as error:
        print(f"cannot migrate: {error}", file=sys.stderr)
        return preflight.MIGRATION_REFUSED_EXIT
    print(f"migrations applied: {', '.join(applied) if applied else 'none (up to date)'}")
    return 0


def _doctor(args: argparse.Namespace, settings: Settings) -> int:
    from service.ops.doctor import diagnose, render_table, worst

    checks = asyncio.run(
        diagnose(
            settings,
            args.url,
            window=args.window,
            worker_metrics_url=args.worker_metrics_url,
            api_key=os.environ.get(args.api_key_env) or None,
        )
    )
    print(render_table(checks))
    return 1 if worst(checks) == "fail" else 0


if __name__ == "__main__":
    sys.exit(main())
