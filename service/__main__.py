"""Operator commands: ``python -m service migrate``."""

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
