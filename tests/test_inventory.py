"""The shared read of EdgeNodes and EdgeServices, and what of them a policy is built from."""

from __future__ import annotations

import copy
import threading

import pytest
from kubernetes.client.rest import ApiException
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


class SlowFirstRead(FakeKube):
    """FakeKube whose first Node list answers the cluster as it was when asked, but only
    once ``go`` is set: a read overtaken by a later one."""

    def __init__(self) -> None:
        super().__init__(NODES, SERVICES)
        self.asked, self.go = threading.Event(), threading.Event()
        self.first = True

    def kubernetes_nodes(self):
        answer = copy.deepcopy(self.cluster_nodes)
        if self.first:
            self.first = False
            self.asked.set()
            self.go.wait(timeout=10)
        return answer


def test_a_read_overtaken_by_a_newer_one_does_not_replace_it():
    """Policies' cycles refresh the inventory at once on four workers: a slow read that
    started first and ended last put back a Node that was Ready, for a whole refresh."""
    kube, now = SlowFirstRead(), [100.0]
    inventory = Inventory(kube, refresh_s=10, clock=lambda: now[0])
    slow = threading.Thread(target=inventory.kubernetes_nodes)
    slow.start()
    assert kube.asked.wait(10)
    kube.cluster_nodes = kube.cluster_nodes[1:]  # a node is gone meanwhile
    now[0] += 0.5
    newer = inventory.kubernetes_nodes()
    kube.go.set()
    slow.join(10)
    now[0] += 1
    assert inventory.kubernetes_nodes() == newer == kube.cluster_nodes


def test_a_failing_list_answers_the_last_good_one_to_the_cycles_but_not_to_builds():
    """The API server failing the EdgeNode list for a while (a 500, a timeout) failed every
    cycle of every policy before it reached its controller, so a node going down meanwhile
    kept its traffic. Cycles go on with the last good read; building a policy still needs a
    fresh one, and a refusal (403) is still raised (see above)."""
    kube, now = CountingKube(), [0.0]
    inventory = Inventory(kube, refresh_s=10, clock=lambda: now[0])
    assert inventory.edge_nodes() == NODES
    assert inventory.edge_services("edge", ("fn",)) == {"fn": SERVICES[0]}

    def failing(*args):
        raise ApiException(status=500, reason="Internal Server Error")

    calls = []
    kube.edge_nodes = kube.edge_services = lambda *args: calls.append(args) or failing()
    now[0] = 25
    for _ in range(3):  # every policy's cycle within the refresh
        assert inventory.edge_nodes() == NODES
        assert inventory.edge_services("edge", ("fn",)) == {"fn": SERVICES[0]}
    assert len(calls) == 2  # the failing API server is asked once per refresh, not per cycle
    with pytest.raises(ApiException):
        inventory.edge_nodes(fresh=True)
    with pytest.raises(ApiException):
        inventory.edge_services("edge", ("fn",), fresh=True)
    with pytest.raises(ApiException):  # nothing good was ever read of it
        inventory.edge_services("edge", ("other",))


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
