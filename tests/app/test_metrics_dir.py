"""The multiprocess metrics folder is private: another local user cannot plant it first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.obs.metrics import UnsafeMetricsDir, private_dir
from tests.support.hypercorn import ROOT

NOBODY = 65534


def test_a_missing_folder_is_made_private(tmp_path: Path) -> None:
    folder = private_dir(tmp_path / "metrics")
    assert folder.stat().st_mode & 0o777 == 0o700
    assert private_dir(folder) == folder  # ours already: accepted again


def test_a_folder_another_user_made_first_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "metrics"
    folder.mkdir(mode=0o700)
    os.chown(folder, NOBODY, NOBODY)
    with pytest.raises(UnsafeMetricsDir, match="owned by uid 65534"):
        private_dir(folder)


def test_a_folder_others_can_write_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "metrics"
    folder.mkdir()
    folder.chmod(0o777)
    with pytest.raises(UnsafeMetricsDir, match="mode 777"):
        private_dir(folder)


def test_a_symlinked_folder_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.mkdir(mode=0o700)
    (tmp_path / "metrics").symlink_to(target)
    with pytest.raises(UnsafeMetricsDir, match="symlink"):
        private_dir(tmp_path / "metrics")
    assert list(target.iterdir()) == []


@pytest.mark.slow
def test_the_service_refuses_to_load_on_a_planted_folder_and_writes_nothing_through_it(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    planted = tmp_path / "planted"
    planted.mkdir()
    planted.chmod(0o777)
    # What an attacker leaves: links where prometheus-client will open its files.
    for kind in ("counter", "gauge_livesum", "histogram", "gauge_max", "gauge_livemax"):
        (planted / f"{kind}_1.db").symlink_to(victim)
    result = subprocess.run(
        [sys.executable, "-c", "import service.obs.metrics"],
        cwd=ROOT,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(planted)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "refusing metrics folder" in result.stderr
    assert victim.read_text() == "precious"
