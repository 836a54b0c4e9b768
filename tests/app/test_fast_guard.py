"""The guard of tests/conftest.py: a test not marked slow cannot start a process, by any route.

`make test-fast` promises no process started; a test that starts one unmarked fails here
instead of passing by luck (as the benchmark picture did where matplotlib's font cache existed).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.context import ForkContext, ForkServerContext, SpawnContext

import pytest

REFUSED = "starts a process: mark it @pytest.mark.slow"


def _nothing() -> None:
    """A child's whole work: it must be importable for the spawn and forkserver methods."""


def test_subprocess_is_refused() -> None:
    with pytest.raises(RuntimeError, match=REFUSED):
        subprocess.run([sys.executable, "-c", "pass"], check=False)


async def test_an_asyncio_subprocess_is_refused() -> None:
    with pytest.raises(RuntimeError, match=REFUSED):
        await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")


@pytest.mark.parametrize(
    "context",
    [multiprocessing.get_context(method) for method in ("fork", "spawn", "forkserver")],
    ids=lambda context: context.get_start_method(),
)
def test_multiprocessing_is_refused_whatever_its_start_method(
    context: ForkContext | SpawnContext | ForkServerContext,
) -> None:
    child = context.Process(target=_nothing)
    with pytest.raises(RuntimeError, match=REFUSED):
        child.start()


def test_a_process_pool_is_refused() -> None:
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
    with pool, pytest.raises(RuntimeError, match=REFUSED):
        pool.submit(_nothing).result(timeout=60)


def test_os_fork_is_refused() -> None:
    with pytest.raises(RuntimeError, match=REFUSED):
        os.fork()


def test_os_system_is_refused() -> None:
    with pytest.raises(RuntimeError, match=REFUSED):
        os.system("true")  # noqa: S605 -- a fixed command; refused before any shell


@pytest.mark.slow
def test_a_test_marked_slow_starts_processes() -> None:
    done = subprocess.run([sys.executable, "-c", "print('ok')"], capture_output=True, text=True)
    assert done.stdout == "ok\n"
    child = multiprocessing.get_context("fork").Process(target=_nothing)
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
