"""The Dockerfiles, checked without Docker (none runs on CI machines).

The operator's image: every COPY source exists and survives .dockerignore; the build stage's
steps work on exactly the files it copies (its dependency list comes from pyproject.toml, and
``pip install .`` of those files yields a package with the bundled checkpoints); the runtime
stage is non-root, read-only-root friendly, probes /healthz and runs ``python -m
marl_operator``, and agrees with the chart (user id, port). The demo workload's image gets the
same COPY checks.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from only_locked import environment, locked_names

ROOT = Path(__file__).resolve().parents[1]
CHART_VALUES = ROOT / "charts" / "marl-operator" / "values.yaml"


# --- a small Dockerfile and .dockerignore reader -----------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, rest)

    def all(self, instruction: str) -> list[str]:
        return [rest for kind, rest in self.instructions if kind == instruction]


def logical_lines(text: str) -> list[str]:
    """Instructions with continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    return lines


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(ARG defaults declared before the first FROM, stages)."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(path.read_text()):
        kind, _, rest = line.partition(" ")
        kind, rest = kind.upper(), rest.strip()
        if kind == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            if kind == "ARG":
                key, _, value = rest.partition("=")
                args[key] = value
        else:
            stages[-1].instructions.append((kind, rest))
    return args, stages


def copy_sources(rest: str) -> tuple[list[str], str, dict[str, str]]:
    """(sources, destination, flags) of a COPY, in shell or JSON form."""
    words = shlex.split(rest) if not rest.startswith("[") else json.loads(rest)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    return words[:-1], words[-1], flags


class DockerIgnore:
    """The rules of a .dockerignore, as Docker's BuildKit applies them: ``**`` spans
    directories, ``*`` and ``?`` stay within one, ``!`` re-includes, the last matching line
    decides, and a pattern that matches a directory covers everything below it."""

    def __init__(self, path: Path):
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        lines = path.read_text().splitlines() if path.exists() else []
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = line.lstrip("!").strip().strip("/")
            self.rules.append((include, re.compile(self._regex(pattern))))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
                end = pattern.index("]", i + 1)
                body = pattern[i + 1 : end]
                body = "^" + body[1:] if body.startswith("!") else body
                out, i = out + f"[{body}]", end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return f"^{out}$"

    def ignored(self, relative: str) -> bool:
        parts = relative.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        verdict = False
        for include, regex in self.rules:
            if any(regex.match(p) for p in prefixes):
                verdict = not include
        return verdict

    def context(self, root: Path) -> list[str]:
        """Every file Docker would send as the build context."""
        files = []
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root).as_posix()
            if path.is_file() and not self.ignored(relative):
                files.append(relative)
        return files


def sources_in_context(root: Path, stages: list[Stage]) -> dict[str, list[str]]:
    """COPY source -> the context files it copies; fails for a missing source."""
    ignore = DockerIgnore(root / ".dockerignore")
    found = {}
    for stage in stages:
        for rest in stage.all("COPY"):
            sources, _, flags = copy_sources(rest)
            if "from" in flags:
                continue  # from another stage, not from the context
            for source in sources:
                path = root / source
                assert path.exists(), f"COPY {source}: no such path in {root}"
                if path.is_dir():
                    files = [p.relative_to(root).as_posix() for p in path.rglob("*") if p.is_file()]
                else:
                    files = [source.rstrip("/")]
                kept = [f for f in files if not ignore.ignored(f)]
                assert kept, f"COPY {source}: every file of it is excluded by .dockerignore"
                found[source] = kept
    return found


# --- the operator's image ----------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile(ROOT / "Dockerfile")


def test_copied_paths_exist_and_are_in_the_context(dockerfile):
    _, stages = dockerfile
    copied = sources_in_context(ROOT, stages)
    assert set(copied) >= {
        "requirements/operator.txt",
        "pyproject.toml",
        "README.md",
        "policies/",
        "operator/",
    }
    checkpoints = [f for f in copied["policies/"] if f.startswith("policies/checkpoints/")]
    for name in ("mesh-10x3", "dfaas-paise25"):
        for file in ("policy.pt", "policy.json"):
            assert f"policies/checkpoints/{name}/{file}" in checkpoints


def test_context_is_small_and_private():
    context = DockerIgnore(ROOT / ".dockerignore").context(ROOT)
    assert context
    for prefix in (".git/", "runs/", "tests/", ".pytest_cache/", "charts/"):
        assert not [f for f in context if f.startswith(prefix)], prefix
    assert not [f for f in context if "__pycache__" in f or f.endswith(".pyc")]
    size = sum((ROOT / f).stat().st_size for f in context)
    assert size < 20 * 2**20, f"build context of {size / 2**20:.1f} MiB"


def test_dockerignore_reader_follows_docker_rules(tmp_path):
    (tmp_path / ".dockerignore").write_text("**\n!keep/\nkeep/**/*.py[co]\n# note\n!keep/x.pyc\n")
    ignore = DockerIgnore(tmp_path / ".dockerignore")
    assert ignore.ignored("runs/a/b.txt")
    assert not ignore.ignored("keep/a/b.py")
    assert ignore.ignored("keep/a/b.pyc")
    assert not ignore.ignored("keep/x.pyc")
    assert ignore.ignored("keep/y.pyo") and not ignore.ignored("keep/y.pyd")


def test_stages_base(dockerfile):
    _, stages = dockerfile
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    for stage in stages:
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", stage.base), stage.base


def test_the_image_installs_the_lock_and_leaves_torch_out(dockerfile):
    """torch is in the package's training extra, not among the operator's dependencies: the
    build installs the hashed lock of those (tests/test_lock.py checks it), then the package
    with --no-deps, and nothing of PyTorch's wheel index or a torch pin is in the Dockerfile."""
    args, stages = dockerfile
    build = stages[0]
    text = (ROOT / "Dockerfile").read_text()
    assert "pytorch.org" not in text
    assert not [a for a in [*args, *build.all("ARG")] if a.startswith("TORCH")]
    runs = build.all("RUN")
    assert not [r for r in runs if re.search(r"pip install [^&]*\btorch\b", r)]
    (lock,) = [
        c.split()[-1] for c in build.all("COPY") if c.startswith("requirements/operator.txt ")
    ]
    (from_lock,) = [r for r in runs if f"-r {lock}" in r]
    assert "--require-hashes" in from_lock and "--no-deps" in from_lock
    assert runs.index(from_lock) < runs.index(
        next(r for r in runs if "pip install --no-deps ." in r)
    )
    (install,) = [r for r in runs if "pip install --no-deps ." in r]
    assert "pip check" in install, "the build checks that the lock holds every dependency"
    assert "find_spec('torch') is None" in install, "the build checks that torch stayed out"
    # The comments tell why torch is left out, and no longer explain how it is installed.
    comments = " ".join(
        line.lstrip("# ").strip() for line in text.splitlines() if line.lstrip().startswith("#")
    )
    assert "CPU" not in comments and "CUDA" not in comments
    assert "policies/tensor_archive.py" in comments and "make lock" in comments
    # ...and so does the README where it tells how to build the image.
    readme = (ROOT / "README.md").read_text()
    (build_line,) = [line for line in readme.splitlines() if "build -t marl-operator:" in line]
    assert "no torch" in build_line and "CPU torch" not in readme


def test_runtime_stage_is_non_root_and_read_only_friendly(dockerfile):
    _, stages = dockerfile
    runtime = stages[-1]
    (user,) = runtime.all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, "a numeric non-root USER (runAsNonRoot checks it)"
    values = yaml.safe_load(CHART_VALUES.read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["runAsGroup"] == int(gid)
    env = " ".join(runtime.all("ENV"))
    for name in ("HOME", "TMPDIR"):
        match = re.search(rf"\b{name}=(\S+)", env)
        assert match and match[1].startswith("/tmp"), f"{name} must point into /tmp"
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    (copy_from,) = [c for c in runtime.all("COPY") if c.startswith("--from=")]
    assert copy_from.startswith(f"--from={stages[0].name} ")


def test_healthcheck_port_and_entrypoint(dockerfile):
    _, stages = dockerfile
    runtime = stages[-1]
    (healthcheck,) = runtime.all("HEALTHCHECK")
    values = yaml.safe_load(CHART_VALUES.read_text())
    port = values["api"]["port"]
    assert f"127.0.0.1:{port}/healthz" in healthcheck
    assert runtime.all("EXPOSE") == [str(port)]
    (entrypoint,) = runtime.all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["python", "-m", "marl_operator"]


def test_build_stage_installs_the_package_with_its_checkpoints(dockerfile, tmp_path):
    """Replays the build of the package on a copy of exactly what the build stage COPYs: the
    wheel (setuptools, no network) must hold the operator and the bundled checkpoints."""
    _, stages = dockerfile
    context = tmp_path / "context"
    for files in sources_in_context(ROOT, stages).values():
        for file in files:
            (context / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / file, context / file)
    wheels = tmp_path / "wheels"
    pip_wheel = ["pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)]
    done = subprocess.run(
        [sys.executable, "-m", *pip_wheel, str(context)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = wheels.glob("marl_operator-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "marl_operator/__main__.py",
        "marl_operator/mesh/istio.py",
        "policies/checkpoint.py",
        "policies/checkpoints/mesh-10x3/policy.pt",
        "policies/checkpoints/mesh-10x3/policy.json",
        "policies/checkpoints/dfaas-paise25/policy.pt",
        "simulator/scenarios/mesh-10x3.yaml",
    ):
        assert needed in names, needed


ACT = """\
import json, sys

import numpy as np
from policies import checkpoint

policy = checkpoint.load(checkpoint.BUNDLED / "mesh-10x3")
net = policy.meta["network"]
obs = np.random.default_rng(0).random((2, 6, net["obs_dim"]), dtype=np.float32)
action = policy(obs, np.ones(net["action_dim"], dtype=bool))
print(json.dumps({
    "shape": list(action.shape),
    "rows_sum_to_one": bool(np.allclose(action.sum(-1), 1.0)),
    "torch": "torch" in sys.modules,
}))
"""


def test_the_build_stage_checks_pass_where_torch_cannot_be_imported(dockerfile, tmp_path):
    """The checks the build stage runs after installing the package (no torch, the operator's
    --help, the bundled checkpoints load), run as written by interpreters that cannot import
    torch, nor anything else the image's lock leaves out (a sitecustomize hides them); then
    the loaded checkpoint acts."""
    _, stages = dockerfile
    (install,) = [r for r in stages[0].all("RUN") if "pip install --no-deps ." in r]
    # pip check is left out: here it would judge this environment, not the image's.
    checks = [c.strip() for c in install.split("&&")[1:] if c.strip() != "pip check"]
    assert any("marl_operator --help" in c for c in checks)
    assert any("checkpoint.load" in c for c in checks)
    shim = tmp_path / "bin" / "python"  # the checks call `python`: this interpreter
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    shim.chmod(0o755)
    env = environment(tmp_path, locked_names())
    env.update(PATH=f"{shim.parent}{os.pathsep}{env['PATH']}")

    def run(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )

    hidden = run("python -c 'import torch'")
    assert hidden.returncode != 0 and "No module named 'torch'" in hidden.stderr, hidden.stderr
    for check in checks:
        done = run(check)
        assert done.returncode == 0, f"{check}\n{done.stdout}{done.stderr[-3000:]}"
    helped = run("python -m marl_operator --help")
    assert helped.returncode == 0 and "usage: python -m marl_operator" in helped.stdout
    (tmp_path / "act.py").write_text(ACT)
    acted = run("python act.py")
    assert acted.returncode == 0, acted.stderr[-3000:]
    result = json.loads(acted.stdout.strip().splitlines()[-1])
    assert result == {"shape": [2, 6, 5], "rows_sum_to_one": True, "torch": False}


# --- the demo workload's image -----------------------------------------------------------


def test_workload_image_copies_what_exists():
    root = ROOT / "workload"
    _, stages = parse_dockerfile(root / "Dockerfile")
    copied = sources_in_context(root, stages)
    assert {"edgefn.py", "loadgen.py", "requirements.txt"} <= {
        f for files in copied.values() for f in files
    }
    # The lock alone, hash-checked (tests/test_lock.py checks it against requirements.in).
    (install,) = [r for r in stages[-1].all("RUN") if "pip install" in r]
    assert "--require-hashes -r /app/requirements.txt" in install
    (user,) = stages[-1].all("USER")
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) > 0
    manifests = [
        doc
        for path in sorted((root / "k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["kind"] == "Deployment"
    ]
    images = {c["image"] for d in manifests for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {"marl-edge-fn:0.1.0"}, "the image the Dockerfile's comment tells to build"
    assert "docker build -t marl-edge-fn:0.1.0 workload/" in (root / "Dockerfile").read_text()
