"""A service down on a node that is up: no route of that service goes where it has no ready pod.

From the rule (:func:`marl_operator.liveness.unserved`) and the Kubernetes reads through the
guard to whole cycles of the runtime over the in-memory mesh; the operator under kopf, against
the emulated API server, is in ``test_operator_kopf.py``.
"""

from __future__ import annotations

import copy

import pytest
from kubernetes import client, config
from marl_operator.guard import evacuate, fallback_table
from marl_operator.inventory import Inventory
from marl_operator.kube import Forbidden, Kube, PodsUnreadable
from marl_operator.liveness import Liveness, pod_ready, unserved
from marl_operator.mesh.model import MeshNode, MeshService
from marl_operator.problem import build_problem
from marl_operator.report import Outcome
from marl_operator.runtime import Runtime
from marl_operator.spec import parse_policy_spec
from marl_operator.status import status_of
from operator_fakes import FakeKube, Reader, example, example_mesh, example_policy_body, renamed

from demo.cluster import kubernetes_node, kubernetes_pod, workload_objects

EDGE_NODES = example("edgenodes.yaml")
NODES = (MeshNode("edge-0"), MeshNode("edge-1"), MeshNode("edge-2", "site-b"))
LABEL = "marl.dev/node"


def pod(name: str, node: str | None, ready: str = "True") -> dict:
    return kubernetes_pod(name, "edge", {"app": "fn"} | ({LABEL: node} if node else {}), ready)


# -- the rule ------------------------------------------------------------------------------


def test_a_node_without_a_ready_pod_of_the_service_does_not_serve_it():
    """Pods belong to the node whose label value they carry (``podLabelValue`` where set), as
    the mesh's subsets select them; one ready pod is enough."""
    pods = [
        pod("a", "edge-0", "False"),
        pod("b", "edge-0"),  # one of two ready: edge-0 serves
        pod("c", "edge-1", "False"),
        pod("d", "site-b"),  # edge-2's label value
        pod("e", None),  # no node label: no subset selects it
    ]
    gaps = unserved(NODES, LABEL, pods)
    assert gaps == {
        "edge-1": "none of its 1 pods is ready (c: Ready is False (ContainersNotReady))"
    }
    pods[3] = pod("d", "edge-2")  # labelled with the node's name, not its label value
    assert unserved(NODES, LABEL, pods)["edge-2"] == "no pod labelled marl.dev/node=site-b"
    assert unserved(NODES, "other/label", pods).keys() == {"edge-0", "edge-1", "edge-2"}


def test_a_pod_is_ready_while_its_ready_condition_is_true_and_it_is_not_being_deleted():
    assert pod_ready(pod("a", "edge-0")) == (True, "")
    terminating = pod("a", "edge-0")
    terminating["metadata"]["deletionTimestamp"] = "2026-11-24T00:00:00Z"
    assert pod_ready(terminating) == (False, "terminating")
    pending = {"metadata": {"name": "p"}, "status": {"phase": "Pending"}}
    assert pod_ready(pending) == (False, "Pending, not Ready yet")
    lost = pod("a", "edge-0", "Unknown")  # its node stopped reporting: not an endpoint
    assert pod_ready(lost) == (False, "Ready is Unknown (PodNotReady)")
    many = [pod(f"p{i}", "edge-1", "False") for i in range(5)]
    why = unserved(NODES[1:2], LABEL, many)["edge-1"]
    assert why.startswith("none of its 5 pods is ready (p0: ") and why.endswith(" and 2 more)")


def test_the_kubernetes_service_a_host_names():
    def service(host: str) -> MeshService:
        return MeshService(name="fn", namespace="edge", host=host, port=80)

    assert service("fn").kubernetes_service == ("edge", "fn")
    assert service("fn.edge.svc.cluster.local").kubernetes_service == ("edge", "fn")
    assert service("api.shop.svc").kubernetes_service == ("shop", "api")
    assert service("api.example.com").kubernetes_service is None


def test_a_service_s_routes_leave_a_node_without_its_pod_and_other_services_keep_theirs():
    p = two_services()
    live = {s: {"edge-0": {"edge-0": 50, "edge-1": 50}} for s in ("fn", "heavy")}
    alive = Liveness(unserved={"fn": {"edge-1": "no pod"}})
    assert alive.cannot_serve("fn") == {"edge-1"} and alive.cannot_serve("heavy") == set()
    moved = evacuate(live, p, alive)
    assert moved["fn"]["edge-0"] == {"edge-0": 100, "edge-2": 0}  # 50:0 kept
    assert moved["heavy"] == live["heavy"]
    local = fallback_table("local", p, 0, alive)
    assert local["fn"]["edge-1"] == {"edge-0": 100, "edge-2": 0}  # its first neighbour
    assert local["heavy"]["edge-1"] == {"edge-0": 0, "edge-1": 100, "edge-2": 0}


# -- reading the pods ------------------------------------------------------------------------


def test_the_pods_are_read_through_the_service_s_selector(apiserver):
    api = config.new_client_from_config(config_file=str(apiserver.kubeconfig))
    kube = Kube(api)
    try:
        pods = kube.service_pods("edge", "fn")
        assert sorted(p["metadata"]["name"] for p in pods) == [
            "fn-edge-0-0",
            "fn-edge-1-0",
            "fn-edge-2-0",
        ]
        # another service's pods, on the same nodes with the same node label, are not fn's
        apiserver.api.register([kubernetes_pod("other-0", "edge", {"app": "other", LABEL: "x"})])
        assert len(kube.service_pods("edge", "fn")) == 3
        with pytest.raises(PodsUnreadable, match="the Service edge/missing does not exist"):
            kube.service_pods("edge", "missing")
        by_hand = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext"}}
        by_hand["spec"] = {"ports": [{"port": 80}]}
        client.CoreV1Api(api).create_namespaced_service("edge", by_hand)
        with pytest.raises(PodsUnreadable, match="edge/ext has no selector"):
            kube.service_pods("edge", "ext")
        apiserver.api.deny("list", "pods")
        with pytest.raises(Forbidden, match="may not list pods in namespace edge"):
            kube.service_pods("edge", "fn")
    finally:
        api.close()


def test_a_failed_read_of_a_service_s_pods_is_remembered_for_the_refresh():
    kube, now, calls = FakeKube(EDGE_NODES, example("edgeservice.yaml")), [0.0], []

    def refused(namespace, name):
        calls.append((namespace, name, now[0]))
        raise Forbidden("list", "Pod", namespace, "")

    good = kube.service_pods
    kube.service_pods = refused
    inventory = Inventory(kube, refresh_s=10, clock=lambda: now[0])
    for _ in range(3):
        with pytest.raises(Forbidden):
            inventory.service_pods("edge", "fn")
    assert calls == [("edge", "fn", 0.0)]
    now[0] = 10
    kube.service_pods = good
    assert len(inventory.service_pods("edge", "fn")) == 3
    # each Service is its own read; one nobody asks for any more is forgotten
    with pytest.raises(PodsUnreadable, match="edge/other does not exist"):
        inventory.service_pods("edge", "other")
    now[0] = 10 + 30 * 10 + 1
    inventory.service_pods("edge", "fn")
    assert ("service_pods", "edge", "other") not in inventory._lists


# -- whole cycles ----------------------------------------------------------------------------


def two_services():
    """The example mesh routing fn and heavy, each its own Kubernetes Service and pods."""
    parsed = parse_policy_spec(example_policy_body(services=["fn", "heavy"])["spec"])
    return build_problem(parsed, EDGE_NODES, {s["metadata"]["name"]: s for s in SERVICES}, 3)


SERVICES = [*example("edgeservice.yaml"), renamed("heavy")]
SERVICES[1]["spec"] = {**SERVICES[1]["spec"], "host": "heavy.edge.svc.cluster.local"}


def runtime_over(mesh) -> tuple[Runtime, FakeKube]:
    """A runtime over ``mesh`` and the example cluster, the demo workload deployed as fn and
    as heavy, reading the cluster at every cycle."""
    kube = FakeKube(EDGE_NODES, SERVICES)
    heavy = copy.deepcopy(workload_objects())
    for obj in heavy:
        obj["metadata"]["name"] = obj["metadata"]["name"].replace("fn", "heavy")
        for labels in (obj["metadata"]["labels"], (obj.get("spec") or {}).get("selector", {})):
            if "app" in labels:
                labels["app"] = "heavy"
    kube.workload += heavy
    runtime = Runtime(kube, mesh=mesh, reader_for=lambda url: Reader(mesh))
    runtime.inventory.refresh_s = 0.0
    return runtime, kube


def fail_pod(kube: FakeKube, name: str, ready: str = "False") -> None:
    for obj in kube.workload:
        if obj["kind"] == "Pod" and obj["metadata"]["name"] == name:
            obj["status"]["conditions"] = [{"type": "Ready", "status": ready}]


def condition(report, kind: str) -> dict:
    return next(c for c in status_of(report, None)["conditions"] if c["type"] == kind)


def weight_to(mesh, service: str, node: str) -> int:
    routes = mesh.routes[service]
    return sum(row.get(node, 0) for row in [*routes.by_source.values(), routes.default])


def test_a_cycle_routes_a_service_around_a_node_where_its_pod_stopped_being_ready():
    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)
    body = example_policy_body(services=["fn", "heavy"], safety={"maxWeightChange": 5})
    first = runtime.cycle("edge/p", body)
    assert first.outcome == Outcome.APPLIED and first.unserved == {}
    assert condition(first, "PodsReady")["status"] == "True"
    assert weight_to(mesh, "fn", "edge-1") > 0 and weight_to(mesh, "heavy", "edge-1") > 0
    fail_pod(kube, "fn-edge-1-0")
    mesh.stale_servers = {("fn", "edge-1")}  # its series stop: expected, not a reason to hold
    report = runtime.cycle("edge/p", body)
    assert report.outcome in (Outcome.APPLIED, Outcome.UNCHANGED), report.reason
    assert report.unserved == {"fn": {"edge-1": "none of its 1 pods is ready (fn-edge-1-0: "
                                                "Ready is False (no reason given))"}}  # fmt: skip
    assert report.reason.endswith("; no route to edge-1 for fn: no ready pod (see PodsReady)")
    assert weight_to(mesh, "fn", "edge-1") == 0  # at once, catch-all included
    assert weight_to(mesh, "heavy", "edge-1") > 0
    ready = condition(report, "PodsReady")
    assert ready["status"] == "False" and "fn on edge-1: none of its 1 pods" in ready["message"]
    assert condition(report, "NodesReady")["status"] == "True"
    fail_pod(kube, "fn-edge-1-0", "True")
    mesh.stale_servers = set()
    back = runtime.cycle("edge/p", body)
    assert back.unserved == {} and condition(back, "PodsReady")["status"] == "True"


def test_a_held_cycle_still_moves_a_service_off_a_node_without_its_pod():
    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)
    body = example_policy_body(services=["fn", "heavy"])
    runtime.cycle("edge/p", body)
    mesh.down = True  # Prometheus unreachable
    fail_pod(kube, "fn-edge-1-0")
    held = runtime.cycle("edge/p", body)
    assert held.outcome == Outcome.HELD
    assert "but for routes to nodes without a ready pod (edge-1 for fn): moved" in held.reason
    assert weight_to(mesh, "fn", "edge-1") == 0 and weight_to(mesh, "heavy", "edge-1") > 0


def test_while_pods_cannot_be_read_a_node_known_without_one_stays_so():
    """A refused read keeps what was known (the status says both); a service never read is
    counted served everywhere, and PodsReady is Unknown."""
    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)
    body = example_policy_body(services=["fn", "heavy"])
    fail_pod(kube, "fn-edge-1-0")
    assert runtime.cycle("edge/p", body).unserved.keys() == {"fn"}
    good = kube.service_pods

    def refused(namespace, name):
        raise Forbidden("list", "Pod", namespace, "")

    kube.service_pods = refused
    fail_pod(kube, "fn-edge-1-0", "True")  # unseen: the read is refused
    report = runtime.cycle("edge/p", body)
    assert report.unserved.keys() == {"fn"} and report.pods_unknown.keys() == {"fn", "heavy"}
    assert weight_to(mesh, "fn", "edge-1") == 0
    message = condition(report, "PodsReady")["message"]
    assert "fn on edge-1" in message and "may not list pods in namespace edge" in message
    fresh, fresh_kube = runtime_over(example_mesh())
    fresh_kube.service_pods = refused
    unknown = fresh.cycle("edge/p", body)
    assert unknown.outcome == Outcome.APPLIED and unknown.unserved == {}
    assert condition(unknown, "PodsReady")["status"] == "Unknown"
    kube.service_pods = good
    assert runtime.cycle("edge/p", body).unserved == {}


def test_a_host_that_names_no_kubernetes_service_leaves_its_pods_unknown():
    mesh = example_mesh()
    kube = FakeKube(EDGE_NODES, example("edgeservice.yaml"))
    kube.services["fn"]["spec"] = {**kube.services["fn"]["spec"], "host": "fn.example.com"}
    runtime = Runtime(kube, mesh=mesh, reader_for=lambda url: Reader(mesh))
    report = runtime.cycle("edge/p", example_policy_body())
    assert report.pods_unknown == {
        "fn": "its host fn.example.com names no Kubernetes Service (name or name.namespace.svc...)"
    }
    assert condition(report, "PodsReady")["reason"] == "Unreadable"


def test_the_clients_of_a_node_without_a_pod_still_hold_the_cycle_when_stale():
    """The node is up: its clients go on sending to the others, so their series going stale
    is no more expected than anywhere else (only the series of its missing pods are); nor
    does one service's gap excuse another's stale series there."""
    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)
    fn_only = example_policy_body(services=["fn"])
    runtime.cycle("edge/f", fn_only)
    fail_pod(kube, "fn-edge-1-0")
    mesh.stale_sources = {"edge-1"}
    held = runtime.cycle("edge/f", fn_only)
    assert held.outcome == Outcome.HELD and "fn's metrics are stale" in held.reason, held.reason
    mesh.stale_sources = set()
    body = example_policy_body(services=["fn", "heavy"])
    runtime.cycle("edge/p", body)
    mesh.stale_servers = {("heavy", "edge-1")}
    held = runtime.cycle("edge/p", body)
    assert held.outcome == Outcome.HELD and "heavy's metrics are stale" in held.reason
    mesh.stale_servers = {("fn", "edge-1")}
    assert runtime.cycle("edge/p", body).outcome in (Outcome.APPLIED, Outcome.UNCHANGED)


def test_a_service_without_a_ready_pod_anywhere_holds_without_counting_failures():
    """Nothing could serve it: its routes stay (no node is better than another) and no
    failure is counted toward the fallback, as with every node down."""
    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)
    body = example_policy_body(services=["fn", "heavy"], safety={"failureThreshold": 2})
    runtime.cycle("edge/p", body)
    before = {s: r.by_source for s, r in mesh.routes.items()}
    for node in ("edge-0", "edge-1", "edge-2"):
        fail_pod(kube, f"fn-{node}-0")
    for _ in range(3):
        report = runtime.cycle("edge/p", body)
        assert report.outcome == Outcome.HELD and report.failures == 0, report.reason
    assert report.reason.startswith("fn has no ready pod on any edge node of the policy")
    assert {s: r.by_source for s, r in mesh.routes.items()} == before
    message = condition(report, "PodsReady")["message"]
    assert "while another can serve it" in message and "fn on edge-0" in message


def test_a_node_down_is_not_also_named_for_its_pods():
    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)
    kube.cluster_nodes = [
        kubernetes_node(n["metadata"]["name"], n["metadata"]["labels"], "False")
        if n["metadata"]["name"] == "kind-worker2"
        else n
        for n in kube.cluster_nodes
    ]
    fail_pod(kube, "fn-edge-1-0")
    report = runtime.cycle("edge/p", example_policy_body(services=["fn", "heavy"]))
    assert set(report.down) == {"edge-1"} and report.unserved == {}


def test_a_refused_read_is_named_once_for_every_service_it_refuses():
    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)

    def refused(namespace, name):
        raise Forbidden("list", "Pod", namespace, "")

    kube.service_pods = refused
    report = runtime.cycle("edge/p", example_policy_body(services=["fn", "heavy"]))
    message = condition(report, "PodsReady")["message"]
    assert "fn, heavy: forbidden" in message and message.count("forbidden") == 1, message
    assert "what was last read of them holds" in message


def test_a_host_in_another_namespace_is_refused_and_nothing_read_or_written():
    """The routes are written in the EdgeService's namespace and Istio applies them to every
    client of the host: an EdgeService naming another namespace's Service would let whoever
    may create one steer that namespace's traffic through the operator's rights."""
    mesh = example_mesh()
    asked = []

    class RecordingReader(Reader):
        def read(self, **kwargs):
            asked.append(kwargs["namespace"])
            return super().read(**kwargs)

    services = copy.deepcopy(example("edgeservice.yaml"))
    services[0]["spec"]["host"] = "fn.shop.svc.cluster.local"
    kube = FakeKube(EDGE_NODES, services)
    runtime = Runtime(kube, mesh=mesh, reader_for=lambda url: RecordingReader(mesh))
    report = runtime.cycle("edge/p", example_policy_body())
    assert report.outcome == Outcome.INVALID
    assert "spec.host 'fn.shop.svc.cluster.local' names a Service of namespace 'shop'" in (
        report.reason
    )
    assert asked == [] and mesh.writes == 0


def test_behind_an_httproute_each_node_s_own_service_tells_whether_it_serves():
    """The Gateway API routes to one Service per node: its pods are what requests reach,
    whatever label they carry."""
    mesh = example_mesh()
    kube = FakeKube(EDGE_NODES, example("edgeservice-httproute.yaml"))
    kube.workload = []
    for node in ("edge-0", "edge-1", "edge-2"):
        labels = {"app": "fn-gw", "site": node}
        kube.workload.append(
            {
                "kind": "Service",
                "metadata": {"name": f"fn-gw-{node}", "namespace": "edge"},
                "spec": {"selector": labels},
            }
        )
        kube.workload.append(kubernetes_pod(f"fn-gw-{node}-0", "edge", labels))
    fail_pod(kube, "fn-gw-edge-1-0")
    runtime = Runtime(kube, mesh=mesh, reader_for=lambda url: Reader(mesh))
    report = runtime.cycle("edge/p", example_policy_body(services=["fn-gw"]))
    assert report.pods_unknown == {}
    assert report.unserved == {
        "fn-gw": {
            "edge-1": "none of its 1 pods is ready (fn-gw-edge-1-0: Ready is False (no reason "
            "given)) behind the Service fn-gw-edge-1"
        }
    }


def test_the_kubernetes_nodes_are_read_as_the_api_s_json(apiserver):
    """Read as JSON (the client's models cost seconds of CPU for thousands of nodes): names,
    labels and the Ready condition, as liveness reads them."""
    api = config.new_client_from_config(config_file=str(apiserver.kubeconfig))
    kube = Kube(api)
    try:
        nodes = {n["metadata"]["name"]: n for n in kube.kubernetes_nodes()}
        assert {"kind-worker", "kind-worker2", "kind-worker3"} <= set(nodes)
        ready = [c for c in nodes["kind-worker"]["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True"
        assert "marl.dev/edge-node" in nodes["kind-worker"]["metadata"]["labels"]
        apiserver.api.deny("list", "nodes")
        with pytest.raises(Forbidden, match="may not list nodes"):
            kube.kubernetes_nodes()
    finally:
        api.close()
