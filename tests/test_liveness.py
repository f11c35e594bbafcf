"""Edge nodes that are down: read from their Kubernetes nodes, and no route goes to them.

From the rule (:mod:`marl_operator.liveness`) through the guard and the observer to whole
cycles of the runtime over the in-memory mesh; the operator under kopf, against the emulated
API server, is in ``test_operator_kopf.py``.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
from kubernetes.client.rest import ApiException
from marl_operator.controller import decision_table
from marl_operator.guard import evacuate, fallback_table, limit_table
from marl_operator.kube import Forbidden
from marl_operator.liveness import Liveness, liveness, why_down
from marl_operator.mesh.model import MeshError
from marl_operator.mesh.routing import build_routes, catch_all
from marl_operator.observer import Observer
from marl_operator.problem import build_problem
from marl_operator.report import Outcome
from marl_operator.runtime import Runtime
from marl_operator.spec import parse_policy_spec
from marl_operator.status import status_of
from operator_fakes import FakeKube, Reader, example, example_mesh, example_policy_body

from demo.cluster import kind_nodes, kubernetes_node

EDGE_NODES = example("edgenodes.yaml")
SERVICES = example("edgeservice.yaml")
EDGE = {n["metadata"]["name"]: n for n in EDGE_NODES}


def cluster(**ready: str) -> list[dict]:
    """kind's workers, each Ready unless ``ready`` gives its status (``kind_worker2="False"``)."""
    nodes = kind_nodes()
    for node in nodes:
        status = ready.get(node["metadata"]["name"].replace("-", "_"), "True")
        node["status"] = kubernetes_node(node["metadata"]["name"], {}, status)["status"]
    return nodes


def out(*nodes: str) -> Liveness:
    """Liveness with ``nodes`` down."""
    return Liveness(dict.fromkeys(nodes, "down"))


def problem():
    spec = parse_policy_spec(example_policy_body()["spec"])
    return build_problem(spec, EDGE_NODES, {s["metadata"]["name"]: s for s in SERVICES}, 3)


# -- the rule ------------------------------------------------------------------------------


def test_every_example_edge_node_is_up_on_the_kind_cluster():
    """examples/edgenodes.yaml selects kind's workers by their marl.dev/edge-node label (edge-0,
    edge-1) and by zone (edge-2): on the cluster kind-config.yaml makes, all three are up."""
    assert liveness(EDGE_NODES, cluster()).down == {}


def test_a_node_whose_kubernetes_nodes_are_gone_or_not_ready_is_down():
    assert why_down(EDGE["edge-1"], cluster(kind_worker2="Unknown")) == (
        "none of its Kubernetes nodes is Ready (kind-worker2: Ready is Unknown (NodeStatusUnknown))"
    )
    # selected by its zone label: the node that carries it is not Ready
    assert "kind-worker3: Ready is False" in why_down(EDGE["edge-2"], cluster(kind_worker3="False"))
    named = copy.deepcopy(EDGE["edge-0"])
    del named["spec"]["nodeSelector"]
    named["spec"]["nodeNames"] = ["kind-worker"]
    gone = [n for n in cluster() if n["metadata"]["name"] != "kind-worker"]
    assert why_down(named, gone) == "no Kubernetes node named kind-worker exists"
    assert why_down(EDGE["edge-0"], gone) == (
        "no Kubernetes node matching its spec.nodeSelector exists"
    )
    relabelled = copy.deepcopy(cluster())
    for node in relabelled:
        node["metadata"]["labels"].pop("topology.kubernetes.io/zone")
    assert why_down(EDGE["edge-2"], relabelled) == (
        "no Kubernetes node matching its spec.nodeSelector exists"
    )
    silent = [{**n, "status": {}} if n["metadata"]["name"] == "kind-worker" else n for n in gone]
    silent.append({"metadata": {"name": "kind-worker"}, "status": {}})
    assert "kind-worker: it reports no Ready condition" in why_down(named, silent)
    assert set(liveness(EDGE_NODES, cluster(kind_worker2="False")).down) == {"edge-1"}


def test_one_ready_kubernetes_node_keeps_an_edge_node_up():
    """An edge node of several Kubernetes nodes, named and selected, is up while any is."""
    edge = copy.deepcopy(EDGE["edge-2"])
    edge["spec"]["nodeNames"] = ["kind-worker"]
    assert why_down(edge, cluster(kind_worker3="False")) is None
    assert why_down(edge, cluster(kind_worker="False")) is None
    both = why_down(edge, cluster(kind_worker="False", kind_worker3="False"))
    assert "kind-worker: Ready is False" in both and "kind-worker3: Ready is False" in both


# -- the guard and the decision ---------------------------------------------------------------


def test_the_share_routed_to_a_node_that_is_down_leaves_at_once():
    """Bounded steps are for decisions, not for routes that fail: the down node's share goes
    to the source's other routes in proportion, then the step toward the decision is
    bounded as usual."""
    p = problem()
    live = {
        "fn": {
            "edge-0": {"edge-0": 50, "edge-1": 30, "edge-2": 20},
            "edge-1": {"edge-1": 100},  # the down node's own clients: its neighbours now
            "edge-2": {"edge-2": 0, "edge-1": 100},  # nothing on the routes that are up
        }
    }
    moved = evacuate(live, p, out("edge-1"))["fn"]
    assert moved["edge-0"] == {"edge-0": 71, "edge-2": 29}  # 50:20 kept
    assert moved["edge-1"] == {"edge-0": 50, "edge-2": 50}
    assert moved["edge-2"] == {"edge-2": 50, "edge-0": 50}
    assert evacuate(live, p, Liveness()) == live
    # a row of a node the policy no longer has (the next write drops it) is left alone
    removed = {"fn": {"edge-9": {"edge-9": 50, "edge-1": 50}}}
    assert evacuate(removed, p, out("edge-1")) == removed
    # every route of edge-0 down: nothing else could serve, the row stays
    assert evacuate(live, p, out("edge-0", "edge-1", "edge-2")) == live
    proposed = {"fn": {"edge-0": {"edge-0": 40, "edge-2": 60}}}
    limited = limit_table(evacuate({"fn": {"edge-0": live["fn"]["edge-0"]}}, p, out("edge-1")),
                          proposed, max_change=5)  # fmt: skip
    assert limited["fn"]["edge-0"] == {"edge-0": 66, "edge-2": 34}


def line_problem():
    """edge-0 - edge-1 - edge-2: edge-0 and edge-2 are no neighbours."""
    nodes = copy.deepcopy(EDGE_NODES)
    links = {"edge-0": ["edge-1"], "edge-1": ["edge-0", "edge-2"], "edge-2": ["edge-1"]}
    for node in nodes:
        keep = links[node["metadata"]["name"]]
        node["spec"]["neighbours"] = [n for n in node["spec"]["neighbours"] if n["name"] in keep]
    spec = parse_policy_spec(example_policy_body()["spec"])
    return build_problem(spec, nodes, {s["metadata"]["name"]: s for s in SERVICES}, 3)


def test_with_a_whole_neighbourhood_down_traffic_goes_where_a_node_is_up():
    """edge-0 and its only neighbour down: an even split (what the mesh does before any
    route is written) still reaches edge-2, which takes it all; clients on no edge node are
    sent only to edge-2."""
    p = line_problem()
    down = {"edge-0", "edge-1"}
    alive = out(*down)
    even = {"fn": {"edge-0": {"edge-0": 34, "edge-1": 33, "edge-2": 33}}}
    assert evacuate(even, p, alive)["fn"]["edge-0"] == {"edge-2": 100}
    local = {"fn": {"edge-0": {"edge-0": 100}}}  # nothing up it could reach: kept
    assert evacuate(local, p, alive) == local
    weights = np.zeros((p.topology.num_agents, p.topology.max_degree + 2))
    weights[:, 0] = 1.0
    table = decision_table(p, weights, min_weight=5, alive=alive)["fn"]
    routes = build_routes(table, p.nodes, down=down)
    assert routes.default == {"edge-2": 100}
    assert catch_all(table, p.nodes) != {"edge-2": 100}  # what it was without


def test_decisions_and_fallbacks_route_nothing_to_a_node_that_is_down():
    p = problem()
    topo = p.topology
    weights = np.zeros((topo.num_agents, topo.max_degree + 2))
    weights[:, :3] = 1 / 3  # each node: itself and both neighbours
    table = decision_table(p, weights, min_weight=5, alive=out("edge-1"))["fn"]
    assert all("edge-1" not in row and sum(row.values()) == 100 for row in table.values())
    assert decision_table(p, weights, min_weight=5)["fn"]["edge-0"]["edge-1"] >= 5
    static = fallback_table("static", p, 5, out("edge-1"))["fn"]
    assert all("edge-1" not in row for row in static.values())
    local = fallback_table("local", p, 0, out("edge-1"))["fn"]
    assert local["edge-0"] == {"edge-0": 100, "edge-2": 0}
    assert local["edge-1"] == {"edge-0": 100, "edge-2": 0}  # its first neighbour that is up


def test_the_observer_sees_a_node_that_is_down_as_the_simulator_sees_a_failed_one():
    """No capacity, no load, no queue, inactive; and its capacity estimate is kept for when
    it is back, not learned from what its last series say."""
    mesh = example_mesh()
    p = problem()
    observer = Observer(p)
    readings = {"fn": mesh.read_metrics(namespace="edge", service="fn", host="", window="1m")}
    observer.telemetry(readings)
    before = observer.capacity.copy()
    down = np.array([False, True, False])
    tel = observer.telemetry(readings, down)
    assert tel.capacity[1] == 0 and not tel.mesh.active[1] and tel.mesh.active[[0, 2]].all()
    assert tel.mesh.utilisation[0, 1] == 0 and tel.backlog_end[1] == 0
    assert tel.capacity[0] > 0 and observer.capacity[1] == before[1]
    assert not np.isfinite(tel.busy[1])
    # its clients are expected to be silent: not reported as missing metrics
    got = readings["fn"]
    quiet = dict(got.rate)
    for pair in [pair for pair in quiet if pair[0] == "loadgen-edge-1"]:
        del quiet[pair]
    readings = {"fn": dataclasses.replace(got, rate=quiet)}
    observer.telemetry(readings)
    assert observer.silent == {"fn": ("edge-1",)}
    observer.telemetry(readings, down)
    assert observer.silent == {}


def test_requests_that_found_no_endpoint_are_reported_per_client_node():
    """A subset without ready pods on a node that is up (its service crashed there): Istio
    reports the clients' 503s to destination ``unknown``. No node is down, so nothing routes
    around it; the status says where they come from, for a person to look."""
    mesh = example_mesh()
    observer = Observer(problem())
    got = mesh.read_metrics(namespace="edge", service="fn", host="", window="1m")
    rate = {**got.rate, ("loadgen-edge-0", "unknown"): 4.0, ("loadgen-edge-2", "unknown"): 0.5}
    tel = observer.telemetry({"fn": dataclasses.replace(got, rate=rate)})
    assert observer.no_upstream == {"fn": {"edge-0": 4.0, "edge-2": 0.5}}
    assert tel.mesh.active.all()  # the flows to the edge nodes are read as before
    observer.telemetry({"fn": got})
    assert observer.no_upstream == {}


def test_the_status_names_the_clients_that_got_no_upstream():
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    read = mesh.read_metrics

    def with_no_upstream(**query):
        got = read(**query)
        pair = ("loadgen-edge-1", "unknown")
        return dataclasses.replace(
            got, rate={**got.rate, pair: 6.0}, age_s={**got.age_s, pair: 0.0}
        )

    mesh.read_metrics = with_no_upstream
    report = runtime.cycle("edge/p", example_policy_body())
    assert report.no_upstream == {"fn": {"edge-1": 6.0}}
    metrics = next(
        c for c in status_of(report, None)["conditions"] if c["type"] == "MetricsAvailable"
    )
    assert metrics["status"] == "True"
    assert "clients got 503 with no upstream (fn: edge-1 6.0/s)" in metrics["message"]


# -- whole cycles ----------------------------------------------------------------------------


def runtime_over(mesh, **options) -> tuple[Runtime, FakeKube]:
    """A runtime over ``mesh`` and the example cluster that reads the nodes at every cycle."""
    kube = FakeKube(EDGE_NODES, SERVICES)
    runtime = Runtime(kube, mesh=mesh, reader_for=lambda url: Reader(mesh), **options)
    runtime.inventory.refresh_s = 0.0
    return runtime, kube


def nodes_ready(report) -> dict:
    return next(c for c in status_of(report, None)["conditions"] if c["type"] == "NodesReady")


def take_down(kube: FakeKube, name: str) -> None:
    kube.cluster_nodes = [
        kubernetes_node(name, n["metadata"]["labels"], "False") if n["metadata"]["name"] == name
        else n
        for n in kube.cluster_nodes
    ]  # fmt: skip


def test_a_cycle_routes_around_a_node_whose_kubernetes_node_stopped_being_ready():
    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)
    body = example_policy_body(safety={"maxWeightChange": 5})
    first = runtime.cycle("edge/p", body)
    assert first.outcome == Outcome.APPLIED and first.down == {}
    assert nodes_ready(first)["status"] == "True"
    assert any(row.get("edge-1", 0) > 0 for row in mesh.routes["fn"].by_source.values())
    take_down(kube, "kind-worker2")
    mesh.stale_sources = {"edge-1"}  # its series stop: expected, not a reason to hold
    report = runtime.cycle("edge/p", body)
    assert report.outcome in (Outcome.APPLIED, Outcome.UNCHANGED), report.reason
    assert set(report.down) == {"edge-1"}
    assert report.reason.endswith("; no route to edge-1: down (see NodesReady)")
    for source, row in mesh.routes["fn"].by_source.items():
        assert row.get("edge-1", 0) == 0, (source, row)
        assert sum(row.values()) == 100
    # nor are clients on no edge node sent there (the catch-all rule)
    assert mesh.routes["fn"].default.get("edge-1", 0) == 0 and mesh.routes["fn"].default
    condition = nodes_ready(report)
    assert condition["status"] == "False" and condition["reason"] == "NodesDown"
    assert "edge-1: none of its Kubernetes nodes is Ready (kind-worker2" in condition["message"]
    # back: its series are not current yet (that holds nothing), and routes come back
    kube.cluster_nodes = kind_nodes()
    back = runtime.cycle("edge/p", body)
    assert back.outcome in (Outcome.APPLIED, Outcome.UNCHANGED), back.reason
    assert back.down == {} and nodes_ready(back)["status"] == "True"
    mesh.stale_sources = set()
    for _ in range(3):
        runtime.cycle("edge/p", body)
    assert any(row.get("edge-1", 0) > 0 for row in mesh.routes["fn"].by_source.values())


def test_a_held_cycle_still_moves_routes_off_a_node_that_is_down():
    """Metrics missing: the weights are held, but for the share routed to a node known to
    be down, which would fail whatever the metrics said."""
    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)
    body = example_policy_body()
    runtime.cycle("edge/p", body)
    applied = mesh.routes["fn"].by_source
    assert any(row.get("edge-1", 0) > 0 for row in applied.values())
    mesh.down = True  # Prometheus unreachable
    take_down(kube, "kind-worker2")
    held = runtime.cycle("edge/p", body)
    assert held.outcome == Outcome.HELD
    assert "but for routes to nodes that are down (edge-1): moved" in held.reason
    for source, row in mesh.routes["fn"].by_source.items():
        assert row.get("edge-1", 0) == 0 and sum(row.values()) == 100, (source, row)
        # the other routes keep their proportions
        old = applied[source]
        rest = [n for n in row if n != "edge-1" and old.get(n, 0) > 0]
        if len(rest) == 2:
            a, b = rest
            assert row[a] / row[b] == pytest.approx(old[a] / old[b], rel=0.1)


def test_with_every_node_down_nothing_is_written():
    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)
    body = example_policy_body()
    runtime.cycle("edge/p", body)
    routes, writes = mesh.routes["fn"].by_source, mesh.writes
    kube.cluster_nodes = cluster(kind_worker="False", kind_worker2="False", kind_worker3="False")
    held = runtime.cycle("edge/p", body)
    assert held.outcome == Outcome.HELD and "no edge node of the policy is up" in held.reason
    assert mesh.writes == writes and mesh.routes["fn"].by_source == routes
    assert set(held.down) == {"edge-0", "edge-1", "edge-2"}


def test_nodes_that_may_not_be_read_count_as_up_and_the_status_says_why():
    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)

    def refused():
        raise Forbidden("list", "Node", "", "")

    kube.kubernetes_nodes = refused
    report = runtime.cycle("edge/p", example_policy_body())
    assert report.outcome == Outcome.APPLIED and report.down == {}
    condition = nodes_ready(report)
    assert condition["status"] == "Unknown" and condition["reason"] == "Unreadable"
    assert "may not list nodes at the cluster scope" in condition["message"]
    body = example_policy_body(suspend=True)
    body["metadata"]["generation"] = 2
    suspended = runtime.cycle("edge/p", body)
    assert suspended.down is None and nodes_ready(suspended)["reason"] == "NotRead"


def test_series_of_a_node_back_up_hold_nothing_for_stale_after_seconds_only():
    """Its clients' series take staleAfterSeconds to be current again: until then they are
    expected to be stale; past it, stale series hold the weights as any others would."""
    mesh = example_mesh()
    now = [1000.0]
    runtime, kube = runtime_over(mesh, clock=lambda: now[0])
    body = example_policy_body(safety={"staleAfterSeconds": 60})
    runtime.cycle("edge/p", body)
    take_down(kube, "kind-worker2")
    mesh.stale_sources = {"edge-1"}
    assert set(runtime.cycle("edge/p", body).down) == {"edge-1"}
    kube.cluster_nodes = kind_nodes()
    now[0] += 30
    assert runtime.cycle("edge/p", body).outcome != Outcome.HELD
    now[0] += 31  # 61 s since it was last seen down
    held = runtime.cycle("edge/p", body)
    assert held.outcome == Outcome.HELD and "metrics are stale" in held.reason


@pytest.mark.parametrize(
    "failure",
    [Forbidden("list", "Node", "", ""), ApiException(status=500, reason="Internal Server Error"),
     ConnectionResetError("reset by peer")],
    ids=["forbidden", "server-error", "connection"],
)  # fmt: skip
def test_while_nodes_cannot_be_read_a_node_known_down_stays_down(failure):
    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)
    body = example_policy_body(safety={"failureThreshold": 1, "fallback": "static"})
    runtime.cycle("edge/p", body)
    take_down(kube, "kind-worker2")
    assert set(runtime.cycle("edge/p", body).down) == {"edge-1"}

    def fails():
        raise failure

    kube.kubernetes_nodes = fails
    report = runtime.cycle("edge/p", body)
    assert report.outcome in (Outcome.APPLIED, Outcome.UNCHANGED), report.reason
    assert set(report.down) == {"edge-1"}
    condition = nodes_ready(report)
    assert condition["status"] == "Unknown" and condition["reason"] == "Unreadable"
    assert "list" in condition["message"] and "Traceback" not in condition["message"]
    # and the fallback written when metrics fail too does not route to it either
    mesh.down = True
    fallen = runtime.cycle("edge/p", body)
    assert fallen.outcome == Outcome.FALLBACK
    for source, row in mesh.routes["fn"].by_source.items():
        assert row.get("edge-1", 0) == 0 and sum(row.values()) == 100, (source, row)
    assert mesh.routes["fn"].default.get("edge-1", 0) == 0


def test_a_hold_fallback_moves_routes_off_a_node_that_is_down_unless_dry_run():
    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)
    body = example_policy_body(safety={"failureThreshold": 1, "fallback": "hold"})
    runtime.cycle("edge/p", body)
    mesh.down = True
    take_down(kube, "kind-worker2")
    fallen = runtime.cycle("edge/p", body)
    assert fallen.outcome == Outcome.FALLBACK and fallen.fallback == "hold"
    assert fallen.reason.endswith(
        "fallback hold, but for routes to nodes that are down (edge-1): moved"
    )
    assert all(row.get("edge-1", 0) == 0 for row in mesh.routes["fn"].by_source.values())

    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)
    dry = example_policy_body(dryRun=True, safety={"failureThreshold": 1, "fallback": "hold"})
    runtime.cycle("edge/p", dry)
    writes = mesh.writes
    mesh.down = True
    take_down(kube, "kind-worker2")
    report = runtime.cycle("edge/p", dry)
    assert report.outcome == Outcome.FALLBACK and mesh.writes == writes
    assert "routes to nodes that are down (edge-1) not moved (spec.dryRun)" in report.reason
    assert "not written" not in report.reason


def test_a_held_cycle_leaves_a_service_whose_routes_could_not_be_read():
    """Its table is a guess (an even split): moving weight in it would replace the object."""
    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)
    body = example_policy_body()
    runtime.cycle("edge/p", body)
    writes = mesh.writes

    def unreadable(service, nodes):
        raise MeshError("the VirtualService fn was edited beyond recognition")

    mesh.read = unreadable
    mesh.down = True
    take_down(kube, "kind-worker2")
    held = runtime.cycle("edge/p", body)
    assert held.outcome == Outcome.HELD and mesh.writes == writes
    assert "could not be read" in held.reason


def test_edge_nodes_show_their_kubernetes_nodes_and_readiness_written_once_per_change():
    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)
    body = example_policy_body()
    runtime.cycle("edge/p", body)
    assert kube.edge_status["edge-2"]["kubernetesNodes"] == ["kind-worker3"]  # by its zone
    ready = kube.edge_status["edge-1"]["conditions"][0]
    assert ready["type"] == "Ready" and ready["status"] == "True"
    assert ready["reason"] == "KubernetesNodeReady" and ready["lastTransitionTime"]
    assert kube.edge_status_writes == 3
    runtime.cycle("edge/p", body)
    assert kube.edge_status_writes == 3  # nothing changed: nothing written
    take_down(kube, "kind-worker2")
    runtime.cycle("edge/p", body)
    assert kube.edge_status_writes == 4
    ready = kube.edge_status["edge-1"]["conditions"][0]
    assert ready["status"] == "False" and ready["reason"] == "KubernetesNodesNotReady"
    assert "kind-worker2: Ready is False" in ready["message"]

    # a refused write fails no cycle, and is tried again
    def refused(name, status):
        raise Forbidden("patch", "EdgeNodeStatus", "", name)

    kube.patch_edge_node_status = refused
    kube.cluster_nodes = kind_nodes()
    assert runtime.cycle("edge/p", body).outcome in (Outcome.APPLIED, Outcome.UNCHANGED)
    del kube.patch_edge_node_status  # the fake's own again
    runtime.cycle("edge/p", body)
    assert kube.edge_status["edge-1"]["conditions"][0]["status"] == "True"


def test_edge_node_statuses_are_written_again_after_leading_again():
    """Writes were remembered across a stand-down: the peer that led meanwhile wrote edge-1
    NotReady, and back in the lead this replica, remembering its own Ready, wrote nothing
    after the node recovered."""
    runtime, kube = runtime_over(example_mesh())
    body = example_policy_body()
    runtime.cycle("edge/p", body)
    assert kube.edge_status["edge-1"]["conditions"][0]["status"] == "True"
    runtime.stand_down("edge/p")
    peer = copy.deepcopy(kube.edge_status["edge-1"])  # the peer's write, while it led
    peer["conditions"][0].update(status="False", reason="KubernetesNodesNotReady")
    kube.edge_status["edge-1"] = peer

    runtime.cycle("edge/p", body)

    assert kube.edge_status["edge-1"]["conditions"][0]["status"] == "True"


def test_a_recreated_edge_node_gets_its_status_and_transition_times_survive_other_changes():
    """Writes are remembered per object (uid), not per name; a change of its Kubernetes nodes
    that leaves it Ready keeps the time it became Ready, from what was last written (the
    inventory's copy of the object may predate that write)."""
    mesh = example_mesh()
    now = [1_800_000_000.0]
    runtime, kube = runtime_over(mesh, clock=lambda: now[0])
    kube.nodes = copy.deepcopy(kube.nodes)
    for node in kube.nodes:
        node["metadata"]["uid"] = f"{node['metadata']['name']}-1"
    body = example_policy_body()
    runtime.cycle("edge/p", body)
    became_ready = kube.edge_status["edge-2"]["conditions"][0]["lastTransitionTime"]
    # another worker joins site C: edge-2 has two Kubernetes nodes, still Ready
    now[0] += 600
    kube.cluster_nodes[0]["metadata"]["labels"]["topology.kubernetes.io/zone"] = "site-c"
    runtime.cycle("edge/p", body)
    status = kube.edge_status["edge-2"]
    assert status["kubernetesNodes"] == ["kind-worker", "kind-worker3"]
    assert status["conditions"][0]["lastTransitionTime"] == became_ready
    # deleted and applied again: a new object, without status, written again
    writes = kube.edge_status_writes
    kube.nodes[1] = {**kube.nodes[1], "metadata": {**kube.nodes[1]["metadata"], "uid": "edge-1-2"}}
    del kube.edge_status["edge-1"]
    runtime.cycle("edge/p", body)
    assert kube.edge_status_writes == writes + 1 and kube.edge_status["edge-1"]["conditions"]
