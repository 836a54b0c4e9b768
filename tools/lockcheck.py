"""``make lock-check``: requirements.lock installs and works on each Python CI tests.

For each version: a throwaway virtualenv of that Python (found as ``make test-py`` finds it,
tools/find_python.sh), the lock installed into it as the Containerfile installs it (every file
checked against its hash, wheels only; by uv, which fetches in parallel: pip took 60-100 s per
Python here), ``uv pip check``, and then, from the repository's ``service/`` and ``workers/`` as
the images copy them, the app built and the worker's options loaded. A lock that resolves for
one Python only (a marker missing, a wheel absent for a newer Python, a dependency that drops an
older one) fails here, naming the version.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools import ROOT

LOCK = ROOT / "requirements.lock"
FIND_PYTHON = ROOT / "tools" / "find_python.sh"
# uv comes with the development dependencies, beside this interpreter.
UV = str(Path(sys.executable).parent / "uv")

# Run by the locked interpreter: what the images' two commands import first.
SMOKE = """
import platform
from importlib.metadata import version
from service.app import create_app
from service.config import load_settings
from workers.settings import worker_options
app = create_app()
options = worker_options(load_settings())
print(f"Python {platform.python_version()}, Quart {version('quart')}, arq {version('arq')}:",
      "the app built and the worker's", len(options), "options loaded")
"""


class LockError(SystemExit):
    """The lock does not install or work on one of the Pythons."""


def interpreter(version: str) -> str:
    found = subprocess.run(["sh", str(FIND_PYTHON), version], capture_output=True, text=True)
    if found.returncode != 0:
        raise LockError(found.stderr.strip())
    return found.stdout.strip()


def check(version: str) -> str:
    """Install the lock on Python ``version``; one line saying what ran."""
    python = interpreter(version)
    with tempfile.TemporaryDirectory(prefix=f"lock-{version}-") as tmp:
        venv = Path(tmp) / "venv"
        target = str(venv / "bin" / "python")
        steps = [
            [UV, "venv", "--quiet", "--python", python, str(venv)],
            [UV, "pip", "install", "--quiet", "--python", target, "--require-hashes",
             "--only-binary", ":all:", "-r", str(LOCK)],
            [UV, "pip", "check", "--quiet", "--python", target],
        ]  # fmt: skip
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                raise LockError(
                    f"Python {version}: {' '.join(step[:3])} failed:\n{done.stdout}{done.stderr}"
                )
        # No DATABASE_URL or REDIS_URL is needed: nothing connects until the app serves.
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ENVIRONMENT": "development"}
        smoke = subprocess.run(
            [str(venv / "bin" / "python"), "-c", SMOKE],
            capture_output=True, text=True, env=env, cwd=tmp,
        )  # fmt: skip
        if smoke.returncode != 0:
            raise LockError(f"Python {version}: the app does not load from the lock:\n"
                            f"{smoke.stderr[-3000:]}")  # fmt: skip
        return smoke.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools lock-check", description=__doc__)
    parser.add_argument("versions", nargs="+", help="Python versions, e.g. 3.11 3.12 3.13")
    args = parser.parse_args(argv)
    for version in args.versions:
        started = time.monotonic()
        line = check(version)
        print(f"lock-check {version}: {line} ({time.monotonic() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
