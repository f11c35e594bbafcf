"""The shared read of EdgeNodes and EdgeServices, and what of them a policy is built from."""

from __future__ import annotations

import pytest
from marl_operator.inventory import Inventory, fingerprint
from marl_operator.kube import Forbidden
from marl_operator.spec import parse_policy_spec
from operator_fakes import FakeKube, example, example_policy_body

NODES, SERVICES = example("edgenodes.yaml"), example("edgeservice.yaml")


class CountingKube(FakeKube):
    """FakeKube counting its reads; refuses them while ``refusing``."""

    def __init__(self) -> None:
        super().__init__(NODES, SERVICES)
        self.reads = {"nodes": 0, "services": 0}
        self.refusing = False

    def edge_nodes(self):
        self.reads["nodes"] += 1
        if self.refusing:
            raise Forbidden("list", "EdgeNode", "", "", "no")
        return super().edge_nodes()

    def edge_services(self, namespace, names):
        self.reads["services"] += len(names)
        return super().edge_services(namespace, names)


def test_many_policies_share_one_read_per_refresh():
    kube, now = CountingKube(), [0.0]
    inventory = Inventory(kube, refresh_s=10, clock=lambda: now[0])
    for _ in range(100):  # a hundred policies' cycles within one refresh
        inventory.edge_nodes()
        inventory.edge_services("edge", ("fn", "absent"))
    assert kube.reads == {"nodes": 1, "services": 2}
    assert set(inventory.edge_services("edge", ("fn", "absent"))) == {"fn"}
    now[0] = 10
    inventory.edge_nodes()
    inventory.edge_services("edge", ("fn",))
    assert kube.reads == {"nodes": 2, "services": 3}
    inventory.edge_nodes(fresh=True)
    inventory.edge_services("edge", ("fn",), fresh=True)
    assert kube.reads == {"nodes": 3, "services": 4}


def test_a_refused_read_is_raised_every_time_not_remembered():
    kube = CountingKube()
    inventory = Inventory(kube, refresh_s=10, clock=lambda: 0.0)
    kube.refusing = True
    for _ in range(2):
        with pytest.raises(Forbidden):
            inventory.edge_nodes()
    kube.refusing = False
    assert inventory.edge_nodes() == NODES


def test_a_failed_read_of_the_kubernetes_nodes_is_remembered_for_the_refresh():
    """Every policy asks for the Nodes every cycle: a refused cluster-wide list is not
    repeated that often; a good read after the refresh replaces it."""
    kube, now, calls = CountingKube(), [0.0], []

    def refused():
        calls.append(now[0])
        raise Forbidden("list", "Node", "", "", "no")

    kube.kubernetes_nodes = refused
    inventory = Inventory(kube, refresh_s=10, clock=lambda: now[0])
    for _ in range(5):
        with pytest.raises(Forbidden, match="may not list nodes"):
            inventory.kubernetes_nodes()
    assert calls == [0.0]
    now[0] = 10
    kube.kubernetes_nodes = lambda: [{"metadata": {"name": "kind-worker"}}]
    assert inventory.kubernetes_nodes() == [{"metadata": {"name": "kind-worker"}}]


def test_the_fingerprint_follows_what_the_policy_is_built_from():
    spec = parse_policy_spec(example_policy_body()["spec"])
    services = {"fn": SERVICES[0]}
    base = fingerprint(spec, NODES, services)
    relabelled = [{**n, "metadata": {**n["metadata"], "labels": {"a": "b"}}} for n in NODES]
    assert fingerprint(spec, relabelled, services) == base
    slower = [{**n, "spec": {**n["spec"], "capacity": {"cpu": "1"}}} for n in NODES]
    assert fingerprint(spec, slower, services) != base
    assert fingerprint(spec, NODES, {}) != base  # the service was deleted
    named = parse_policy_spec(example_policy_body(nodes={"names": ["edge-0", "edge-1"]})["spec"])
    only_two = fingerprint(named, NODES, services)
    other = [n if n["metadata"]["name"] != "edge-2" else {**n, "spec": {}} for n in NODES]
    assert fingerprint(named, other, services) == only_two  # a node it does not govern
    assert fingerprint(named, NODES[:1], services) not in (only_two, base)  # edge-1 deleted
    assert fingerprint(named, [], services).startswith("unbuildable: spec.nodes")
