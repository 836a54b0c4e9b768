"""Which way imports run: the contracts in pyproject.toml, and a worker that never loads Quart."""

from __future__ import annotations

import re

import pytest
import redis.asyncio as aioredis
from importlinter import configuration
from importlinter.application.use_cases import lint_imports

from service.backends.redis import redis_pool
from service.backends.taskqueue import TaskQueue
from service.config import Settings
from tests.support.worker_procs import settings_env, start_worker, stop, wait_for_health
from tools import ROOT

# The web stack: none of it belongs in the worker.
WEB_PACKAGES = ("quart", "quart_schema", "quart_cors", "hypercorn", "werkzeug")


def test_the_import_contracts_hold() -> None:
    """service/ imports no workers/ (nor tools, tests, bench), the worker's modules import no
    Quart, no sibling packages or modules import each other in a cycle, each room of service/
    imports only the rooms below it, only the pipeline imports its own modules, the backends
    load no web framework, and config.py and errors.py import (next to) nothing of the
    service."""
    # The use case, not the command line's function: that one reconfigures logging for the
    # whole process, which would silence the loggers later tests capture.
    configuration.configure()
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), cache_dir=None, no_logo=True)


@pytest.mark.slow
async def test_the_worker_runs_a_task_without_loading_quart(settings: Settings) -> None:
    # Python's import-time report lists every module a process imports, whenever it does so:
    # the worker's start, its compute processes and the job's first run included.
    process = start_worker({**settings_env(settings), "PYTHONPROFILEIMPORTTIME": "1"})
    client = aioredis.Redis(connection_pool=redis_pool(settings))
    try:
        wait_for_health(settings, process)
        tasks = TaskQueue(client, settings)
        task, _ = await tasks.submit(1000)
        done = await tasks.wait(task.id, 20)
        assert done is not None
        assert (done.status, done.result) == ("complete", 332_833_500)
    finally:
        await client.aclose(close_connection_pool=True)
        printed = stop(process)
    imported = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+([\w.]+)$", printed, re.M))
    assert {"arq.worker", "workers.settings", "workers.jobs", "pebble"} <= imported, printed
    assert sorted(name for name in imported if name.split(".")[0] in WEB_PACKAGES) == []
