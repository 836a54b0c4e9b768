"""The Containerfile read as data: enough of its grammar for the tests to check it, and for them
and the scale-out tool to run its exact commands on the host."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from service.config import SCOPES, Settings
from service.ops.keygen import generate_key, key_entry
from tools import ROOT

CONTAINERFILE = ROOT / "Containerfile"

# The images set ENVIRONMENT=production, which refuses to start without API_KEYS.
TEST_KEY = generate_key()
TEST_TASK_ID_SECRET = "a-task-id-secret-for-the-deploy-tests"  # noqa: S105 (a test value)
TEST_API_KEYS = key_entry("deploy-tests", TEST_KEY, SCOPES)
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, keyword: str) -> str | None:
        found = [args for kw, args in self.instructions if kw == keyword]
        return found[-1] if found else None

    def inherited(self, stages: dict[str, Stage], keyword: str) -> str | None:
        """The instruction's value in this stage or, if absent, in the stage it builds on."""
        value = self.last(keyword)
        if value is None and self.base in stages:
            return stages[self.base].inherited(stages, keyword)
        return value

    def env(self, stages: dict[str, Stage]) -> dict[str, str]:
        values = stages[self.base].env(stages) if self.base in stages else {}
        for keyword, args in self.instructions:
            if keyword == "ENV":
                for item in shlex.split(args):
                    name, _, value = item.partition("=")
                    values[name] = value
        return values


def parse_containerfile(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARGs and the stages by name: enough of the Dockerfile grammar for this file."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            base, _, name = rest.partition(" AS ")
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base.strip())
            current = Stage(name.strip() or f"stage{len(stages)}", base)
            stages[current.name] = current
        elif current is None and keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        elif current is not None:
            current.instructions.append((keyword, rest))
    return args, stages


ARGS, STAGES = parse_containerfile(CONTAINERFILE.read_text())


def exec_form(value: str | None) -> list[str]:
    assert value is not None
    parsed = json.loads(value)  # shell form would not be JSON: SIGTERM would go to a shell
    assert isinstance(parsed, list)
    assert all(isinstance(part, str) for part in parsed)
    return parsed


def healthcheck_command(stage: Stage) -> list[str]:
    value = stage.last("HEALTHCHECK")
    assert value is not None, f"stage {stage.name} has no HEALTHCHECK"
    options, _, command = value.partition("CMD ")
    assert re.search(r"--interval=\d+s", options)
    assert re.search(r"--timeout=\d+s", options)
    return exec_form(command)


def host_env(stage: Stage, settings: Settings | None = None, **extra: str) -> dict[str, str]:
    """The stage's ENV as the image sets it, with the image's virtualenv replaced by ours, and
    what an operator must add: the database, Redis, and (production mode) an API key."""
    env = {**os.environ}
    for name, value in stage.env(STAGES).items():
        venv_bin = str(Path(sys.executable).parent)
        env[name] = value.replace("/opt/venv/bin", venv_bin).replace("$PATH", os.environ["PATH"])
    env["API_KEYS"] = TEST_API_KEYS
    env["TASK_ID_SECRET"] = TEST_TASK_ID_SECRET
    if settings is not None:
        env["DATABASE_URL"] = settings.database_url
        env["REDIS_URL"] = settings.redis_url
        env["REDIS_PREFIX"] = settings.redis_prefix
    env.update(extra)
    return env
