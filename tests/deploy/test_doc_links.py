"""The link check of `make check` (rumdl, configured in pyproject.toml's [tool.rumdl]): run with
the repository's own configuration on a small tree of Markdown files, it reports every relative
link to a missing file or folder and every #anchor with no heading behind it, in any folder,
and nothing else: not a link that resolves, not a web link (never fetched), not a file under
an ignored folder such as .venv/."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TREE = {
    ".gitignore": ".venv/\n",
    "README.md": (
        "# Entry\n\n"
        "[good](docs/guide.md#part-two) [web](https://example.invalid/nowhere) [own](#entry)\n"
        "[missing file](docs/gone.md) [missing anchor](docs/guide.md#no-such-part)\n"
        "[missing own anchor](#nope)\n"
    ),
    "docs/guide.md": "# Guide\n\n## Part two\n\n[up](../README.md#entry) [code](../src/x.py)\n",
    "docs/deep/page.md": "# Deep\n\n[folder](../../missing-folder/) [file](../guide.md)\n",
    ".venv/lib/ignored.md": "[ignored](nothing-here.md)\n",
}


def rumdl() -> str:
    # rumdl is a development dependency (pyproject.toml): missing, the test fails.
    found = shutil.which("rumdl") or str(Path(sys.executable).parent / "rumdl")
    assert Path(found).exists(), "rumdl is not installed (pip install -e '.[dev]')"
    return found


def test_the_link_check_reports_each_broken_link_and_anchor_and_nothing_else(
    tmp_path: Path,
) -> None:
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for name, text in TREE.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    result = subprocess.run(
        [rumdl(), "check", "."], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )

    found = sorted(
        (match.group(1), match.group(2))
        for match in re.finditer(r"^(\S+?):\d+:\d+: \[(MD\d+)\]", result.stdout, re.MULTILINE)
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert found == [
        ("README.md", "MD051"),  # #nope in the same file
        ("README.md", "MD051"),  # #no-such-part in docs/guide.md
        ("README.md", "MD057"),  # docs/gone.md
        ("docs/deep/page.md", "MD057"),  # a missing folder
        ("docs/guide.md", "MD057"),  # a link to a file that is not Markdown
    ], result.stdout
    for target in ("docs/gone.md", "no-such-part", "#nope", "missing-folder", "src/x.py"):
        assert target in result.stdout, (target, result.stdout)
    for fine in ("part-two", "example.invalid", "#entry", "'../guide.md'", "ignored.md"):
        assert fine not in result.stdout, (fine, result.stdout)
