"""When the kind end-to-end suite runs, and why it does not.

It runs only where every tool it drives is usable (a Docker engine, kind, kubectl, helm,
istioctl) and when asked for: ``pytest tests/e2e``, ``pytest -m e2e`` or ``MARL_E2E=1``, since
it creates a cluster and takes about a quarter of an hour. Otherwise every test of it is
skipped with the reason, which is also printed at the end of the run (pytest hides skip
reasons without ``-rs``): it never passes without having run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from e2e.tools import missing

TOOLS = ("docker", "kind", "kubectl", "helm", "istioctl")
HERE = Path(__file__).resolve().parent


def _requested(config: pytest.Config) -> bool:
    if os.environ.get("MARL_E2E") == "1":
        return True
    if "e2e" in (config.option.markexpr or "") and "not e2e" not in config.option.markexpr:
        return True
    for arg in config.args:
        path = Path(arg.split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


@pytest.fixture(scope="session")
def e2e_allowed(request: pytest.FixtureRequest) -> None:
    """Skips, naming what is missing, unless the suite can and should run."""
    config = request.config
    reason = config.stash.get(_REASON, None)
    if reason is None:
        absent = missing(TOOLS)
        if absent:
            reason = "e2e: missing " + "; ".join(absent)
        elif not _requested(config):
            reason = (
                "e2e: not requested (it creates a kind cluster for ~15 min): run "
                "`pytest tests/e2e`, `pytest -m e2e` or set MARL_E2E=1"
            )
        else:
            reason = ""
        config.stash[_REASON] = reason
    if reason:
        pytest.skip(reason)


_REASON = pytest.StashKey[str]()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    reason = config.stash.get(_REASON, None)
    if reason:
        terminalreporter.write_line(f"SKIPPED {reason}", yellow=True)
