"""Build the API and worker images from the Containerfile on this machine (``make images``).

``python -m tools.images build`` builds both targets with Buildah and prints how long each took
and how large it is; ``python -m tools.images base`` only makes sure the base image exists.

- **Engine:** Buildah builds (``--isolation chroot``: no nested user namespace or cgroup setup,
  which sandboxes and CI runners often refuse), podman runs and inspects; they share one image
  store. Both, and runc, are installed from Debian when missing. Podman is always told
  ``--runtime runc``: its default, crun, fails in some sandboxes (this one among them).
- **Base:** the Containerfile's ``PYTHON_IMAGE`` (or the one given in the environment) when it
  is present or can be pulled. When no registry answers, an equivalent base is made from Debian
  packages with mmdebstrap (the same Debian release, its ``python3``, ``python3-venv``,
  ``ca-certificates``) and imported as ``localhost/quart-service-python:<python>-<release>``;
  once made it is reused, never rebuilt.
- **pip:** the host's package index and CA bundle reach the build as build secrets (``pip_conf``
  and ``pip_ca``), mounted for the one ``pip install`` step and never written into a layer.
- **Format:** ``--format docker``: the OCI image format has no HEALTHCHECK, and Buildah drops it
  from an OCI image without a word. The build fails here if it went missing anyway.
- **Labels:** ``org.opencontainers.image.{source,revision,version,created}`` from git and
  pyproject.toml (``IMAGE_SOURCE`` overrides the source when the clone has no ``origin``);
  ``org.opencontainers.image.base.name`` (the base used) and ``python.version``, the X.Y of
  ``PYTHON_IMAGE``'s Python, which the build checks against the base's interpreter.

Environment: ``PYTHON_IMAGE``, ``IMAGE_TAG`` (default: the version; ``latest`` too),
``IMAGE_SOURCE``, ``DEBIAN_MIRROR`` (default ``http://deb.debian.org``), ``PIP_INDEX_URL`` and
``PIP_CERT`` as pip reads them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "Containerfile"
TARGETS = ("api", "worker")
PODMAN = ["podman", "--runtime", "runc"]
DEBIAN_PACKAGES = {"podman": "podman", "buildah": "buildah", "runc": "runc"}
# What a python:X.Y-slim-<release> image gives: an interpreter with venv, and CA certificates
# for TLS from inside the container.
BASE_PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates"
# Documentation and translations nobody reads in a container; licences (copyright) stay.
BASE_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)


class ImageError(SystemExit):
    """A step failed; the message says which and what to do."""


def _say(message: str) -> None:
    print(f"[images] {message}", file=sys.stderr, flush=True)


def version() -> str:
    """The project's version (pyproject.toml): the images' tag and version label."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return str(project["version"])


def image_name(target: str, tag: str | None = None) -> str:
    """The local name the target's image is built under (also tagged ``latest``)."""
    return f"localhost/quart-service-{target}:{tag or os.environ.get('IMAGE_TAG') or version()}"


def default_python_image() -> str:
    """``PYTHON_IMAGE`` from the environment, else the Containerfile's default."""
    if os.environ.get("PYTHON_IMAGE"):
        return os.environ["PYTHON_IMAGE"]
    match = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", CONTAINERFILE.read_text(), re.MULTILINE)
    if match is None:
        raise ImageError("the Containerfile declares no ARG PYTHON_IMAGE=...")
    return match.group(1)


def _sbin_path() -> str:
    # runc and apt live in /usr/sbin, outside a non-root PATH.
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def ensure_installed(*commands: str) -> None:
    """Install the Debian packages that provide ``commands`` if any is missing."""
    missing = [c for c in commands if shutil.which(c, path=_sbin_path()) is None]
    if not missing:
        return
    packages = [DEBIAN_PACKAGES.get(c, c) for c in missing]
    apt = shutil.which("apt-get", path=_sbin_path())
    if apt is None:
        raise ImageError(f"{', '.join(missing)} missing and no apt-get: install {packages}")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    _say(f"installing {' '.join(packages)} from Debian")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, apt, "update", "-q"], check=True, env=env)
    subprocess.run([*sudo, apt, "install", "-y", "-q", *packages], check=True, env=env)


def run_limits() -> list[str]:
    """``--ulimit`` flags for ``podman run`` that runc can apply in a sandbox.

    Rootful podman asks for nofile and nproc limits of 1048576; where the engine itself runs
    with lower hard limits (a container or VM sandbox, as here) runc cannot raise them and the
    container does not start. So: this process's hard nofile limit, and its nproc limit capped
    at the kernel's pid_max (conmon runs with that cap here; more processes than PIDs are
    impossible anyway)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    nproc = pid_max if nproc == resource.RLIM_INFINITY else min(nproc, pid_max)
    if nofile == resource.RLIM_INFINITY:
        nofile = 1048576
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def image_exists(name: str) -> bool:
    """Whether the local image store holds ``name``."""
    return subprocess.run([*PODMAN, "image", "exists", name], check=False).returncode == 0


def inspect(name: str) -> dict[str, Any]:
    """``podman image inspect`` of one image."""
    out = subprocess.run(
        [*PODMAN, "image", "inspect", name], check=True, capture_output=True, text=True
    ).stdout
    found: list[dict[str, Any]] = json.loads(out)
    return found[0]


def _release_and_python(python_image: str) -> tuple[str, str]:
    # python:3.11.13-slim-bookworm -> ("bookworm", "3.11")
    match = re.search(r":(\d+\.\d+)[.\d]*-(?:slim-)?([a-z]+)", python_image)
    if match is None:
        raise ImageError(f"cannot tell the Python and Debian release of {python_image}")
    return match.group(2), match.group(1)


def local_base_name(python_image: str) -> str:
    """The name of the base made from Debian packages that stands in for ``python_image``."""
    release, python = _release_and_python(python_image)
    return f"localhost/quart-service-python:{python}-{release}"


def make_base(python_image: str) -> str:
    """Build, with mmdebstrap, a base equivalent to ``python_image`` and import it."""
    release, python = _release_and_python(python_image)
    name = local_base_name(python_image)
    ensure_installed("mmdebstrap")
    mirror = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org").rstrip("/")
    sources = [
        f"deb {mirror}/debian {release} main",
        f"deb {mirror}/debian {release}-updates main",
        f"deb {mirror}/debian-security {release}-security main",
    ]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="images-base-") as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        command = [
            "mmdebstrap",
            "--quiet",
            "--variant=minbase",
            f"--include={BASE_PACKAGES}",
            *(f"--dpkgopt={option}" for option in BASE_EXCLUDES),
            # The release's Python must be the one requirements.lock was resolved for.
            f'--customize-hook=test -x "$1/usr/bin/python{python}"',
            '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
            release,
            str(tarball),
            *sources,
        ]
        _say(f"no {python_image}: making {name} from Debian {release} packages")
        result = subprocess.run(command, check=False)
        if result.returncode != 0:
            raise ImageError(
                f"mmdebstrap failed: Debian {release} has no python{python}, or "
                f"{mirror} does not answer (set DEBIAN_MIRROR)"
            )
        changes = ["ENV LANG=C.UTF-8", 'CMD ["python3"]']
        subprocess.run(
            [*PODMAN, "import", *(f"--change={c}" for c in changes), str(tarball), name],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    _say(f"made {name} in {time.monotonic() - started:.0f} s")
    return name


def base_image(python_image: str) -> str:
    """``python_image`` if present or pullable, else the local stand-in (made once)."""
    if image_exists(python_image):
        return python_image
    pulled = subprocess.run(
        [*PODMAN, "pull", "--quiet", python_image],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if pulled.returncode == 0:
        return python_image
    _say(f"cannot pull {python_image}: {pulled.stderr.strip().splitlines()[-1:]}")
    local = local_base_name(python_image)
    if image_exists(local):
        _say(f"using {local}, made earlier")
        return local
    return make_base(python_image)


def _pip_config() -> dict[str, str]:
    """pip's effective settings, the environment winning over its files (``pip config list``)."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        check=False,
        capture_output=True,
        text=True,
    ).stdout
    files: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        value = value.strip().strip("'\"")
        scope, _, option = key.partition(".")
        if scope in (":env:", "global", "install"):
            (env if scope == ":env:" else files)[option] = value
    return {**files, **env}


def pip_secrets(directory: Path) -> list[str]:
    """``--secret`` arguments with the host's index (a pip.conf) and CA bundle, if it has any.

    Only http(s) indexes are passed: a ``file://`` index or a find-links folder is on the host's
    disk, which the build cannot see."""
    config = _pip_config()
    ca = next(
        (
            path
            for path in (
                os.environ.get("PIP_CERT"),
                config.get("cert"),
                os.environ.get("REQUESTS_CA_BUNDLE"),
                os.environ.get("SSL_CERT_FILE"),
            )
            if path and Path(path).is_file()
        ),
        None,
    )
    lines = ["[global]"]
    index = config.get("index-url", "")
    if index.startswith(("http://", "https://")):
        lines.append(f"index-url = {index}")
    extra = [u for u in config.get("extra-index-url", "").split() if u.startswith("http")]
    if extra:
        lines.append(f"extra-index-url = {' '.join(extra)}")
    if config.get("default-timeout"):
        lines.append(f"timeout = {config['default-timeout']}")
    secrets = []
    if ca is not None:
        lines.append("cert = /run/secrets/pip_ca")
        secrets += ["--secret", f"id=pip_ca,src={ca}"]
    pip_conf = directory / "pip.conf"
    pip_conf.write_text("\n".join(lines) + "\n")
    pip_conf.chmod(0o600)
    secrets += ["--secret", f"id=pip_conf,src={pip_conf}"]
    return secrets


def _git(*args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(ROOT), *args], check=False, capture_output=True, text=True
    )
    return result.stdout.strip() if result.returncode == 0 else ""


def labels() -> dict[str, str]:
    """The OCI labels' values: source, revision, version, created."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    source = os.environ.get("IMAGE_SOURCE") or _git("remote", "get-url", "origin")
    return {
        "IMAGE_SOURCE": source or f"file://{ROOT}",
        "IMAGE_REVISION": _git("rev-parse", "HEAD") or "unknown",
        "IMAGE_VERSION": str(project["version"]),
        "IMAGE_CREATED": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def build(targets: tuple[str, ...] = TARGETS) -> dict[str, dict[str, float]]:
    """Build the targets; returns each one's build seconds and size in MB."""
    ensure_installed("podman", "buildah", "runc")
    base = base_image(default_python_image())
    _, python = _release_and_python(default_python_image())
    values = labels()
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="images-secrets-") as tmp:
        secrets = pip_secrets(Path(tmp))
        for target in targets:
            name = image_name(target)
            command = [
                "buildah",
                "bud",
                "--isolation",
                "chroot",
                "--format",
                "docker",
                "--layers",
                "--target",
                target,
                "--tag",
                name,
                "--tag",
                image_name(target, "latest"),
                "--file",
                str(CONTAINERFILE),
                "--build-arg",
                f"PYTHON_IMAGE={base}",
                "--build-arg",
                f"PYTHON_VERSION={python}",
                *(arg for item in values.items() for arg in ("--build-arg", "=".join(item))),
                *secrets,
                str(ROOT),
            ]
            started = time.monotonic()
            _say(f"building {name} (target {target}) on {base}")
            if subprocess.run(command, check=False).returncode != 0:
                raise ImageError(f"building {name} failed (its output is above)")
            seconds = time.monotonic() - started
            found = inspect(name)
            if not found.get("Healthcheck"):
                raise ImageError(f"{name} lost its HEALTHCHECK (built without --format docker?)")
            missing = {f"org.opencontainers.image.{key[6:].lower()}" for key in values}
            missing -= set(found.get("Labels") or {})
            if missing:
                raise ImageError(f"{name} lacks the labels {sorted(missing)}")
            if (found.get("Labels") or {}).get("python.version") != python:
                raise ImageError(f"{name} does not say it carries Python {python}")
            size = float(str(found["Size"])) / 1e6
            figures[target] = {"seconds": round(seconds, 1), "mb": round(size, 1)}
            _say(f"built {name} in {seconds:.1f} s, {size:.0f} MB")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.images", description=__doc__)
    parser.add_argument("command", choices=["build", "base"])
    args = parser.parse_args(argv)
    if args.command == "base":
        ensure_installed("podman", "runc")
        print(base_image(default_python_image()))
        return 0
    print(json.dumps(build()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
