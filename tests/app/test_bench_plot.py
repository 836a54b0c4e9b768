"""bench/plot.py draws a benchmark run's JSON as a PNG beside it.

The drawing runs as ``python -m bench.plot`` in its own process with an empty home and empty
matplotlib and XDG folders, as on a machine that never ran matplotlib: there its first import
builds the font cache by running ``fc-list``. Drawn inside the test process, the test passed only
where that cache already existed, and failed on a new machine, where the fast tests refuse to
start a process (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools import ROOT

pytestmark = pytest.mark.slow  # a Python process; matplotlib's first import runs fc-list


def _newest_run_with_rounds() -> Path:
    runs = sorted((ROOT / "bench" / "results").glob("2*.json"))
    return next(p for p in reversed(runs) if "rounds" in json.loads(p.read_text()))


def _new_machine_env(root: Path) -> dict[str, str]:
    """The environment with a home and matplotlib and XDG folders that hold nothing yet."""
    folders = {
        name: root / name.lower()
        for name in ("HOME", "MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME")
    }
    for folder in folders.values():
        folder.mkdir()
    return {**os.environ, **{name: str(folder) for name, folder in folders.items()}}


def test_a_run_is_drawn_beside_its_json_on_a_machine_without_a_font_cache(
    tmp_path: Path,
) -> None:
    source = _newest_run_with_rounds()
    copy = tmp_path / "run" / source.name
    copy.parent.mkdir()
    shutil.copy(source, copy)
    env = _new_machine_env(tmp_path)

    done = subprocess.run(
        [sys.executable, "-m", "bench.plot", str(copy)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr
    picture = copy.with_suffix(".png")
    assert done.stdout.strip() == str(picture)
    data = picture.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 20_000  # two panels drawn, not an empty canvas
    # It started from nothing: matplotlib built its font cache in the empty folder given.
    assert list(Path(env["MPLCONFIGDIR"]).glob("fontlist-*.json"))
