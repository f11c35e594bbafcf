"""The Dockerfiles, checked without Docker (none runs on CI machines).

The operator's image: every COPY source exists and survives .dockerignore; every package the
build installs comes from a hashed lock, or is the package itself; the build stage, replayed
by this machine's shell on exactly the files it copies, yields a virtualenv of the lock and the
package alone (with the bundled checkpoints; no pip, setuptools or torch) that starts the
operator and acts; the runtime stage is non-root, read-only-root friendly, probes /healthz and
runs ``python -m marl_operator``, and agrees with the chart (user id, port). The demo
workload's image gets the same COPY checks.
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
from only_locked import LOCK, read_lock

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
        "requirements/build.txt",
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


def test_the_image_installs_only_locked_packages_and_leaves_torch_out(dockerfile):
    """Every pip in the build installs from a hashed lock or installs the package built here
    with --no-deps; the package's wheel is built by the locked setuptools, without a build
    isolation that would fetch an unpinned one; nothing of PyTorch's wheel index or a torch
    pin is in the Dockerfile (torch is in the package's training extra)."""
    args, stages = dockerfile
    build = stages[0]
    text = (ROOT / "Dockerfile").read_text()
    assert "pytorch.org" not in text
    assert not [a for a in [*args, *build.all("ARG")] if a.startswith("TORCH")]
    commands = [" ".join(c.split()) for run in build.all("RUN") for c in run.split("&&")]
    installs = [c for c in commands if re.search(r"\bpip (--python \S+ )?install\b", c)]
    assert not [c for c in installs if re.search(r"\btorch\b", c)]
    locks = {Path(c).name for c in build.all("COPY")[0].split()[:-1]}
    assert locks == {"build.txt", "operator.txt"}
    for command in installs:
        from_lock = re.search(r"--require-hashes --no-deps -r \S+/(\w+\.txt)$", command)
        own_wheel = re.search(r"install --no-deps /tmp/wheels/\*\.whl$", command)
        assert (from_lock and from_lock[1] in locks) or own_wheel, command
    (wheel,) = [c for c in commands if " wheel " in c]
    assert "--no-build-isolation" in wheel and "--no-deps" in wheel
    assert any(c.endswith("pip --python /opt/venv/bin/python check") for c in commands)
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


def test_the_runtime_stage_removes_the_base_images_installer(dockerfile):
    """The slim Python image ships pip and setuptools in /usr/local, on PATH: the comment
    said no installer shipped while they did, and scanners flag that setuptools. (The stage
    cannot be replayed here: its RUN works on the base image's own system.)"""
    _, stages = dockerfile
    commands = [" ".join(c.split()) for run in stages[-1].all("RUN") for c in run.split("&&")]
    (uninstall,) = [c for c in commands if "pip uninstall" in c]
    assert uninstall.startswith("python -m pip uninstall --yes") and {"pip", "setuptools"} <= set(
        uninstall.split()
    )
    (check,) = [c for c in commands if "find_spec" in c]
    assert commands.index(check) == commands.index(uninstall) + 1
    assert "'pip', 'setuptools'" in check and "assert not left" in check


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


# --- the build stage, replayed without Docker --------------------------------------------

ABSOLUTE_PATH = re.compile(r"(?<![^\s\"'=])/(?=[A-Za-z])(?!dev/)")


@dataclass
class Replay:
    """A stage's instructions run by the shell of this machine, with every absolute path the
    stage names (``/opt``, ``/tmp``, ``/src``) moved under ``root``, and ``python`` on the
    PATH meaning this interpreter (the same minor version as the image's)."""

    context: Path
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"

    def at(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def rebase(self, text: str) -> str:
        return ABSOLUTE_PATH.sub(f"{self.root}/", text)

    def copy(self, rest: str, found: dict[str, list[str]]) -> None:
        sources, destination, _ = copy_sources(rest)
        if not destination.startswith("/"):
            destination = f"{self.workdir.rstrip('/')}/{destination}"
        into = self.at(destination)
        for source in sources:
            for file in found[source]:
                if source.endswith("/"):
                    target = into / Path(file).relative_to(source)
                elif destination.endswith("/") or len(sources) > 1:
                    target = into / Path(file).name
                else:
                    target = into
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(self.context / file, target)

    def run(self, command: str) -> subprocess.CompletedProcess:
        self.at(self.workdir).mkdir(parents=True, exist_ok=True)
        return subprocess.run(
            self.rebase(command),
            shell=True,
            cwd=self.at(self.workdir),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=900,
        )

    def play(self, stage: Stage) -> None:
        found = sources_in_context(self.context, [stage])
        for kind, rest in stage.instructions:
            if kind == "ENV":
                for word in shlex.split(rest):
                    key, _, value = word.partition("=")
                    # The pip cache stays on here: it changes what is downloaded, not what
                    # is installed (every package is checked against the lock's hashes).
                    if key != "PIP_NO_CACHE_DIR":
                        self.env[key] = self.rebase(f"={value}")[1:]
            elif kind == "WORKDIR":
                self.workdir = rest
            elif kind == "COPY":
                self.copy(rest, found)
            elif kind == "RUN":
                done = self.run(rest)
                assert done.returncode == 0, f"RUN {rest}\n{done.stdout}{done.stderr[-4000:]}"


@pytest.fixture(scope="module")
def built(dockerfile, tmp_path_factory) -> Replay:
    """The build stage, replayed: real virtualenvs, packages from PyPI checked against the
    locks' hashes, the package's wheel built from exactly the files the stage copies."""
    _, stages = dockerfile
    root = tmp_path_factory.mktemp("image")
    shim = root / "usr" / "local" / "bin" / "python"
    shim.parent.mkdir(parents=True)
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    shim.chmod(0o755)
    quiet = {"PIP_QUIET": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    inherited = {
        k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_"))
    }
    env = inherited | quiet | {"PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}"}
    replay = Replay(context=ROOT, root=root, env=env)
    replay.play(stages[0])
    return replay


def test_the_replayed_build_holds_the_lock_and_the_package_alone(built):
    """What the runtime stage copies: the lock's distributions for this platform and the
    package, at the locked versions; no installer, build tool or torch."""
    python = built.at("/opt/venv/bin/python")
    listing = subprocess.run(
        [str(python), "-c", LIST_DISTRIBUTIONS], capture_output=True, text=True, check=True
    )
    installed = json.loads(listing.stdout)
    locked = {pin.name: pin.version for pin in read_lock(LOCK.read_text()) if pin.applies()}
    assert installed.pop("marl-operator") == "0.1.0"
    assert installed == locked
    assert not {"pip", "setuptools", "torch"} & set(installed)


LIST_DISTRIBUTIONS = """\
import importlib.metadata, json, re
print(json.dumps({
    re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version
    for d in importlib.metadata.distributions()
}))
"""


def test_the_replayed_build_wheel_holds_the_checkpoints(built):
    (wheel,) = built.at("/tmp/wheels").glob("marl_operator-*.whl")
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


def test_the_replayed_image_starts_and_acts(built, tmp_path):
    """The image's interpreter, run from outside the source tree: the operator's --help, and
    a bundled checkpoint acting in numpy."""
    python = str(built.at("/opt/venv/bin/python"))

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [python, *argv], cwd=tmp_path, env=built.env, capture_output=True, text=True
        )

    helped = run("-m", "marl_operator", "--help")
    assert helped.returncode == 0 and "usage: python -m marl_operator" in helped.stdout
    (tmp_path / "act.py").write_text(ACT)
    acted = run("act.py")
    assert acted.returncode == 0, acted.stderr[-3000:]
    result = json.loads(acted.stdout.strip().splitlines()[-1])
    assert result == {"shape": [2, 6, 5], "rows_sum_to_one": True, "torch": False}


def test_replay_moves_absolute_paths_but_not_devices_or_division(tmp_path):
    replay = Replay(context=ROOT, root=tmp_path)
    command = "/opt/a -r /tmp/b.txt > /dev/null && python -c 'x = BUNDLED / n' PATH=/opt/venv/bin"
    assert replay.rebase(command) == (
        f"{tmp_path}/opt/a -r {tmp_path}/tmp/b.txt > /dev/null && python -c 'x = BUNDLED / n'"
        f" PATH={tmp_path}/opt/venv/bin"
    )


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
