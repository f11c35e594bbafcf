"""The operator's lock, and interpreters that find only what the operator image holds: the
standard library, the project's packages and the distributions of its lock, every other
installed package hidden.

A ``sitecustomize`` on ``PYTHONPATH`` installs the hiding before anything else is imported, so
it serves a ``python -c`` as well as the shell commands of the Dockerfile's build checks.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

LOCK = Path(__file__).resolve().parents[1] / "requirements" / "operator.txt"

OWN_PACKAGES = ("marl_operator", "policies", "simulator", "demo")
SETTINGS = "ONLY_LOCKED_DISTRIBUTIONS"

SITECUSTOMIZE = f"""\
import importlib.metadata, json, os, sys

_locked = set(json.loads(os.environ[{SETTINGS!r}]))
_own = set({OWN_PACKAGES!r})
_visible = {{
    module
    for module, dists in importlib.metadata.packages_distributions().items()
    if any(d.lower().replace("_", "-") in _locked for d in dists)
}}


class OnlyLocked:
    \"\"\"Wraps a meta-path finder: a module of no locked distribution is not found, as
    where it is not installed (import raises ModuleNotFoundError, find_spec gives None).\"\"\"

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or top in _own or top in _visible:
            return self.inner.find_spec(name, path, target)
        return None

    def __getattr__(self, name):
        return getattr(self.inner, name)


sys.meta_path[:] = [OnlyLocked(finder) for finder in sys.meta_path]
"""


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    requirement: Requirement
    hashes: tuple[str, ...]

    def applies(self) -> bool:
        """Whether this interpreter installs it (the lock holds pins for other Pythons too)."""
        marker = self.requirement.marker
        return marker is None or marker.evaluate()


def read_lock(text: str) -> list[Pin]:
    pins = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *options = re.split(r"\s+(?=--)", line)
        requirement = Requirement(spec)
        (version,) = [s.version for s in requirement.specifier if s.operator == "=="]
        hashes = tuple(o.partition("=")[2] for o in options if o.startswith("--hash="))
        pins.append(Pin(canonicalize_name(requirement.name), version, requirement, hashes))
    return pins


def locked_names() -> set[str]:
    """The distributions of the operator's lock."""
    return {pin.name for pin in read_lock(LOCK.read_text())}


def environment(directory: Path, locked: set[str]) -> dict[str, str]:
    """The environment of such an interpreter (its sitecustomize written to ``directory``)."""
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(directory), **{SETTINGS: json.dumps(sorted(locked))})
    return env
