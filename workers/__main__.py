"""``python -m workers``: run the arq worker. ``python -m workers health``: exit 0 only while a
worker on this queue is alive (for a container health check)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import redis.asyncio as aioredis

from service.config import ConfigError, Settings, load_settings

from . import queue


async def _healthy(settings: Settings) -> bool:
    client = aioredis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return bool(await client.exists(queue.health_check_key(settings)))
    except Exception:
        return False
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers")
    parser.add_argument("command", nargs="?", choices=["run", "health"], default="run")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2

    if args.command == "health":
        alive = asyncio.run(_healthy(settings))
        print("worker alive" if alive else "no live worker on this queue")
        return 0 if alive else 1

    from arq.worker import Worker

    from .settings import worker_options

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is optional off Linux
        pass
    worker = Worker(**worker_options(settings))
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
