"""High availability: replicas coordinate through kopf peering and only one acts.

Two operator processes share a ClusterKopfPeering object; the one with the higher priority
runs the policies, the other stands by, and takes over when the first one stops.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest

from demo.stack import EXAMPLES, get_json, running_stack, start_operator

pytestmark = pytest.mark.integration

PEERING = """\
apiVersion: kopf.dev/v1
kind: ClusterKopfPeering
metadata:
  name: marl-operator
"""


def with_peering(stack, tmp_path) -> None:
    """The shared ClusterKopfPeering object, which kopf requires before a peered start."""
    (tmp_path / "peering.yaml").write_text(PEERING)
    stack.apply(tmp_path / "peering.yaml")


def start_peer(stack, name: str, priority: int) -> str:
    """A replica on the shared peering object; returns its API's URL."""
    args = ["--peering", "marl-operator", "--priority", str(priority)]
    return start_operator(stack, stack.prometheus.url, name, args)


def has_decision(url: str) -> bool:
    try:
        get_json(f"{url}/api/v1/policies/edge/edge-routing")
        return True
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return False
        raise


def wait_for(probe, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(1.0)


def test_only_the_highest_priority_replica_acts_and_the_other_takes_over(tmp_path):
    with running_stack(directory=tmp_path / "stack", operator=False) as stack:
        with_peering(stack, tmp_path)
        standby = start_peer(stack, "standby", 100)
        active = start_peer(stack, "active", 200)
        stack.apply(EXAMPLES / "policy.yaml")
        wait_for(lambda: has_decision(active), 60, "the active replica's first cycle")
        time.sleep(12)  # more than one interval: the standby would have cycled by now
        assert not has_decision(standby)
        # Both are Ready; which one a request reached, the replica endpoint says.
        assert get_json(f"{active}/api/v1/replica")["acting"] is True
        role = get_json(f"{standby}/api/v1/replica")
        assert role["acting"] is False and role["priority"] == 100
        assert len(role["outranked_by"]) == 1 and role["peering"] == "marl-operator"

        stack.stop("active")  # a clean exit leaves the peering object at once
        wait_for(lambda: has_decision(standby), 90, "the standby replica to take over")
        wait_for(
            lambda: get_json(f"{standby}/api/v1/replica")["acting"], 30, "the standby to say so"
        )


def test_a_replica_paused_for_a_higher_priority_peer_stops_serving_its_reports(tmp_path):
    """A replica that kopf pauses for a newcomer of higher priority must not go on serving
    the policy's last decision and metrics: they would stand frozen beside the new leader's
    (a dashboard showing two sets of weights, one of them stale)."""
    with running_stack(directory=tmp_path / "stack", operator=False) as stack:
        with_peering(stack, tmp_path)
        first = start_peer(stack, "first", 100)
        stack.apply(EXAMPLES / "policy.yaml")
        wait_for(lambda: has_decision(first), 60, "the first replica's first cycle")
        assert 'policy="edge/edge-routing"' in metrics(first)

        second = start_peer(stack, "second", 200)
        wait_for(lambda: has_decision(second), 90, "the higher-priority replica to take over")
        wait_for(lambda: not has_decision(first), 30, "the paused replica to stand down")
        assert 'policy="edge/edge-routing"' not in metrics(first)
        time.sleep(12)  # more than one interval: a paused replica that still cycled would show
        assert not has_decision(first) and has_decision(second)


def metrics(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        return response.read().decode()


def readiness(url: str) -> int | None:
    """The readiness probe's status, None when nothing answers."""
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def test_a_replica_told_to_stop_is_not_ready_while_it_shuts_down(tmp_path):
    """Readiness followed kopf's ready flag alone, which nothing clears: a replica answered
    ready until its API server stopped, after kopf had left the peering and stopped its
    policies."""
    with running_stack(directory=tmp_path / "stack", operator=False) as stack:
        with_peering(stack, tmp_path)
        url = start_peer(stack, "leaving", 100)
        assert readiness(url) == 200
        process = stack.processes["leaving"]
        process.terminate()
        seen = []
        while process.poll() is None and len(seen) < 10_000:
            seen.append(readiness(url))
        assert process.wait(timeout=30) == 0
        log = (tmp_path / "stack" / "leaving.log").read_text()
        assert '"signal": "SIGTERM"' in log and '"message": "stopping"' in log
        answered = [status for status in seen if status is not None]
        assert 200 not in answered[1:], seen[:20]  # the first may precede the signal
        assert 503 in answered, seen[:20]
