"""``python -m marl_operator.drain`` against a cluster faked at the ``Kube`` seam: what it
deletes, when it tries again and when it gives up (the run against kopf and the emulated API
server is in test_operator_kopf.py)."""

from __future__ import annotations

import pytest
import urllib3
from kubernetes.client.rest import ApiException
from marl_operator.drain import DrainError, drain


class Cluster:
    """RoutingPolicies that go once deleted, unless held (a finalizer without an operator);
    ``script`` maps a poll number to what happens then: an error, or a policy created."""

    def __init__(self, policies, held=(), script=None):
        self.policies = {key: False for key in policies}  # key -> deletion under way
        self.held, self.script = set(held), dict(script or {})
        self.polls, self.deletes, self.namespaces = 0, [], []

    def routing_policies(self, namespaces=()):
        self.polls += 1
        self.namespaces.append(tuple(namespaces))
        event = self.script.get(self.polls)
        if isinstance(event, Exception):
            raise event
        if isinstance(event, str):
            self.policies[event] = False
        for key, deleting in list(self.policies.items()):
            if deleting and key not in self.held:
                del self.policies[key]
        return dict(self.policies)

    def delete_policy(self, key):
        self.deletes.append(key)
        self.policies[key] = True


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def run(cluster, timeout_s=10.0, namespaces=()):
    clock = Clock()
    return drain(cluster, namespaces, timeout_s, 1.0, clock=clock, sleep=clock.sleep)


def test_every_policy_is_deleted_once_and_waited_for():
    cluster = Cluster(["a/p", "b/q"])
    assert run(cluster, namespaces=("a", "b")) == []
    assert cluster.deletes == ["a/p", "b/q"]
    assert set(cluster.namespaces) == {("a", "b")}


def test_a_held_policy_is_named_at_the_timeout():
    cluster = Cluster(["a/p", "a/held"], held=["a/held"])
    assert run(cluster, timeout_s=5.0) == ["a/held"]
    assert cluster.deletes.count("a/held") == 1  # asked once: its deletion is under way


def test_a_policy_created_while_draining_is_deleted_too():
    cluster = Cluster(["a/held"], held=["a/held"], script={3: "a/late"})
    assert run(cluster, timeout_s=5.0) == ["a/held"]
    assert "a/late" in cluster.deletes and "a/late" not in cluster.policies


@pytest.mark.parametrize(
    "error",
    [
        ApiException(status=503, reason="Service Unavailable"),
        ApiException(status=429, reason="Too Many Requests"),
        urllib3.exceptions.ReadTimeoutError(None, "/apis", "read timed out"),
        ConnectionRefusedError("connection refused"),
    ],
)
def test_an_api_server_that_fails_for_a_while_is_tried_again(error):
    cluster = Cluster(["a/p"], script={1: error, 2: error})
    assert run(cluster) == []
    assert cluster.deletes == ["a/p"]


def test_a_refusal_says_what_to_grant_at_once():
    cluster = Cluster(["a/p"], script={1: ApiException(status=403, reason="Forbidden")})
    with pytest.raises(DrainError, match="grant it list and delete on routingpolicies"):
        run(cluster)
    assert cluster.polls == 1


def test_a_cluster_never_listed_is_an_error_not_an_empty_drain():
    down = ApiException(status=503, reason="Service Unavailable")
    cluster = Cluster(["a/p"], script={n: down for n in range(1, 100)})
    with pytest.raises(DrainError, match="could not list"):
        run(cluster, timeout_s=3.0)
