"""bench/plot.py draws a benchmark run's JSON as a PNG beside it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench.plot import draw
from tools import ROOT


def test_a_run_is_drawn_beside_its_json(tmp_path: Path) -> None:
    runs = sorted(p for p in (ROOT / "bench" / "results").glob("2*.json"))
    source = next(p for p in reversed(runs) if "rounds" in json.loads(p.read_text()))
    copy = tmp_path / source.name
    shutil.copy(source, copy)
    picture = draw(copy)
    assert picture == copy.with_suffix(".png")
    data = picture.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 20_000  # two panels drawn, not an empty canvas
