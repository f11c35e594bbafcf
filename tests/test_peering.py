"""High availability: replicas coordinate through kopf peering and only one acts.

Two operator processes share a ClusterKopfPeering object; the one with the higher priority
runs the policies, the other stands by, and takes over when the first one stops.
"""

from __future__ import annotations

import time
import urllib.error

import pytest

from demo.stack import EXAMPLES, get_json, running_stack, start_operator

pytestmark = pytest.mark.integration

PEERING = """\
apiVersion: kopf.dev/v1
kind: ClusterKopfPeering
metadata:
  name: marl-operator
"""


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
        (tmp_path / "peering.yaml").write_text(PEERING)
        stack.apply(tmp_path / "peering.yaml")
        url = stack.prometheus.url
        standby = start_operator(
            stack, url, "standby", ["--peering", "marl-operator", "--priority", "100"]
        )
        active = start_operator(
            stack, url, "active", ["--peering", "marl-operator", "--priority", "200"]
        )
        stack.apply(EXAMPLES / "policy.yaml")
        wait_for(lambda: has_decision(active), 60, "the active replica's first cycle")
        time.sleep(12)  # more than one interval: the standby would have cycled by now
        assert not has_decision(standby)

        stack.stop("active")  # a clean exit leaves the peering object at once
        wait_for(lambda: has_decision(standby), 90, "the standby replica to take over")
