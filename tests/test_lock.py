"""The operator's hashed lock, requirements/operator.txt: what the image installs (and nothing
else), and what the tests run on; the locks of the tools the image is built with,
requirements/build.txt, and of the demo workload image, workload/requirements.txt.

The operator imports nothing the lock leaves out (checked with every other installed package
hidden), the lock pins every dependency pyproject.toml gives the operator at a version it
allows, with hashes, and is closed under its packages' own requirements (the image installs it
with --no-deps); ``make install`` installs exactly the locked versions, so the tests check the
operator as it ships.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from only_locked import LOCK, Pin, environment, read_lock
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pins() -> list[Pin]:
    return read_lock(LOCK.read_text())


def operator_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def requirements_in(path: Path) -> Callable[[], list[Requirement]]:
    def read() -> list[Requirement]:
        lines = path.read_text().splitlines()
        return [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]

    return read


# Each image's lock and the requirements it was resolved from.
LOCKS = {
    "operator": (LOCK, operator_requirements),
    "build": (ROOT / "requirements" / "build.txt", requirements_in(LOCK.with_name("build.in"))),
    "workload": (
        ROOT / "workload" / "requirements.txt",
        requirements_in(ROOT / "workload" / "requirements.in"),
    ),
}


def test_the_build_tools_lock_builds_the_package():
    """The image builds the wheel without build isolation, with the locked setuptools: it
    must be one pyproject.toml's build-system accepts."""
    build_system = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    pins = {p.name: p for p in read_lock(LOCKS["build"][0].read_text())}
    for text in build_system["requires"]:
        requirement = Requirement(text)
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin and requirement.specifier.contains(pin.version), (
            f"requirements/build.txt must pin {requirement}: run `make lock`"
        )
    assert {"pip", "setuptools"} <= set(pins)


def test_the_lock_reader_reads_markers_and_hashes():
    text = (
        "# header\nnumpy==2.4.6 ; python_full_version < '3.12' \\\n"
        "    --hash=sha256:aa \\\n    --hash=sha256:bb\n    # via scipy\n"
        "Scikit_Learn==1.9.1 \\\n    --hash=sha256:cc\n"
    )
    numpy, sklearn = read_lock(text)
    assert (numpy.name, numpy.version, numpy.hashes) == (
        "numpy",
        "2.4.6",
        ("sha256:aa", "sha256:bb"),
    )
    assert numpy.applies() == (sys.version_info < (3, 12))
    assert (sklearn.name, sklearn.version, sklearn.hashes) == (
        "scikit-learn",
        "1.9.1",
        ("sha256:cc",),
    )


@pytest.mark.parametrize("image", LOCKS)
def test_every_dependency_is_pinned_at_an_allowed_version_with_hashes(image):
    lock, requirements = LOCKS[image]
    pins = read_lock(lock.read_text())
    by_name = {p.name: p for p in pins if p.applies()}
    where = lock.relative_to(ROOT)
    for requirement in requirements():
        pin = by_name.get(canonicalize_name(requirement.name))
        assert pin, f"{requirement.name} is not in {where}: run `make lock`"
        assert requirement.specifier.contains(pin.version, prereleases=True), (
            f"{where} pins {pin.name}=={pin.version} outside {requirement}: run `make lock`"
        )
    assert all(p.hashes for p in pins), "every pin has its hashes (pip --require-hashes)"
    assert len({(p.name, str(p.requirement.marker)) for p in pins}) == len(pins)


def test_the_lock_leaves_training_out(pins):
    names = {p.name for p in pins}
    assert not names & {"torch", "tensorboard", "matplotlib", "gymnasium", "pettingzoo", "kmock"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(r.startswith("torch==") for r in project["optional-dependencies"]["train"])


def test_the_lock_is_closed_under_its_packages_requirements(pins):
    """Every requirement of a locked package (no extras, markers of this interpreter) is
    locked too and allows the locked version: the image installs the lock with --no-deps."""
    locked = {p.name: p.version for p in pins if p.applies()}
    environment = default_environment() | {"extra": ""}
    for name in locked:
        for text in importlib.metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate(environment):
                continue
            needed = canonicalize_name(requirement.name)
            assert needed in locked, f"{name} needs {requirement}, which is not locked"
            assert requirement.specifier.contains(locked[needed], prereleases=True), (
                f"{name} needs {requirement}, locked at {locked[needed]}"
            )


def test_the_tests_run_on_the_locked_versions(pins):
    """What ``make install`` guarantees: the installed operator dependencies are the image's."""
    for pin in pins:
        if pin.applies():
            installed = importlib.metadata.version(pin.name)
            assert installed == pin.version, (
                f"{pin.name} {installed} is installed, the lock says {pin.version}: "
                "run `make install`"
            )


START_THE_OPERATOR = """\
import importlib
import pkgutil

import marl_operator
from marl_operator.__main__ import build_parser
from policies import checkpoint

for module in pkgutil.walk_packages(marl_operator.__path__, "marl_operator."):
    importlib.import_module(module.name)
build_parser().parse_args([])
for name in ("mesh-10x3", "dfaas-paise25"):
    checkpoint.load(checkpoint.BUNDLED / name)
print("started with the locked packages alone")
"""


def run_only_locked(
    tmp_path: Path, locked: set[str], code: str = START_THE_OPERATOR
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=environment(tmp_path, locked),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_operator_imports_nothing_the_lock_leaves_out(pins, tmp_path):
    done = run_only_locked(tmp_path, {p.name for p in pins})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "started with the locked packages alone" in done.stdout
    # ...and the check can fail: without kopf's distribution the operator cannot start.
    done = run_only_locked(tmp_path, {p.name for p in pins} - {"kopf"})
    assert done.returncode != 0 and "No module named 'kopf'" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("module", "extra"),
    [("simulator.evaluate", "train"), ("simulator.train", "train"), ("demo", "demo")],
)
def test_a_tool_without_its_extra_names_the_extra_to_install(pins, module, extra, tmp_path):
    """With the operator's packages alone (a plain install), the offline tools and the demo
    stop at once and say which extra to install."""
    run = f"runpy.run_module({module!r}, run_name='__main__')"
    code = f"import runpy, sys; sys.argv = ['x', '--help']; {run}"
    done = run_only_locked(tmp_path, {p.name for p in pins}, code)
    assert done.returncode != 0
    assert f"pip install 'marl-operator[{extra}]'" in done.stderr.splitlines()[-1], done.stderr


def test_the_extras_modules_are_those_of_the_extras_distributions():
    from policies.extras import EXTRAS

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]

    def distributions(extra: str) -> set[str]:
        """The extra's distributions, with those of the extras it names of this package."""
        out = set()
        for requirement in map(Requirement, extras[extra]):
            name = canonicalize_name(requirement.name)
            if name == "marl-operator":
                out |= set().union(*(distributions(e) for e in requirement.extras))
            else:
                out.add(name)
        return out

    modules = {
        module: {canonicalize_name(d) for d in dists}
        for module, dists in importlib.metadata.packages_distributions().items()
        if not module.startswith("_")
    }
    for extra, needed in EXTRAS.items():
        names = distributions(extra)
        provided = {module for module, dists in modules.items() if dists & names}
        assert set(needed) <= provided, (extra, set(needed) - provided)
        for name in names:  # every distribution of the extra is checked by one of its modules
            assert {m for m, d in modules.items() if name in d} & set(needed), (extra, name)
