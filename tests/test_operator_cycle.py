"""The operator's control cycle without Kubernetes: spec, problem, observer, guard, runtime."""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kube_schema import CRDValidator, load_documents
from kubernetes.client.rest import ApiException
from marl_operator import runtime as runtime_module
from marl_operator.controller import decision_table, table_weights
from marl_operator.guard import FailureCounter, fallback_table, limit_step
from marl_operator.inventory import Inventory, fingerprint
from marl_operator.kube import Forbidden
from marl_operator.mesh import routing
from marl_operator.mesh.model import MeshError, MeshNode, MeshRoutes, RestoreIncomplete
from marl_operator.mesh.patching import apply_merge_patch
from marl_operator.observer import InsufficientData, Observer
from marl_operator.problem import MeshProblem, build_problem, cpu_quantity
from marl_operator.prometheus import ServiceReadings
from marl_operator.report import CycleReport, Outcome
from marl_operator.runtime import Runtime
from marl_operator.spec import SpecError, parse_policy_spec
from marl_operator.status import status_of, timestamp
from operator_fakes import (
    FakeKube,
    QueueingMesh,
    Reader,
    example,
    example_mesh,
    example_policy_body,
    renamed,
)
from prometheus_client import generate_latest

from demo.cluster import kubernetes_node
from policies import checkpoint
from policies.adaptation import Adapter
from policies.model_env import ModelEnv
from policies.system_model import SystemModel

NODES = example("edgenodes.yaml")
SERVICES = example("edgeservice.yaml")


def problem(**spec):
    parsed = parse_policy_spec(example_policy_body(**spec)["spec"])
    return build_problem(parsed, NODES, {s["metadata"]["name"]: s for s in SERVICES}, 3)


ROOT = Path(__file__).resolve().parents[1]


def runtime_over(mesh: QueueingMesh) -> tuple[Runtime, FakeKube]:
    kube = FakeKube(NODES, SERVICES)
    return Runtime(kube, mesh=mesh, reader_for=lambda url: Reader(mesh)), kube


# -- spec --------------------------------------------------------------------------------


def condition(report, kind: str) -> dict:
    """The condition ``kind`` of the status a cycle's report gives a fresh policy."""
    return next(c for c in status_of(report, None)["conditions"] if c["type"] == kind)


def test_spec_defaults_match_the_crd():
    spec = parse_policy_spec({"services": ["fn"], "checkpoint": {"bundled": "mesh-10x3"}})
    assert spec.interval_s == 30 and spec.safety.max_weight_change == 20
    assert spec.safety.fallback == "hold" and spec.rollout.steps == (0.1, 0.3)
    assert spec.prometheus.window == "1m" and not spec.dry_run


PROM_P95 = "spec.prometheus.queries.latencyP95"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"safety": {"minWeight": 150}}, "spec.safety.minWeight"),
        ({"safety": {"fallback": "panic"}}, "spec.safety.fallback"),
        ({"intervalSeconds": 1}, "spec.intervalSeconds"),
        ({"rollout": {"candidateSteps": [0.5, 2]}}, "spec.rollout.candidateSteps"),
        ({"checkpoint": {"bundled": "x", "path": "/y"}}, "spec.checkpoint"),
        ({"prometheus": {"queries": {"latencyP99": "up"}}}, "spec.prometheus.queries.latencyP99"),
        # A template that could never run fails the spec, not every read as an outage would.
        (
            {"prometheus": {"queries": {"cpuUsage": 'rate(x{pod=~"$service-.+$"}[$window])'}}},
            "spec.prometheus.queries.cpuUsage",
        ),
        ({"prometheus": {"queries": {"latencyP95": "rate(x[$range])"}}}, PROM_P95),
        ({"prometheus": {"queries": {"latencyP95": 95}}}, PROM_P95),
        ({"nodes": {"names": ["a"], "selector": {}}}, "spec.nodes"),
        ({"services": []}, "spec.services"),
        ({"dryRun": "yes"}, "spec.dryRun"),
        ({"prometheus": {"url": "prom:9090"}}, "spec.prometheus.url"),
        ({"prometheus": {"url": "http://u:a/b@prom:9090"}}, "spec.prometheus.url"),
        # A window that is no duration would fail every query, as an outage would.
        ({"prometheus": {"window": "5 minutes"}}, "spec.prometheus.window"),
    ],
)
def test_bad_spec_names_the_field(change, field):
    body = example_policy_body(**change)
    with pytest.raises(SpecError) as caught:
        parse_policy_spec(body["spec"])
    assert caught.value.field == field
    assert str(caught.value).startswith(field)


# -- problem ------------------------------------------------------------------------------


def test_problem_from_the_example_resources():
    p = problem()
    assert p.topology.nodes == ("edge-0", "edge-1", "edge-2")
    assert p.neighbours_of("edge-0") == ("edge-1", "edge-2")
    assert p.topology.max_degree == 3  # padded to the checkpoint's slots
    assert p.topology.link_matrix[0, 2] == 12.0
    np.testing.assert_allclose(p.capacity_rps, [150, 100, 60])
    np.testing.assert_allclose(p.cpu_cores, [0.3, 0.2, 0.12])
    # Without capacity.cpu a node's capacity is its hint until latency tells otherwise.
    hinted = copy.deepcopy(NODES)
    del hinted[2]["spec"]["capacity"]["cpu"]
    parsed = parse_policy_spec(example_policy_body()["spec"])
    assert np.isnan(build_problem(parsed, hinted, {"fn": SERVICES[0]}, 3).cpu_cores[2])
    assert p.target_ms.tolist() == [200.0]


def test_problem_errors_name_what_to_fix():
    with pytest.raises(SpecError, match=r"spec\.nodes\.names: no EdgeNode named edge-8, edge-9"):
        problem(nodes={"names": ["edge-8", "edge-9"]})
    with pytest.raises(SpecError, match="no EdgeService 'other'"):
        problem(services=["other"])
    parsed = parse_policy_spec(example_policy_body()["spec"])
    with pytest.raises(SpecError, match="at most 1"):
        build_problem(parsed, NODES, {"fn": SERVICES[0]}, 1)
    one_way = copy.deepcopy(NODES)  # edge-2 forgets edge-1, which still lists edge-2
    one_way[2]["spec"]["neighbours"] = [{"name": "edge-0", "latencyMs": 12}]
    with pytest.raises(SpecError, match=r"EdgeNode edge-2 spec\.neighbours: EdgeNode edge-1 lists"):
        build_problem(parsed, one_way, {"fn": SERVICES[0]}, 3)
    assert cpu_quantity("3500m", "x") == 3.5 and cpu_quantity(2, "x") == 2.0
    with pytest.raises(SpecError, match="CPU quantity"):
        cpu_quantity("lots", "EdgeNode e spec.capacity.cpu")
    # A CPU of 0 (an EdgeNode applied before its CRD refused it) was read as no CPU given,
    # and the node's capacity silently became one core's worth.
    zero = copy.deepcopy(NODES)
    zero[2]["spec"]["capacity"]["cpu"] = 0
    with pytest.raises(SpecError, match=r"EdgeNode edge-2 spec\.capacity\.cpu: must be a posi"):
        build_problem(parsed, zero, {"fn": SERVICES[0]}, 3)


def test_edge_services_routed_through_one_object_are_refused():
    """Two EdgeServices writing one VirtualService would overwrite each other every cycle
    (a copied manifest that kept ``virtualService: fn``)."""
    parsed = parse_policy_spec(example_policy_body(services=["fn", "fn2"])["spec"])
    services = {"fn": SERVICES[0], "fn2": renamed("fn2", virtualService="fn")}
    with pytest.raises(SpecError, match=r"'fn' and 'fn2' both route through VirtualService/fn"):
        build_problem(parsed, NODES, services, 3)
    services["fn2"] = renamed("fn2")
    assert [s.name for s in build_problem(parsed, NODES, services, 3).services] == ["fn", "fn2"]


def test_edge_nodes_sharing_a_pod_label_are_refused_naming_the_field():
    """The mesh tells nodes apart by their pods' label: a copied ``podLabelValue`` is a spec
    error, not a cycle that fails every interval."""
    nodes = copy.deepcopy(NODES)
    nodes[1]["spec"]["podLabelValue"] = nodes[2]["spec"]["podLabelValue"] = "site-x"
    parsed = parse_policy_spec(example_policy_body()["spec"])
    with pytest.raises(SpecError) as caught:
        build_problem(parsed, nodes, {"fn": SERVICES[0]}, 3)
    assert caught.value.field == "EdgeNode edge-2 spec.podLabelValue"
    assert "edge-1" in str(caught.value)


def test_routes_the_provider_cannot_carry_are_refused_naming_the_service():
    """A per-node Service name over 63 characters is found when the policy is built."""
    parsed = parse_policy_spec(example_policy_body()["spec"])
    service = renamed("fn", provider="gateway-api", httpRoute="fn", nodeServicePrefix="x" * 60)
    service["spec"]["mesh"] = {
        k: v
        for k, v in service["spec"]["mesh"].items()
        if k not in ("virtualService", "destinationRule")
    }
    with pytest.raises(SpecError, match=r"spec\.services: EdgeService 'fn'.*nodeServicePrefix"):
        build_problem(parsed, NODES, {"fn": service}, 3)


def test_selector_and_names_choose_a_subset():
    p = problem(nodes={"names": ["edge-1", "edge-0"]})
    assert p.topology.nodes == ("edge-0", "edge-1")
    assert p.neighbours_of("edge-0") == ("edge-1",)  # edge-2 is not governed
    labelled = [dict(n, metadata={**n["metadata"], "labels": {"site": "a"}}) for n in NODES[:2]]
    parsed = parse_policy_spec(
        example_policy_body(nodes={"selector": {"matchLabels": {"site": "a"}}})["spec"]
    )
    p = build_problem(parsed, [*labelled, NODES[2]], {"fn": SERVICES[0]}, 3)
    assert p.topology.nodes == ("edge-0", "edge-1")


# -- observer ------------------------------------------------------------------------------


def test_observer_translates_pairs_into_node_telemetry():
    p = problem()
    mesh = example_mesh()
    readings = {"fn": mesh.read_metrics(namespace="edge", service="fn", host="", window="1m")}
    tel = Observer(p, capacity_alpha=1.0).telemetry(readings)
    np.testing.assert_allclose(tel.offered[:, 0], [60, 40, 20])  # by source
    np.testing.assert_allclose(tel.incoming[:, 0], [40, 40, 40])  # even split by destination
    truth = mesh.node_latency_ms("fn")
    # The link is taken off the client's latency: what remains is the node's own.
    np.testing.assert_allclose(tel.mean_ms[:, 0], [truth[j][1] for j in truth], rtol=1e-9)
    assert tel.mesh.offered.shape == (1, 3, 1)
    # Backlog from Little's law: utilisation x wait beyond the service time.
    _lam, mean = truth["edge-1"]
    assert tel.backlog_end[1] == pytest.approx(0.4 * (mean - 10.0) / 1000.0)


def test_capacity_is_measured_from_cpu_and_the_hint_kept_where_none_is_reported():
    """Served requests over the busy fraction recover each node's true capacity, which here
    differs from what the EdgeNodes declare (150, 100, 60); a node without a CPU series
    keeps its declared capacity."""
    mesh = example_mesh(capacity=(120.0, 80.0, 45.0))
    got = mesh.read_metrics(namespace="edge", service="fn", host="", window="1m")
    cpu = {pair: cores for pair, cores in got.cpu_cores.items() if pair != "fn-edge-2"}
    readings = {"fn": dataclasses.replace(got, cpu_cores=cpu)}
    tel = Observer(problem(), capacity_alpha=1.0).telemetry(readings)
    np.testing.assert_allclose(tel.capacity[:2], [120, 80], rtol=1e-9)
    assert tel.capacity[2] == 60


def two_services() -> MeshProblem:
    """The example mesh with a second service, ``heavy``, beside ``fn``."""
    parsed = parse_policy_spec(example_policy_body(services=["fn", "heavy"])["spec"])
    return build_problem(parsed, NODES, {"fn": SERVICES[0], "heavy": renamed("heavy")}, 3)


def local_readings(service: str, rps, cpu_ms_per_request: float, cores=None) -> ServiceReadings:
    """Each node's clients served by their own node at ``rps``, each request taking
    ``cpu_ms_per_request`` of CPU (no CPU series for nodes ``cores`` leaves out)."""
    names = ("edge-0", "edge-1", "edge-2")
    cores = names if cores is None else cores
    return ServiceReadings(
        service,
        rate={(f"loadgen-{n}", f"{service}-{n}"): r for n, r in zip(names, rps, strict=True)},
        success={(f"loadgen-{n}", f"{service}-{n}"): 1.0 for n in names},
        mean_ms={(f"loadgen-{n}", f"{service}-{n}"): 20.0 for n in names},
        cpu_cores={
            f"{service}-{n}": r * cpu_ms_per_request / 1000.0
            for n, r in zip(names, rps, strict=True)
            if n in cores
        },
    )


def test_observer_measures_what_a_request_of_each_service_costs():
    """A request of ``heavy`` takes 5x the CPU of one of ``fn``: loads, capacities and service
    times count it so (relative to the services' mean), and until every service's CPU is
    known every request counts as one."""
    p = two_services()
    observer = Observer(p, capacity_alpha=1.0)
    blind = observer.telemetry(
        {
            "fn": local_readings("fn", (40.0, 30.0, 20.0), 20.0),
            "heavy": local_readings("heavy", (10.0, 10.0, 10.0), 100.0, cores=()),
        }
    )
    np.testing.assert_allclose(blind.work, [1.0, 1.0])
    tel = observer.telemetry(
        {
            "fn": local_readings("fn", (40.0, 30.0, 20.0), 20.0),
            "heavy": local_readings("heavy", (10.0, 10.0, 10.0), 100.0),
        }
    )
    np.testing.assert_allclose(tel.work, [20.0 / 60.0, 100.0 / 60.0])
    # Pods of another service whose name begins like this one's match its CPU query; a
    # workload that served none of this service's requests is not counted.
    fn = local_readings("fn", (40.0, 30.0, 20.0), 20.0)
    fn.cpu_cores["fn-heavy-edge-0"] = 3.0
    again = Observer(p, capacity_alpha=1.0).telemetry(
        {"fn": fn, "heavy": local_readings("heavy", (10.0, 10.0, 10.0), 100.0)}
    )
    np.testing.assert_allclose(again.work, tel.work)
    # edge-0 spends 40 x 20 + 10 x 100 ms of CPU per second (1.8 cores): it serves
    # 40/3 + 50/3 = 30 mean requests per second at that busy fraction.
    busy = 1.8 / p.cpu_cores[0]
    np.testing.assert_allclose([tel.busy[0], tel.capacity[0]], [busy, 30.0 / busy])
    assert observer.inputs["heavy"]["edge-0"].cpu_ms_per_request == pytest.approx(100.0)
    assert observer.inputs["fn"]["edge-2"].cpu_ms_per_request == pytest.approx(20.0)
    # The model environment prices the next decision by the measured work.
    env = ModelEnv(p.topology, np.ones(2), p.target_ms, reject_penalty=4.0)
    adapter = Adapter(env, lambda obs, mask: mask / mask.sum(-1, keepdims=True), SystemModel())
    adapter.observe(tel)
    np.testing.assert_allclose(env.work, tel.work)


def test_observer_insufficient_data():
    obs = Observer(problem())
    with pytest.raises(InsufficientData, match="fn"):
        obs.telemetry({"fn": ServiceReadings("fn", {}, {}, {}, {}, {})})
    foreign = ServiceReadings("fn", {("a", "b"): 3.0}, {}, {}, {}, {})
    with pytest.raises(InsufficientData, match="edge node"):
        obs.telemetry({"fn": foreign})


# -- guard ---------------------------------------------------------------------------------


def test_limit_step_bounds_every_route_and_keeps_the_sum():
    rng = np.random.default_rng(0)
    names = ["a", "b", "c", "d"]
    for _ in range(200):
        old = dict(
            zip(names, rng.multinomial(100, rng.dirichlet(np.ones(4))).tolist(), strict=True)
        )
        new = dict(
            zip(names, rng.multinomial(100, rng.dirichlet(np.ones(4))).tolist(), strict=True)
        )
        cap = int(rng.integers(1, 40))
        out = limit_step(old, new, cap)
        assert sum(out.values()) == 100
        assert all(abs(out.get(n, 0) - old[n]) <= cap for n in names)
    assert limit_step({"a": 100}, {"a": 50, "b": 50}, 20) == {"a": 80, "b": 20}
    assert limit_step(None, {"a": 50, "b": 50}, 20) == {"a": 50, "b": 50}


def test_limit_step_leaves_a_route_whose_weights_barely_move():
    old = {"a": 52, "b": 25, "c": 23}
    assert limit_step(old, {"a": 51, "b": 26, "c": 23}, 20, min_change=2) == old
    assert limit_step(old, {"a": 50, "b": 27, "c": 23}, 20, min_change=2) == {
        "a": 50,
        "b": 27,
        "c": 23,
    }
    # a hand edit that broke the sum is corrected however small the move
    assert limit_step({"a": 52, "b": 25, "c": 22}, old, 20, min_change=2) == old


def test_fallback_tables():
    p = problem()
    assert fallback_table("hold", p, 0) is None
    local = fallback_table("local", p, 0)["fn"]
    assert local["edge-1"] == {"edge-1": 100, "edge-0": 0, "edge-2": 0}
    static = fallback_table("static", p, 0)["fn"]
    assert static["edge-0"] == {"edge-0": 49, "edge-1": 32, "edge-2": 19}  # 150:100:60


def test_decision_table_spreads_reject_and_respects_min_weight():
    p = problem()
    weights = np.zeros((3, 5))
    weights[0] = [0.5, 0.0, 0.0, 0.0, 0.5]  # half rejected: the mesh serves it locally
    weights[1] = [0.0, 1.0, 0.0, 0.0, 0.0]  # edge-1 sends all to its first neighbour, edge-0
    weights[2] = [0.0, 0.0, 0.0, 0.0, 1.0]  # all rejected: stays local
    table = decision_table(p, weights, min_weight=5)["fn"]
    assert table["edge-0"] == {"edge-0": 90, "edge-1": 5, "edge-2": 5}
    assert table["edge-1"] == {"edge-1": 5, "edge-0": 90, "edge-2": 5}
    assert table["edge-2"]["edge-2"] == 90
    with pytest.raises(ValueError, match="not a distribution"):
        decision_table(p, np.full((3, 5), np.nan), 0)


def test_the_routing_in_place_reads_back_as_the_action_it_was_written_from():
    p = problem()
    rng = np.random.default_rng(0)
    mask = np.zeros((3, 5), bool)
    for agent, node in enumerate(p.topology.nodes):
        mask[agent, : 1 + len(p.neighbours_of(node))] = True
    weights = rng.dirichlet(np.ones(5), size=3) * mask
    weights /= weights.sum(axis=1, keepdims=True)
    read = table_weights(p, decision_table(p, weights, min_weight=0))
    assert np.allclose(read, weights, atol=0.006)  # whole points of 100, rounded
    # A hand-edited row: a route to a node that is no neighbour is left out; a row with no
    # route of its own keeps everything local.
    table = decision_table(p, weights, min_weight=0)
    table["fn"]["edge-1"] = {"edge-1": 50, "elsewhere": 50}
    table["fn"]["edge-2"] = {}
    read = table_weights(p, table)
    assert read[1, 0] == 1.0 and read[2, 0] == 1.0 and read[2, 1:].sum() == 0


# -- the cycle ---------------------------------------------------------------------------


def test_cycle_applies_bounded_weights_and_reports():
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    report = runtime.cycle("edge/edge-routing", example_policy_body())
    assert report.outcome == Outcome.APPLIED, report.reason
    assert mesh.writes == 1
    for row in report.weights["fn"].values():
        assert sum(row.values()) == 100
        assert all(abs(w - 33) <= 21 for w in row.values())  # from the even split, <= 20 + 1
    assert report.inputs["fn"]["edge-0"].offered_rps == pytest.approx(60)
    assert report.observed_p95_ms["fn"] > 0
    # Too little data for the learned model at first: rollout decides on the queueing prior.
    assert "queueing prior" in report.reason and report.predicted_p95_ms["fn"] > 0
    assert runtime.store.latest("edge/edge-routing") == report


def test_closed_loop_moves_traffic_off_a_degraded_node():
    """The core promise, on the independent queueing fake: after a node loses half its
    capacity, the operator cuts p95 against static equal weights within 5 intervals, by
    more than the trained policy alone would."""
    mesh = example_mesh(load=(50.0, 50.0, 50.0), capacity=(150.0, 100.0, 100.0))
    runtime, _ = runtime_over(mesh)
    body = example_policy_body(safety={"maxWeightChange": 20})
    for _ in range(5):
        runtime.cycle("edge/edge-routing", body)
    mesh.capacity["edge-1"] = 55.0
    static = example_mesh(load=(50.0, 50.0, 50.0), capacity=(150.0, 55.0, 100.0))
    for _ in range(5):
        runtime.cycle("edge/edge-routing", body)
    # About 0.29 of the static p95; the trained policy's own weights, without rollout, 0.65.
    assert mesh.p95_ms("fn") <= 0.4 * static.p95_ms("fn"), (
        mesh.p95_ms("fn"),
        static.p95_ms("fn"),
        mesh.routes["fn"].by_source,
    )


def test_the_hold_fallback_writes_nothing_and_says_so_in_the_status():
    """``hold`` is a fallback that keeps the weights in place: the status must not claim a
    write it did not make."""
    mesh = example_mesh()
    clock = iter(range(1_000, 10_000, 10))
    kube = FakeKube(NODES, SERVICES)
    runtime = Runtime(
        kube, mesh=mesh, reader_for=lambda url: Reader(mesh), clock=lambda: next(clock)
    )
    body = example_policy_body(safety={"failureThreshold": 1, "fallback": "hold"})
    first = runtime.cycle("edge/p", body)
    assert first.outcome == Outcome.APPLIED and first.written == ("fn",)
    stored = status_of(first, None)
    writes = mesh.writes
    mesh.down = True
    held = runtime.cycle("edge/p", body)
    assert held.outcome == Outcome.FALLBACK and held.fallback == "hold" and not held.written
    assert mesh.writes == writes
    status = status_of(held, stored)
    assert status["services"][0]["lastAppliedTime"] == timestamp(first.time) != timestamp(held.time)


def test_metrics_outage_holds_then_falls_back_then_recovers():
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    body = example_policy_body(safety={"failureThreshold": 3, "fallback": "local"})
    first = runtime.cycle("edge/p", body)
    assert first.outcome == Outcome.APPLIED
    applied = mesh.routes["fn"].by_source
    mesh.down = True
    held = [runtime.cycle("edge/p", body) for _ in range(2)]
    assert [r.outcome for r in held] == [Outcome.HELD, Outcome.HELD]
    assert "unreachable" in held[0].reason and mesh.routes["fn"].by_source == applied
    # No reading is reported as this cycle's: the last one's would be stamped with its time.
    assert first.inputs and not any(r.inputs for r in held)
    fallback = runtime.cycle("edge/p", body)
    assert fallback.outcome == Outcome.FALLBACK and fallback.fallback == "local"
    assert mesh.routes["fn"].by_source["edge-0"] == {"edge-0": 100}
    status = status_of(fallback, None)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Fallback"
    assert status["services"][0]["lastAppliedTime"] == timestamp(fallback.time)
    assert conditions["MetricsAvailable"]["status"] == "False"
    assert conditions["Fallback"]["status"] == "True"
    mesh.down = False
    back = runtime.cycle("edge/p", body)
    assert back.outcome == Outcome.APPLIED
    assert runtime.controllers["edge/p"].failures.count == 0


def test_the_decision_histogram_counts_only_cycles_that_decided():
    """marl_operator_decision_seconds is the time a cycle spent deciding. Cycles held, then
    fallen back, because Prometheus is down never decide (no proposal, 0 ms): observed as 0 s
    each, they drag the histogram's quantiles (the dashboard's decision-time panel) to zero
    for as long as the outage lasts, and count decisions that were never made."""
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    body = example_policy_body(safety={"failureThreshold": 3, "fallback": "local"})
    decided = runtime.cycle("edge/p", body)
    assert decided.outcome == Outcome.APPLIED and decided.proposed is not None
    mesh.down = True
    undecided = [runtime.cycle("edge/p", body) for _ in range(3)]
    assert [r.outcome for r in undecided] == [Outcome.HELD, Outcome.HELD, Outcome.FALLBACK]
    assert all(r.proposed is None and r.decision_ms == 0.0 for r in undecided)
    sample = runtime.instruments.registry.get_sample_value
    policy = {"policy": "edge/p"}
    assert sample("marl_operator_cycles_total", {**policy, "outcome": "Held"}) == 2
    assert sample("marl_operator_decision_seconds_count", policy) == 1
    assert sample("marl_operator_decision_seconds_sum", policy) == pytest.approx(
        decided.decision_ms / 1000
    )


@pytest.mark.parametrize(
    ("age_s", "stale_sources", "why"),
    [
        (600.0, set(), "stale for 9 of 9 client/server pairs (loadgen-edge-0, loadgen-edge-1, "
         "loadgen-edge-2): the newest sample is 600 s old"),
        (None, set(), "stale for 9 of 9 client/server pairs (loadgen-edge-0, loadgen-edge-1, "
         "loadgen-edge-2): no sample is current"),
        (0.0, {"edge-0"}, "stale for 3 of 9 client/server pairs (loadgen-edge-0): the newest "
         "sample is 3600 s old"),
        (-600.0, set(), "stale for 9 of 9 client/server pairs (loadgen-edge-0, loadgen-edge-1, "
         "loadgen-edge-2): the newest sample is 600 s ahead of Prometheus's clock"),
    ],
    ids=["behind", "marked-stale", "one-client", "ahead"],
)  # fmt: skip
def test_stale_metrics_hold_the_weights_and_say_why(age_s, stale_sources, why):
    """A rate over the window still answers after its scrapes stopped: samples older than
    staleAfterSeconds, or series Prometheus marked stale, hold the weights as missing
    metrics do, with the field named in the status. One client's stale series are enough:
    left out, that client would read as offering nothing."""
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    body = example_policy_body(safety={"staleAfterSeconds": 300})
    assert runtime.cycle("edge/p", body).outcome == Outcome.APPLIED
    mesh.sample_age_s = 299.0
    assert runtime.cycle("edge/p", body).outcome in (Outcome.APPLIED, Outcome.UNCHANGED)
    applied, writes = mesh.routes["fn"].by_source, mesh.writes
    mesh.sample_age_s, mesh.stale_sources = age_s, stale_sources
    mesh.offered["edge-0"] *= 3  # what the stale rates no longer show
    held = runtime.cycle("edge/p", body)
    assert held.outcome == Outcome.HELD and mesh.routes["fn"].by_source == applied
    assert held.reason.startswith(f"metrics: fn's metrics are {why}")
    assert "spec.safety.staleAfterSeconds is 300" in held.reason
    metrics = condition(held, "MetricsAvailable")
    assert metrics["status"] == "False" and "stale" in metrics["message"]
    assert mesh.writes == writes


def test_the_status_counts_failures_and_shows_the_catch_all_rule():
    """consecutiveFailures is the count the fallback waits for; defaultWeights is the rule
    clients on no edge node follow, as written; the Fallback condition says why none was."""
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    body = example_policy_body(safety={"failureThreshold": 3})
    stored: dict = {}

    def cycle(spec=body) -> dict:
        nonlocal stored
        stored = apply_merge_patch(stored, status_of(runtime.cycle("edge/p", spec), stored))
        return stored

    status = cycle()
    assert status["consecutiveFailures"] == 0
    (service,) = status["services"]
    assert service["defaultWeights"] == dict(mesh.routes["fn"].default)
    assert sum(service["defaultWeights"].values()) == 100
    mesh.down = True
    assert cycle()["consecutiveFailures"] == 1 and cycle()["consecutiveFailures"] == 2
    fallback = next(c for c in stored["conditions"] if c["type"] == "Fallback")
    assert fallback["message"] == "no fallback written: the last cycle ended Held"
    assert stored["services"][0]["defaultWeights"] == service["defaultWeights"]
    mesh.down = False
    assert cycle()["consecutiveFailures"] == 0
    invalid = example_policy_body(safety={"minWeight": 150})
    invalid["metadata"]["generation"] = 2
    status = cycle(invalid)
    assert status["consecutiveFailures"] == 0  # the last valid build's, which holds
    fallback = next(c for c in status["conditions"] if c["type"] == "Fallback")
    assert fallback["message"] == "no fallback written: the last cycle ended Invalid"


def test_rollout_disabled_applies_the_base_policy_alone_every_cycle():
    """spec.rollout.enabled: false runs the trained policy without the learned model or the
    lookahead, and says so; the same mesh with rollout on decides by rollout."""
    for enabled in (False, True):
        mesh = example_mesh()
        runtime, _ = runtime_over(mesh)
        body = example_policy_body(rollout={"enabled": enabled})
        reports = [runtime.cycle("edge/p", body) for _ in range(4)]
        assert all(r.outcome in (Outcome.APPLIED, Outcome.UNCHANGED) for r in reports)
        disabled = [r.fallback == "rollout disabled" for r in reports]
        assert disabled == [not enabled] * 4, [r.reason for r in reports]
        if not enabled:
            assert {r.reason for r in reports} == {"base policy applied (rollout disabled)"}
            assert not any(r.changed_agents for r in reports)


def test_a_fallback_in_the_mesh_stays_a_true_condition_through_cycles_that_write_nothing():
    """After the fallback is written, a suspended or invalid policy changes no route: the
    mesh still carries the fallback, and the condition says so until a decision replaces it."""
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    body = example_policy_body(safety={"failureThreshold": 1, "fallback": "local"})
    stored: dict = {}

    def fallback_after(spec: dict, at: float) -> dict:
        nonlocal stored
        report = dataclasses.replace(runtime.cycle("edge/p", spec), time=at)
        stored = apply_merge_patch(stored, status_of(report, stored))
        return next(c for c in stored["conditions"] if c["type"] == "Fallback")

    mesh.down = True
    fell = fallback_after(body, 1000.0)
    assert fell["status"] == "True" and fell["reason"] == "FailureThreshold"
    writes = mesh.writes
    suspended = example_policy_body(
        suspend=True, safety={"failureThreshold": 1, "fallback": "local"}
    )
    suspended["metadata"]["generation"] = 2
    for at in (2000.0, 3000.0):
        kept = fallback_after(suspended, at)
        assert kept["status"] == "True" and kept["reason"] == "FallbackKept", kept
        assert "the last cycle ended Suspended" in kept["message"]
        assert kept["lastTransitionTime"] == fell["lastTransitionTime"]
    assert mesh.writes == writes
    mesh.down = False
    body["metadata"]["generation"] = 3
    decided = fallback_after(body, 5000.0)
    assert decided["status"] == "False" and decided["message"] == "decisions are being made"


def test_the_status_shows_the_catch_all_rule_the_mesh_carries_not_one_it_refused():
    """A refused write leaves the rule in place: the status says that one. A cycle that read
    no rule (the object deleted) shows none; one that read nothing keeps the last."""
    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)
    runtime.inventory.refresh_s = 0.0
    body = example_policy_body()
    stored: dict = {}

    def cycle(spec=body) -> dict:
        nonlocal stored
        stored = apply_merge_patch(stored, status_of(runtime.cycle("edge/p", spec), stored))
        return stored

    cycle()
    carried = dict(mesh.routes["fn"].default)
    assert carried.get("edge-1", 0) > 0

    def refused(service, routes):
        raise MeshError("admission webhook refused the VirtualService")

    # edge-1 down: the rule that would be written sends nothing there
    kube.cluster_nodes = [
        kubernetes_node(n["metadata"]["name"], n["metadata"]["labels"], "False")
        if n["metadata"]["name"] == "kind-worker2"
        else n
        for n in kube.cluster_nodes
    ]
    writes, mesh.write = mesh.write, refused
    assert cycle()["services"][0]["defaultWeights"] == carried
    mesh.write = writes
    suspended = example_policy_body(suspend=True)
    suspended["metadata"]["generation"] = 2
    del mesh.routes["fn"]  # the user deleted the VirtualService
    assert "defaultWeights" not in cycle(suspended)["services"][0]


def test_a_cycle_that_fails_unexpectedly_keeps_the_failure_count():
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    body = example_policy_body(safety={"failureThreshold": 3})
    runtime.cycle("edge/p", body)
    mesh.down = True
    assert status_of(runtime.cycle("edge/p", body), None)["consecutiveFailures"] == 1
    controller = runtime.controllers["edge/p"]

    def fails():
        raise RuntimeError("the API server dropped the connection")

    controller.cycle = fails
    report = runtime.cycle("edge/p", body)
    assert report.reason.startswith("cycle failed")
    assert status_of(report, None)["consecutiveFailures"] == 1


@pytest.mark.parametrize("after", ["rebuild", "restart"])
def test_failed_intervals_count_on_across_a_rebuild_and_a_restart(after):
    """An outage does not end with an edit of the spec (a rebuild) or a restart of the
    operator (its status says how many intervals failed in a row): counting again from zero
    would hold wrong weights for failureThreshold more intervals before the fallback."""
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    body = example_policy_body(safety={"failureThreshold": 3, "fallback": "local"})
    runtime.cycle("edge/p", body)
    mesh.down = True
    failed = [runtime.cycle("edge/p", body) for _ in range(2)]
    assert [r.outcome for r in failed] == [Outcome.HELD, Outcome.HELD]
    if after == "rebuild":
        body = copy.deepcopy(body)
        body["metadata"]["generation"] += 1
        body["spec"]["intervalSeconds"] = 10
    else:
        runtime, _ = runtime_over(mesh)
        body = {**body, "status": status_of(failed[-1], None)}
    third = runtime.cycle("edge/p", body)
    assert third.outcome == Outcome.FALLBACK, third.reason
    assert "3 failed intervals in a row" in third.reason


def test_a_restart_whose_first_build_fails_keeps_the_failure_count():
    """A held cycle without a controller (the first build after a restart refused by an API
    server's blip) reported no count, and the merge patch then deleted the stored one: the
    next build counted from zero, and the fallback came failureThreshold intervals late."""
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    body = example_policy_body(safety={"failureThreshold": 3, "fallback": "local"})
    stored: dict = {}

    def cycle(runtime) -> CycleReport:
        nonlocal stored
        report = runtime.cycle("edge/p", {**body, "status": stored})
        stored = apply_merge_patch(stored, status_of(report, stored))
        return report

    cycle(runtime)
    mesh.down = True
    assert [cycle(runtime).outcome for _ in range(2)] == [Outcome.HELD, Outcome.HELD]
    assert stored["consecutiveFailures"] == 2

    restarted, kube = runtime_over(mesh)
    edge_nodes = kube.edge_nodes

    def blip():
        kube.edge_nodes = edge_nodes  # once
        raise ApiException(status=500, reason="Internal Server Error")

    kube.edge_nodes = blip
    assert cycle(restarted).outcome == Outcome.HELD  # no controller: the build failed
    assert stored["consecutiveFailures"] == 2  # unknown to it, so left as it was
    third = cycle(restarted)
    assert third.outcome == Outcome.FALLBACK, third.reason


def test_the_stored_status_drops_what_the_last_cycle_no_longer_says():
    """The status goes out as a merge patch, applied to what the API server holds: figures a
    held cycle has none of must go (not stand beside its message), and a service's
    lastAppliedTime must stay until the next write (services is a list, replaced whole)."""
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    body = example_policy_body()
    stored: dict = {}

    def cycle() -> CycleReport:
        nonlocal stored
        report = runtime.cycle("edge/p", body)
        stored = apply_merge_patch(stored, status_of(report, stored))
        return report

    reports = [cycle() for _ in range(8)]
    assert Outcome.UNCHANGED in {r.outcome for r in reports}
    applied = [r for r in reports if r.outcome == Outcome.APPLIED]
    assert applied and reports[-1].outcome == Outcome.UNCHANGED
    mesh.down = True
    assert cycle().outcome == Outcome.HELD
    assert stored["services"][0]["lastAppliedTime"] == timestamp(applied[-1].time)
    assert stored["lastDecision"]["action"] == "hold"
    for gone in ("predictedLatencyMs", "observedLatencyMs"):
        assert gone not in stored["lastDecision"], stored["lastDecision"]
    (crd,) = load_documents(ROOT / "crds" / "routingpolicies.marl.dev.yaml")
    assert CRDValidator(crd).errors({**body, "status": stored}) == []


def test_relative_weights_read_from_the_mesh_are_reported_in_percent():
    """Gateway API weights are relative: a user's HTTPRoute may split 500/500. Held or
    suspended, a policy reports what the mesh carries; in percent, or its status (weights of
    at most 100) would be refused at every cycle. The catch-all rule too: a dry run's status
    was refused for its 900/100."""
    (crd,) = load_documents(ROOT / "crds" / "routingpolicies.marl.dev.yaml")
    nodes = tuple(MeshNode(n) for n in ("edge-0", "edge-1", "edge-2"))
    for body in (example_policy_body(suspend=True), example_policy_body(dryRun=True)):
        mesh = example_mesh()
        runtime, _ = runtime_over(mesh)
        mesh.routes["fn"] = MeshRoutes(
            nodes=nodes,
            by_source={"edge-0": {"edge-0": 500, "edge-1": 500}, "edge-1": {"edge-1": 3}},
            default={"edge-0": 900, "edge-1": 100},
        )
        report = runtime.cycle("edge/p", body)
        assert report.weights["fn"]["edge-0"] == {"edge-0": 50, "edge-1": 50}
        assert report.weights["fn"]["edge-1"] == {"edge-1": 100}
        assert report.catch_all["fn"] == {"edge-0": 90, "edge-1": 10}
        stored = apply_merge_patch({}, status_of(report, {}))
        assert CRDValidator(crd).errors({**body, "status": stored}) == []


def test_a_cycle_reads_the_requests_under_the_services_istio_reports_them_for():
    """An HTTPRoute sends each node's share to that node's Service, which is what Istio's
    metrics then name: the reader is asked for those, not for the EdgeService's name."""
    mesh = example_mesh()
    asked: list[dict] = []

    class RecordingReader(Reader):
        def read(self, **kwargs) -> ServiceReadings:
            asked.append(kwargs)
            return super().read(**kwargs)

    services = [*SERVICES, *example("edgeservice-httproute.yaml")]
    runtime = Runtime(
        FakeKube(NODES, services), mesh=mesh, reader_for=lambda url: RecordingReader(mesh)
    )
    runtime.cycle("edge/p", example_policy_body(services=["fn", "fn-gw"]))
    by_service = {a["service"]: a["destinations"] for a in asked}
    assert by_service == {"fn": "fn", "fn-gw": "fn-gw-edge-0|fn-gw-edge-1|fn-gw-edge-2"}


def test_nodes_whose_clients_report_nothing_are_named_in_the_status():
    """A node no request is reported from is counted as offering none: right for a node
    without clients, wrong for one whose proxies are not scraped. Which it is, the operator
    cannot tell, so MetricsAvailable says which nodes it counted so."""
    mesh = example_mesh()
    quiet: set[str] = set()

    class QuietReader(Reader):
        def read(self, **kwargs) -> ServiceReadings:
            got = super().read(**kwargs)
            kept = {p: v for p, v in got.rate.items() if p[0].removeprefix("loadgen-") not in quiet}
            return dataclasses.replace(got, rate=kept)

    runtime = Runtime(
        FakeKube(NODES, SERVICES), mesh=mesh, reader_for=lambda url: QuietReader(mesh)
    )
    body = example_policy_body()

    def metrics_condition() -> dict:
        return condition(runtime.cycle("edge/p", body), "MetricsAvailable")

    assert metrics_condition()["message"] == "the last cycle read every service's metrics"
    quiet.add("edge-2")
    metrics = metrics_condition()
    assert metrics["status"] == "True"
    assert "no request was reported from the clients of (fn: edge-2)" in metrics["message"]
    assert runtime.store.latest("edge/p").silent == {"fn": ("edge-2",)}


def test_a_query_whose_answer_was_ignored_is_named_in_the_status():
    """A successRate override that dropped the pair labels had every request counted as
    served, while MetricsAvailable said every service's metrics were read (the problem went
    to the log alone)."""
    mesh = example_mesh()
    said = "spec.prometheus.queries.successRate returned 3 series without the labels"

    class BrokenSuccessReader(Reader):
        def read(self, **kwargs) -> ServiceReadings:
            got = super().read(**kwargs)
            return dataclasses.replace(got, success={}, problems={"successRate": said})

    runtime = Runtime(
        FakeKube(NODES, SERVICES), mesh=mesh, reader_for=lambda url: BrokenSuccessReader(mesh)
    )
    report = runtime.cycle("edge/p", example_policy_body())
    metrics = condition(report, "MetricsAvailable")
    assert metrics["status"] == "True"
    assert f"series ignored (fn: {said})" in metrics["message"]
    assert report.query_problems == {"fn": {"successRate": said}}


def test_nodes_serving_requests_without_a_latency_are_named_in_the_status():
    """Requests reach a node but no latency is reported for them (a histogram not scraped,
    a query override that matches nothing): decisions go on from the prior and the other
    nodes' latencies, and MetricsAvailable says which nodes' latency is missing."""
    mesh = example_mesh()
    unmeasured: set[str] = set()

    class PartialReader(Reader):
        def read(self, **kwargs) -> ServiceReadings:
            got = super().read(**kwargs)

            def kept(values):
                return {p: v for p, v in values.items() if p[1].split("-", 1)[1] not in unmeasured}

            return dataclasses.replace(got, mean_ms=kept(got.mean_ms), p95_ms=kept(got.p95_ms))

    runtime = Runtime(
        FakeKube(NODES, SERVICES), mesh=mesh, reader_for=lambda url: PartialReader(mesh)
    )

    def metrics_condition() -> dict:
        return condition(runtime.cycle("edge/p", example_policy_body()), "MetricsAvailable")

    assert metrics_condition()["message"] == "the last cycle read every service's metrics"
    unmeasured.add("edge-1")
    metrics = metrics_condition()
    assert metrics["status"] == "True"
    assert "no latency was reported for the requests served by (fn: edge-1)" in (metrics["message"])
    assert runtime.store.latest("edge/p").unmeasured == {"fn": ("edge-1",)}


def test_dry_run_and_suspend_write_nothing():
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    dry = runtime.cycle("edge/p", example_policy_body(dryRun=True))
    assert dry.outcome == Outcome.DRY_RUN and dry.proposed and mesh.writes == 0
    # Falling back in a dry run decides the fallback and writes it no more than a decision.
    body = example_policy_body(dryRun=True, safety={"failureThreshold": 1, "fallback": "static"})
    body["metadata"]["generation"] = 2
    mesh.down = True
    fallen = runtime.cycle("edge/p", body)
    assert fallen.outcome == Outcome.FALLBACK and mesh.writes == 0
    assert fallen.reason.endswith("fallback static (spec.dryRun: not written)")
    applied = condition(fallen, "WeightsApplied")
    assert (applied["status"], applied["reason"]) == ("False", "DryRun")
    mesh.down = False
    body = example_policy_body(suspend=True)
    body["metadata"]["generation"] = 3
    suspended = runtime.cycle("edge/p", body)
    assert suspended.outcome == Outcome.SUSPENDED and mesh.writes == 0
    # Nothing was read: whether metrics are there is unknown, not "read" nor "missing".
    metrics = condition(suspended, "MetricsAvailable")
    assert (metrics["status"], metrics["reason"]) == ("Unknown", "Suspended")
    assert metrics["message"] == "spec.suspend is true"


def test_invalid_policy_reports_the_field_and_never_writes():
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    report = runtime.cycle("edge/p", example_policy_body(services=["missing"]))
    assert report.outcome == Outcome.INVALID and report.reason.startswith("spec.services")
    report = runtime.cycle("edge/p", example_policy_body(checkpoint={"bundled": "nope"}))
    assert report.outcome == Outcome.INVALID
    assert "spec.checkpoint.bundled" in report.reason and "mesh-10x3" in report.reason
    status = status_of(report, None)
    assert status["phase"] == "Failed"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and "spec.checkpoint.bundled" in ready["message"]
    report = runtime.cycle("edge/p", example_policy_body(checkpoint={"path": "/nowhere/run"}))
    assert report.outcome == Outcome.INVALID
    assert report.reason.startswith("spec.checkpoint.path") and "/nowhere/run" in report.reason
    assert mesh.writes == 0


def test_a_checkpoint_path_outside_the_operators_mount_is_invalid(tmp_path):
    """Any absolute path was copied from: a tenant learned which files exist (the error said
    "Not a directory" or "No such file") and could load a checkpoint mounted for another."""
    mounted = tmp_path / "checkpoints"
    shutil.copytree(checkpoint.BUNDLED / "mesh-10x3", mounted / "run")
    (tmp_path / "other-team").mkdir()
    shutil.copytree(mounted / "run", tmp_path / "other-team" / "run")
    runtime, _ = runtime_over(example_mesh())
    runtime.checkpoint_root = mounted
    for outside in (
        "/etc/passwd",
        str(tmp_path / "other-team" / "run"),
        f"{mounted}/../other-team/run",
    ):
        report = runtime.cycle("edge/p", example_policy_body(checkpoint={"path": outside}))
        assert report.outcome == Outcome.INVALID, outside
        assert report.reason.startswith(f"spec.checkpoint.path: {outside!r} is not under")
    report = runtime.cycle("edge/p", example_policy_body(checkpoint={"path": f"{mounted}/run"}))
    assert report.outcome != Outcome.INVALID, report.reason


def test_an_inventory_no_route_can_be_written_for_is_invalid_not_a_failing_cycle():
    """EdgeNodes edited to share a pod label value: the policy fails naming the field and
    writes nothing, instead of every cycle failing on the mesh's error (held, never the
    fallback) and the policy's deletion with it."""
    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)
    assert runtime.cycle("edge/p", example_policy_body()).outcome == Outcome.APPLIED
    writes = mesh.writes
    kube.nodes = copy.deepcopy(NODES)
    for node in kube.nodes[1:]:
        node["spec"]["podLabelValue"] = "site-x"
    restarted = Runtime(kube, mesh=mesh, reader_for=lambda url: Reader(mesh))
    report = restarted.cycle("edge/p", example_policy_body())
    assert report.outcome == Outcome.INVALID and mesh.writes == writes
    assert report.reason.startswith("EdgeNode edge-2 spec.podLabelValue: 'site-x'")


def test_a_prometheus_the_operator_was_not_allowed_to_query_is_refused():
    """Whoever may create a RoutingPolicy must not make the operator fetch any URL in the
    cluster's network (a cloud metadata address, say): a policy's own spec.prometheus.url
    must be the operator's --prometheus-url or one its admin allowed."""
    mesh = example_mesh()
    queried: list[str] = []

    def reader_for(url: str) -> Reader:
        queried.append(url)
        return Reader(mesh)

    kube = FakeKube(NODES, SERVICES)
    runtime = Runtime(
        kube,
        mesh=mesh,
        reader_for=reader_for,
        prometheus_url="http://prometheus.istio-system.svc:9090",
        allowed_prometheus_urls=("https://metrics.example.com/prometheus/",),
    )
    metadata = "http://169.254.169.254/latest/meta-data/#"
    report = runtime.cycle("edge/p", example_policy_body(prometheus={"url": metadata}))
    assert report.outcome == Outcome.INVALID and queried == [] and mesh.writes == 0
    assert report.reason.startswith("spec.prometheus.url: 'http://169.254.169.254/")
    assert "--allow-prometheus-url" in report.reason and "prometheus.allowedUrls" in report.reason
    for allowed in (
        "https://metrics.example.com/prometheus",
        "http://prometheus.istio-system.svc:9090/",
    ):
        body = example_policy_body(prometheus={"url": allowed})
        body["metadata"]["generation"] = len(queried) + 2
        assert runtime.cycle("edge/p", body).outcome != Outcome.INVALID
    assert queried == [
        "https://metrics.example.com/prometheus",
        "http://prometheus.istio-system.svc:9090/",
    ]


def test_a_damaged_configmap_checkpoint_is_a_condition_naming_the_field(tmp_path):
    """A ConfigMap's checkpoint whose weights file was damaged on its way (one byte of its
    pickle changed, so the zip's checksum fails): the policy is invalid, its status names
    spec.checkpoint.configMap and the damage, and the mesh is not written."""
    directory = tmp_path / "my-policy"
    shutil.copytree(checkpoint.BUNDLED / "mesh-10x3", directory)
    weights = bytearray((directory / "policy.pt").read_bytes())
    first = weights.index(b"PK\x03\x04")  # the first local file header: data.pkl's
    name, extra = (int.from_bytes(weights[first + k : first + k + 2], "little") for k in (26, 28))
    weights[first + 30 + name + extra + 8] ^= 0xFF
    (directory / "policy.pt").write_bytes(bytes(weights))
    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)
    kube.checkpoint_from_configmap = lambda namespace, name, key, into: shutil.copytree(
        directory, into, dirs_exist_ok=True
    )
    body = example_policy_body(checkpoint={"configMap": {"name": "my-policy"}})
    report = runtime.cycle("edge/p", body)
    assert report.outcome == Outcome.INVALID and mesh.writes == 0
    assert report.reason.startswith("spec.checkpoint.configMap")
    assert "damaged archive" in report.reason and "CRC" in report.reason
    ready = condition(report, "Ready")
    assert ready["status"] == "False" and "spec.checkpoint.configMap" in ready["message"]


def test_a_checkpoint_with_an_odd_section_is_invalid_and_its_policy_still_deletes(tmp_path):
    """policy.json's environment, which the operator reads its step from, is no object: the
    policy is invalid naming the field (not a cycle that fails every interval), and deleting
    it gives back what its status names instead of failing for ever."""
    directory = tmp_path / "odd"
    shutil.copytree(checkpoint.BUNDLED / "mesh-10x3", directory)
    meta = json.loads((directory / "policy.json").read_text())
    meta["environment"] = "oops"
    (directory / "policy.json").write_text(json.dumps(meta))
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    body = example_policy_body(checkpoint={"path": str(directory)})
    report = runtime.cycle("edge/p", body)
    assert report.outcome == Outcome.INVALID and mesh.writes == 0
    assert report.reason.startswith("spec.checkpoint") and "'environment'" in report.reason
    assert runtime.delete("edge/p", body) == []  # nothing written, nothing to give back


def test_a_policy_that_cannot_be_built_for_any_reason_gives_back_what_its_status_names():
    """After a restart, the deleted policy is built to find its objects; whatever fails that
    (not only an invalid spec), the objects its status names are given back."""
    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)
    body = example_policy_body()
    report = runtime.cycle("edge/p", body)
    body["status"] = status_of(report, None)
    restored: list[tuple[str, list[tuple[str, str]]]] = []
    mesh.restore_objects = lambda namespace, ref, objects: (
        restored.append((ref, sorted(objects))) or [f"deleted {k}/{n}" for k, n in objects]
    )
    restarted = Runtime(kube, mesh=mesh, reader_for=lambda url: Reader(mesh))

    def unbuildable(key, body):
        raise RuntimeError("the API server went away mid-build")

    restarted.build = unbuildable
    done = restarted.delete("edge/p", body)
    assert restored == [("edge/fn", [("DestinationRule", "fn"), ("VirtualService", "fn")])]
    assert sorted(done) == ["deleted DestinationRule/fn", "deleted VirtualService/fn"]


def retrained(directory: Path) -> Path:
    """``directory`` holding the bundled mesh policy with every weight nudged: another valid
    checkpoint of the same shape, as a retraining would produce."""
    torch = pytest.importorskip("torch")
    shutil.copytree(checkpoint.BUNDLED / "mesh-10x3", directory)
    state = torch.load(directory / "policy.pt", weights_only=True)
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()},
               directory / "policy.pt")  # fmt: skip
    return directory


def test_status_names_the_checkpoint_and_a_changed_configmap_is_read_at_the_next_build(
    tmp_path, monkeypatch
):
    """status.checkpoint says which checkpoint decided (source and the sha256 of policy.pt,
    as sha256sum prints it, valid under the CRD's schema). A ConfigMap changed in place is
    read when the policy is next built (its spec changed), not before; while it is unchanged,
    every build shares the policy already loaded. The ConfigMap's files go to a temporary
    directory that is gone once loaded."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    held = {"dir": checkpoint.BUNDLED / "mesh-10x3"}
    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)
    kube.checkpoint_from_configmap = lambda namespace, name, key, into: shutil.copytree(
        held["dir"], into, dirs_exist_ok=True
    )
    body = example_policy_body(checkpoint={"configMap": {"name": "my-policy"}})

    def sha256(directory: Path) -> str:
        return hashlib.sha256((directory / "policy.pt").read_bytes()).hexdigest()

    first = runtime.cycle("edge/p", body)
    used = {"source": "configMap:my-policy/policy", "sha256": sha256(held["dir"])}
    assert first.checkpoint == used and status_of(first, None)["checkpoint"] == used
    (crd,) = load_documents(ROOT / "crds" / "routingpolicies.marl.dev.yaml")
    stored = apply_merge_patch({}, status_of(first, None))  # as the API server keeps it
    assert CRDValidator(crd).errors({**body, "status": stored}) == []

    def policy_of(key: str):
        return runtime.controllers[key].adapter.rollout.policy

    policy = policy_of("edge/p")
    assert list((tmp_path / "tmp").iterdir()) == []  # the ConfigMap's copy is gone

    held["dir"] = retrained(tmp_path / "retrained")
    assert runtime.cycle("edge/p", body).checkpoint == used  # same spec: not read again
    body["metadata"]["generation"] += 1
    rebuilt = runtime.cycle("edge/p", body)
    assert rebuilt.checkpoint == {**used, "sha256": sha256(held["dir"])} != used
    assert policy_of("edge/p") is not policy
    other = example_policy_body(checkpoint={"configMap": {"name": "my-policy"}})
    runtime.cycle("edge/q", other)  # the same content: the policy already loaded
    assert (
        runtime.controllers["edge/q"].adapter.rollout.policy
        is runtime.controllers["edge/p"].adapter.rollout.policy
    )

    invalid = runtime.cycle("edge/p", example_policy_body(services=["missing"]))
    assert invalid.outcome == Outcome.INVALID
    assert invalid.checkpoint == rebuilt.checkpoint  # the last valid build holds the weights
    never = runtime.cycle("edge/r", example_policy_body(services=["missing"]))
    assert never.checkpoint is None and status_of(never, None)["checkpoint"] is None


@pytest.mark.parametrize(("min_weight", "valid"), [(33, True), (34, False)])
def test_a_min_weight_the_routes_cannot_all_carry_is_invalid(min_weight, valid):
    """Each example node has three routes (itself and two neighbours): 3 x 33 fits in 100
    points, 3 x 34 does not, and must be refused when built, not fail every interval."""
    runtime, _ = runtime_over(example_mesh())
    report = runtime.cycle("edge/p", example_policy_body(safety={"minWeight": min_weight}))
    if valid:
        assert report.outcome == Outcome.APPLIED
        assert all(w >= 33 for row in report.weights["fn"].values() for w in row.values())
    else:
        assert report.outcome == Outcome.INVALID
        assert report.reason.startswith("spec.safety.minWeight: 34 points")
        assert "use at most 33" in report.reason


def test_checkpoints_are_shared_by_content_and_let_go_once_no_policy_runs_them(tmp_path):
    """Rolling checkpoints out under a new ConfigMap name each time (as a configMapGenerator
    does) must not keep every earlier checkpoint loaded for the life of the process: a
    policy nobody runs any more is let go. Two names holding the same bytes share one load."""
    directories = {
        "v1": checkpoint.BUNDLED / "mesh-10x3",
        "v1-copy": checkpoint.BUNDLED / "mesh-10x3",
        "v2": retrained(tmp_path / "v2"),
    }
    runtime, kube = runtime_over(example_mesh())
    kube.checkpoint_from_configmap = lambda namespace, name, key, into: shutil.copytree(
        directories[name], into, dirs_exist_ok=True
    )

    def run(key: str, name: str, generation: int):
        body = example_policy_body(checkpoint={"configMap": {"name": name}})
        body["metadata"]["generation"] = generation
        runtime.cycle(key, body)
        return runtime.controllers[key].adapter.rollout.policy

    first = run("edge/p", "v1", 1)
    assert run("edge/q", "v1-copy", 1) is first  # another name, the same bytes
    old = weakref.ref(first)
    del first
    run("edge/p", "v2", 2)
    run("edge/q", "v2", 2)
    gc.collect()
    assert old() is None  # no policy runs v1 any more: it is not kept
    newest = weakref.ref(runtime.controllers["edge/p"].adapter.rollout.policy)
    for key in ("edge/p", "edge/q"):
        runtime.delete(key, example_policy_body(checkpoint={"configMap": {"name": "v2"}}))
    gc.collect()
    assert newest() is None


def refreshing_runtime(mesh) -> tuple[Runtime, FakeKube, list[float]]:
    """A runtime over ``mesh`` and the example objects, which its inventory reads again once
    ``now[0]`` has moved 10 s."""
    now = [0.0]
    kube = FakeKube(NODES, SERVICES)
    inventory = Inventory(kube, refresh_s=10, clock=lambda: now[0])
    runtime = Runtime(kube, mesh=mesh, reader_for=lambda url: Reader(mesh), inventory=inventory)
    return runtime, kube, now


def test_edited_edge_nodes_and_services_rebuild_the_policy_within_the_refresh():
    """A node removed, a service's target moved: the running policy is built again from
    them once the inventory is read again (at most ``refresh_s`` later), not only after a
    restart; an edit that changes nothing it was built from keeps its controller and model."""
    mesh = example_mesh()
    runtime, kube, now = refreshing_runtime(mesh)
    body = example_policy_body()
    assert runtime.cycle("edge/p", body).outcome == Outcome.APPLIED
    built = runtime.controllers["edge/p"]

    def edited(obj: dict, **spec) -> dict:
        return {**obj, "spec": {**obj["spec"], **spec}}

    kube.nodes = [  # labels and status are not what a policy is built from
        {**n, "metadata": {**n["metadata"], "labels": {"zone": "a"}}, "status": {"x": 1}}
        for n in NODES
    ]
    now[0] += 10
    runtime.cycle("edge/p", body)
    assert runtime.controllers["edge/p"] is built

    kube.nodes = [
        edited(n, neighbours=[nb for nb in n["spec"]["neighbours"] if nb["name"] != "edge-2"])
        for n in NODES
        if n["metadata"]["name"] != "edge-2"
    ]
    now[0] += 5
    runtime.cycle("edge/p", body)
    assert runtime.controllers["edge/p"] is built  # read 5 s ago: not yet seen
    now[0] += 5
    report = runtime.cycle("edge/p", body)
    rebuilt = runtime.controllers["edge/p"]
    assert rebuilt is not built and [n.name for n in rebuilt.problem.nodes] == ["edge-0", "edge-1"]
    assert report.generation == 1 and set(report.weights["fn"]) == {"edge-0", "edge-1"}
    assert all("edge-2" not in row for row in report.weights["fn"].values())

    kube.services = {"fn": edited(SERVICES[0], latencyTargetMs=123)}
    now[0] += 10
    runtime.cycle("edge/p", body)
    assert runtime.controllers["edge/p"].problem.target_ms.tolist() == [123.0]


def test_a_deleted_edge_node_is_routed_around_not_made_invalid():
    """Deleting one EdgeNode that ``spec.nodes.names`` lists made the whole policy Invalid:
    nothing was written any more, and the mesh went on routing to the deleted node. Now the
    policy governs the nodes that exist, the deleted one's share leaves at once, and
    NodesReady names it; only when none of the listed nodes exists is the policy Invalid."""
    mesh = example_mesh()
    runtime, kube, now = refreshing_runtime(mesh)
    body = example_policy_body(nodes={"names": ["edge-0", "edge-1", "edge-2"]})
    assert runtime.cycle("edge/p", body).outcome == Outcome.APPLIED
    assert any(row.get("edge-2", 0) > 0 for row in mesh.routes["fn"].by_source.values())

    kube.nodes = [n for n in NODES if n["metadata"]["name"] != "edge-2"]  # neighbours unedited
    now[0] += 10
    report = runtime.cycle("edge/p", body)

    assert report.outcome == Outcome.APPLIED, report.reason
    assert [n.name for n in runtime.controllers["edge/p"].problem.nodes] == ["edge-0", "edge-1"]
    assert all("edge-2" not in row for row in mesh.routes["fn"].by_source.values())
    assert "edge-2" not in mesh.routes["fn"].default
    assert "no EdgeNode edge-2 (listed in spec.nodes.names)" in report.down["edge-2"]
    nodes_ready = condition(report, "NodesReady")
    assert (
        nodes_ready["status"] == "False" and "edge-2: no EdgeNode edge-2" in nodes_ready["message"]
    )

    def refused():  # the Kubernetes nodes unreadable: the missing one is still named
        raise Forbidden("list", "Node", "", "")

    kube.kubernetes_nodes = refused
    now[0] += 10
    nodes_ready = condition(runtime.cycle("edge/p", body), "NodesReady")
    assert nodes_ready["status"] == "Unknown"
    assert "down all the same: edge-2: no EdgeNode" in nodes_ready["message"]

    kube.nodes = []
    now[0] += 10
    assert runtime.cycle("edge/p", body).outcome == Outcome.INVALID


def test_an_invalid_spec_holds_the_last_weights_and_still_routes_around_a_failed_node():
    """A policy made Invalid (here an EdgeNode's neighbours edited on one side only) dropped
    its controller: nothing was written until the spec was fixed, so a node failing meanwhile
    kept its share of the traffic. The last valid build now holds the weights and moves
    routes off nodes that cannot serve, and the report says why it is Invalid."""
    mesh = example_mesh()
    runtime, kube, now = refreshing_runtime(mesh)
    body = example_policy_body()
    assert runtime.cycle("edge/p", body).outcome == Outcome.APPLIED
    held = mesh.routes["fn"]
    assert any(row.get("edge-1", 0) > 0 for row in held.by_source.values())

    one_way = copy.deepcopy(NODES)  # edge-2 forgets edge-1, which still lists edge-2
    one_way[2]["spec"]["neighbours"] = [{"name": "edge-0", "latencyMs": 12}]
    kube.nodes = one_way
    now[0] += 10
    report = runtime.cycle("edge/p", body)
    assert report.outcome == Outcome.INVALID
    assert "EdgeNode edge-2 spec.neighbours" in report.reason
    assert report.reason.endswith("its last valid spec holds the weights")
    assert mesh.routes["fn"] is held  # nothing to move: nothing written

    node_not_ready(kube)
    now[0] += 10
    report = runtime.cycle("edge/p", body)
    assert report.outcome == Outcome.INVALID
    assert report.reason.endswith("but for routes to nodes that are down (edge-1): moved")
    assert all(row.get("edge-1", 0) == 0 for row in mesh.routes["fn"].by_source.values())
    assert condition(report, "Ready")["status"] == "False"

    kube.nodes = NODES  # fixed: built again, deciding again
    now[0] += 10
    assert runtime.cycle("edge/p", body).outcome in (Outcome.APPLIED, Outcome.UNCHANGED)


def node_not_ready(kube: FakeKube, name: str = "kind-worker2") -> None:
    """Kubernetes node ``name`` (edge-1's in the example) stops being Ready."""
    kube.cluster_nodes = [
        kubernetes_node(name, n["metadata"]["labels"], "False") if n["metadata"]["name"] == name
        else n
        for n in kube.cluster_nodes
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("before", "after"),
    [({}, {"suspend": True}), ({}, {"dryRun": True}), ({"suspend": True}, {})],
)
def test_an_invalid_spec_that_says_hands_off_moves_nothing(before, after):
    """The edit that broke the spec may be the one that said suspend or dry-run, or the
    policy was suspended already: the held build then writes nothing, even off a node that
    went down."""
    mesh = example_mesh()
    runtime, kube, now = refreshing_runtime(mesh)
    runtime.cycle("edge/p", example_policy_body())
    second = example_policy_body(**before)
    second["metadata"]["generation"] = 2
    runtime.cycle("edge/p", second)
    writes = mesh.writes
    broken = example_policy_body(safety={"minWeight": 150}, **after)
    broken["metadata"]["generation"] = 3
    node_not_ready(kube)
    now[0] += 10
    report = runtime.cycle("edge/p", broken)
    assert report.outcome == Outcome.INVALID and mesh.writes == writes, report.reason


def test_an_invalid_policy_holds_no_service_another_policy_now_governs():
    mesh = example_mesh()
    runtime, kube, now = refreshing_runtime(mesh)
    kube.services["fn2"] = renamed("fn2")
    runtime.cycle("edge/p", example_policy_body(services=["fn", "fn2"]))
    fn2 = mesh.routes["fn2"]
    broken = example_policy_body(services=["fn"], safety={"minWeight": 150})
    broken["metadata"]["generation"] = 2
    node_not_ready(kube)
    now[0] += 10
    report = runtime.cycle("edge/p", broken, {"fn": "p", "fn2": "q"})
    assert report.outcome == Outcome.INVALID and "edge/p" not in runtime.controllers
    assert mesh.routes["fn2"] is fn2


def test_an_invalid_policy_leaves_a_deleted_service_and_routes_around_a_deleted_node():
    """Its EdgeService deleted (what makes the spec invalid here) and its objects with it, a
    service is not written again; an EdgeNode deleted in the same stroke is down."""
    mesh = example_mesh()
    runtime, kube, now = refreshing_runtime(mesh)
    kube.services["fn2"] = renamed("fn2")
    body = example_policy_body(
        services=["fn", "fn2"], nodes={"names": ["edge-0", "edge-1", "edge-2"]}
    )
    runtime.cycle("edge/p", body)
    assert any(row.get("edge-2", 0) > 0 for row in mesh.routes["fn"].by_source.values())
    del kube.services["fn2"], mesh.routes["fn2"]
    kube.nodes = [n for n in NODES if n["metadata"]["name"] != "edge-2"]
    now[0] += 10
    report = runtime.cycle("edge/p", body)
    assert report.outcome == Outcome.INVALID and "no EdgeService 'fn2'" in report.reason
    assert "fn2" not in mesh.routes
    assert all(row.get("edge-2", 0) == 0 for row in mesh.routes["fn"].by_source.values())
    assert report.down == {"edge-2": "its EdgeNode was deleted"}


def test_objects_a_rebuilt_policy_no_longer_writes_are_given_back():
    """A service taken out of ``spec.services``, or an EdgeService whose routes moved to
    another VirtualService: the objects the policy stops writing are restored (or deleted)
    when it is built again, not left with its last weights for good; a service another
    policy now governs is that one's."""
    mesh = example_mesh()
    restored: list[tuple[str, str, list[tuple[str, str]]]] = []
    mesh.restore_objects = lambda namespace, ref, objects: (
        restored.append((namespace, ref, sorted(objects)))
        or [f"restored {kind}/{name}" for kind, name in objects]
    )
    kube = FakeKube(NODES, [*SERVICES, renamed("fn2")])
    runtime = Runtime(kube, mesh=mesh, reader_for=lambda url: Reader(mesh))

    def cycle(generation: int, services: list[str], governed_by=None) -> None:
        body = example_policy_body(services=services)
        body["metadata"]["generation"] = generation
        runtime.cycle("edge/p", body, governed_by)

    cycle(1, ["fn", "fn2"])
    assert restored == []
    cycle(2, ["fn"])
    assert restored == [
        ("edge", "edge/fn2", [("DestinationRule", "fn2"), ("VirtualService", "fn2")])
    ]
    restored.clear()
    kube.services["fn"] = renamed("fn", virtualService="fn-routes")
    cycle(3, ["fn"])
    assert restored == [("edge", "edge/fn", [("VirtualService", "fn")])]
    restored.clear()
    cycle(4, ["fn", "fn2"])
    cycle(5, ["fn"], governed_by={"fn": "p", "fn2": "older"})
    assert restored == []


class KeptStatus:
    """Runtimes (one per restart) over one cluster, the policy's status kept between their
    cycles as the API server keeps it."""

    def __init__(self, kube: FakeKube, mesh: QueueingMesh):
        self.kube, self.mesh = kube, mesh
        self.status: dict[str, Any] = {}

    def runtime(self) -> Runtime:
        return Runtime(self.kube, mesh=self.mesh, reader_for=lambda url: Reader(self.mesh))

    def body(self, generation: int = 1, **spec) -> dict[str, Any]:
        body = example_policy_body(**spec)
        body["metadata"]["generation"] = generation
        body["status"] = copy.deepcopy(self.status)
        return body

    def cycle(self, runtime: Runtime, generation: int = 1, **spec) -> CycleReport:
        report = runtime.cycle("edge/p", self.body(generation, **spec))
        self.status = apply_merge_patch(self.status, status_of(report, self.status))
        return report


def test_a_service_dropped_while_no_process_ran_the_policy_is_given_back_on_deletion():
    """The policy wrote fn and fn2; fn2 left spec.services while the operator restarted, and
    the policy was deleted before a cycle ran (kopf starts none for an object being deleted,
    so none would release fn2): fn2's objects, which the status names, are given back too,
    unless another policy governs fn2 by then."""
    mesh = example_mesh()
    restored: list[tuple[str, list[tuple[str, str]]]] = []
    mesh.restore_objects = lambda namespace, ref, objects: restored.append((ref, objects)) or []
    # As KubeMesh has it: the give-back of what a service lives in now, alone.
    mesh.restore = lambda service, nodes: restored.append((service.ref, [])) or []
    kept = KeptStatus(FakeKube(NODES, [*SERVICES, renamed("fn2")]), mesh)
    kept.cycle(kept.runtime(), services=["fn", "fn2"])
    kept.runtime().delete("edge/p", kept.body(2, services=["fn"]), {"fn": "p"})
    assert [ref for ref, _ in restored] == ["edge/fn", "edge/fn2"]
    assert sorted(restored[1][1]) == [("DestinationRule", "fn2"), ("VirtualService", "fn2")]
    restored.clear()
    kept.runtime().delete("edge/p", kept.body(2, services=["fn"]), {"fn": "p", "fn2": "q"})
    assert [ref for ref, _ in restored] == ["edge/fn"]


def test_routes_moved_to_other_objects_are_written_there_before_the_old_ones_go():
    """An EdgeService's ``mesh.destinationRule`` renamed: the old DestinationRule was given
    back (deleted) as the policy was built again, before the new one was written, and the
    VirtualService went on routing to subsets that were gone: 503 for every client until
    a cycle wrote again, for good while metrics were missing. The old objects now go once
    the new ones are written, and the status names them till then (a restart finds them)."""
    mesh = example_mesh()
    events: list[tuple[str, ...]] = []
    write = mesh.write

    def recording_write(service, routes):
        events.append(("write", service.name, service.destination_rule_name))
        return write(service, routes)

    def restore_objects(namespace, ref, objects):
        events.append(("restore", ref, *sorted(f"{kind}/{name}" for kind, name in objects)))
        return [f"restored {kind}/{name}" for kind, name in objects]

    mesh.write, mesh.restore_objects = recording_write, restore_objects
    # As KubeMesh has it: the give-back of what a service lives in now, alone.
    mesh.restore = lambda service, nodes: [events.append(("restore", service.name))]
    kube = FakeKube(NODES, SERVICES)
    kept = KeptStatus(kube, mesh)

    assert kept.cycle(kept.runtime()).outcome == Outcome.APPLIED
    kube.services["fn"] = renamed("fn", destinationRule="fn-subsets")
    mesh.down = True  # no metrics: the rebuilt policy holds, and writes nothing
    events.clear()
    held = kept.runtime()  # a restart, too
    assert kept.cycle(held).outcome == Outcome.HELD
    assert not [e for e in events if e[0] == "restore"], events
    objects = kept.status["services"][0]["meshObjects"]
    assert "DestinationRule/fn" in objects and "DestinationRule/fn-subsets" in objects, objects
    # Deleted meanwhile, by this process or after a restart: the old one goes too, in the
    # same give-back as the new ones, which takes routes away before the subsets they name.
    for deleting in (held, kept.runtime()):
        events.clear()
        deleting.delete("edge/p", kept.body())
        every = ("DestinationRule/fn", "DestinationRule/fn-subsets", "VirtualService/fn")
        assert events == [("restore", "edge/fn", *every)], events

    runtime = kept.runtime()  # and again: the status still names the old one
    mesh.down = False
    events.clear()
    assert kept.cycle(runtime).outcome in (Outcome.APPLIED, Outcome.UNCHANGED)
    assert events[0] == ("write", "fn", "fn-subsets"), events
    assert events[-1] == ("restore", "edge/fn", "DestinationRule/fn"), events
    assert "DestinationRule/fn" not in kept.status["services"][0]["meshObjects"]
    events.clear()
    kept.cycle(runtime)
    assert not [e for e in events if e[0] == "restore"], events


def test_a_node_joining_the_policy_moves_its_clients_by_at_most_max_weight_change():
    """Clients on a node the policy did not govern follow the catch-all rule; their first
    rule of their own was written as decided, however far from the catch-all, where every
    other route steps by at most maxWeightChange."""
    mesh = example_mesh()
    runtime, _, _ = refreshing_runtime(mesh)
    safety = {"maxWeightChange": 2, "minWeightChange": 1}
    two = example_policy_body(nodes={"names": ["edge-0", "edge-1"]}, safety=safety)
    for _ in range(3):
        runtime.cycle("edge/p", two)
    catch_all = routing.as_percentages(mesh.routes["fn"].default)
    three = example_policy_body(nodes={"names": ["edge-0", "edge-1", "edge-2"]}, safety=safety)
    three["metadata"]["generation"] = 2

    report = runtime.cycle("edge/p", three)

    assert report.outcome == Outcome.APPLIED, report.reason
    joined = report.weights["fn"]["edge-2"]
    moved = max(abs(joined.get(n, 0) - catch_all.get(n, 0)) for n in {*joined, *catch_all})
    assert moved <= 2, (catch_all, joined)


def test_an_edge_node_list_the_api_server_fails_still_routes_around_a_down_node():
    """The EdgeNode list failing for a while (a 500 under load) failed every cycle before
    its controller ran: a node going down meanwhile kept its traffic. And a failure's reason
    in the status is the API server's status line, not the answer's headers and body."""
    mesh = example_mesh()
    runtime, kube, now = refreshing_runtime(mesh)
    body = example_policy_body()
    assert runtime.cycle("edge/p", body).outcome == Outcome.APPLIED

    def failing():
        raise ApiException(status=500, reason="Internal Server Error")

    kube.edge_nodes = failing
    node_not_ready(kube)
    for _ in range(2):
        now[0] += 10
        report = runtime.cycle("edge/p", body)
    assert report.outcome == Outcome.APPLIED, report.reason
    assert all(row.get("edge-1", 0) == 0 for row in mesh.routes["fn"].by_source.values())

    body["metadata"]["generation"] = 2  # a build needs the list fresh
    report = runtime.cycle("edge/p", body)
    assert report.outcome == Outcome.HELD
    assert "ApiException: 500 Internal Server Error;" in report.reason


def test_a_dropped_service_the_api_server_will_not_give_back_does_not_stall_the_policy(
    caplog,
):
    """Giving back a dropped service's objects can fail for good (an admission webhook
    refusing the patch, a saved spec that no longer reads): the new spec took over all the
    same, so a node going down is still routed around, instead of every cycle failing on
    the release with the old build frozen in place. The log names what is left to do."""
    mesh = example_mesh()

    def restore_objects(namespace, ref, objects):
        raise RestoreIncomplete([], ["VirtualService/fn2: the API server refused it: denied"])

    mesh.restore_objects = restore_objects
    runtime, kube, now = refreshing_runtime(mesh)
    kube.services["fn2"] = renamed("fn2")
    first = example_policy_body(services=["fn", "fn2"])
    assert runtime.cycle("edge/p", first).outcome == Outcome.APPLIED
    second = example_policy_body(services=["fn"])
    second["metadata"]["generation"] = 2
    node_not_ready(kube)  # edge-1's only Kubernetes node
    now[0] += 10

    caplog.set_level(logging.WARNING, logger="marl_operator.runtime")
    report = runtime.cycle("edge/p", second)

    assert report.generation == 2 and report.outcome == Outcome.APPLIED, report.reason
    assert all(row.get("edge-1", 0) == 0 for row in mesh.routes["fn"].by_source.values())
    assert "VirtualService/fn2: the API server refused it" in caplog.text


def test_a_service_dropped_while_this_process_had_no_controller_is_given_back():
    """The policy's controller is gone when a service leaves its spec (the operator
    restarted, the spec was invalid in between, or the release itself was refused): the
    objects its status still names are given back at the next build all the same."""
    mesh = example_mesh()
    restored: list[tuple[str, list[tuple[str, str]]]] = []
    refuse = [False]

    def restore_objects(namespace, ref, objects):
        if refuse[0]:
            refuse[0] = False
            raise Forbidden("get", "VirtualService", namespace, ref.split("/")[1])
        restored.append((ref, sorted(objects)))
        return [f"restored {kind}/{name}" for kind, name in objects]

    mesh.restore_objects = restore_objects
    kept = KeptStatus(FakeKube(NODES, [*SERVICES, renamed("fn2")]), mesh)

    def cycle(runtime: Runtime, generation: int, services: list[str], **spec) -> CycleReport:
        return kept.cycle(runtime, generation, services=services, **spec)

    new_runtime = kept.runtime
    fn2 = ("edge/fn2", [("DestinationRule", "fn2"), ("VirtualService", "fn2")])
    # Dropped across a restart.
    assert cycle(new_runtime(), 1, ["fn", "fn2"]).outcome == Outcome.APPLIED
    assert cycle(new_runtime(), 2, ["fn"]).outcome in (Outcome.APPLIED, Outcome.UNCHANGED)
    assert restored == [fn2]
    # Dropped across an invalid spec.
    restored.clear()
    runtime = new_runtime()
    assert cycle(runtime, 3, ["fn", "fn2"]).outcome in (Outcome.APPLIED, Outcome.UNCHANGED)
    assert cycle(runtime, 4, ["fn", "fn2"], intervalSeconds=1).outcome == Outcome.INVALID
    assert cycle(runtime, 5, ["fn"]).outcome in (Outcome.APPLIED, Outcome.UNCHANGED)
    assert restored == [fn2]
    # The release refused once: tried again at the next cycle.
    restored.clear()
    assert cycle(runtime, 6, ["fn", "fn2"]).outcome in (Outcome.APPLIED, Outcome.UNCHANGED)
    refuse[0] = True
    assert cycle(runtime, 7, ["fn"]).outcome == Outcome.HELD and restored == []
    assert cycle(runtime, 7, ["fn"]).outcome in (Outcome.APPLIED, Outcome.UNCHANGED)
    assert restored == [fn2]


def test_routes_that_cannot_be_read_are_named_in_the_report():
    """A VirtualService edited beyond recognition (or still routing to an EdgeNode the
    policy no longer governs): the next write replaces it whole, stepped from an even split
    since what it carries is unknown, and the report says so rather than passing the even
    split off as what the mesh carried."""
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    assert "could not be read" not in runtime.cycle("edge/p", example_policy_body()).reason
    unreadable = "VirtualService 'fn' http[2] matches 'edge-9', the label of no known edge node"

    def read(service, nodes):
        raise MeshError(unreadable)

    mesh.read = read
    report = runtime.cycle("edge/p", example_policy_body())
    assert report.outcome in (Outcome.APPLIED, Outcome.UNCHANGED)
    assert f"fn's routes could not be read ({unreadable}): stepped from an even split" in (
        report.reason
    )


def test_restart_changes_nothing_unless_the_decision_does():
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    body = example_policy_body()
    for _ in range(6):
        runtime.cycle("edge/p", body)
    before, writes = mesh.routes["fn"].by_source, mesh.writes
    restarted, _ = runtime_over(mesh)  # a new process: no model, same mesh
    report = restarted.cycle("edge/p", body)
    assert report.outcome == Outcome.UNCHANGED and mesh.writes == writes
    assert mesh.routes["fn"].by_source == before


def test_a_steady_mesh_keeps_its_decision_instead_of_recomputing_it():
    def reasons(tolerance: float) -> list[str]:
        mesh = example_mesh()
        runtime, _ = runtime_over(mesh)
        body = example_policy_body(rollout={"reuseTolerance": tolerance})
        return [runtime.cycle("edge/p", body).reason for _ in range(8)]

    kept = [r for r in reasons(0.05) if r.startswith("previous rollout decision kept")]
    assert kept and "less than 5%" in kept[0]
    # The reason names how long the decision has stood and the model it was computed on
    # (which may have learned more since), not the model as it is now.
    assert kept[0].startswith("previous rollout decision kept for 1 interval:")
    assert "(decided on: " in kept[0]
    assert not any(r.startswith("previous") for r in reasons(0.0))


def test_condition_times_move_only_on_transitions():
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    body = example_policy_body()
    a = status_of(runtime.cycle("edge/p", body), None)
    runtime.clock = lambda: 4_000_000_000.0
    runtime.controllers["edge/p"].clock = runtime.clock
    b = status_of(runtime.cycle("edge/p", body), a)
    ta = {c["type"]: c["lastTransitionTime"] for c in a["conditions"]}
    tb = {c["type"]: c["lastTransitionTime"] for c in b["conditions"]}
    assert ta == tb  # same statuses: times kept
    mesh.down = True
    c = status_of(runtime.cycle("edge/p", body), b)
    tc = {x["type"]: x["lastTransitionTime"] for x in c["conditions"]}
    assert tc["MetricsAvailable"] != tb["MetricsAvailable"] and tc["Suspended"] == tb["Suspended"]


# -- refused writes (403) -------------------------------------------------------------------


class RefusingMesh(QueueingMesh):
    """The queueing mesh behind an API server that refuses ``verb`` on VirtualServices while
    ``refusing`` is set (as the real KubeMesh does: :class:`Forbidden` before any change)."""

    def __init__(self, *args, verb: str = "patch", **kwargs):
        super().__init__(*args, **kwargs)
        self.verb, self.refusing = verb, True

    def read(self, service, nodes):
        if self.refusing and self.verb == "get":
            raise Forbidden("get", "VirtualService", service.namespace, service.name)
        return super().read(service, nodes)

    def write(self, service, routes):
        if self.refusing:
            raise Forbidden(self.verb, "VirtualService", service.namespace, service.name)
        return super().write(service, routes)


def refusing_mesh(verb: str = "patch") -> RefusingMesh:
    base = example_mesh()
    return RefusingMesh(base.offered, base.capacity, base.cores, base.link_ms, verb=verb)


def test_a_fallback_that_cannot_be_written_is_reported_as_held():
    mesh = refusing_mesh()
    runtime, _ = runtime_over(mesh)
    body = example_policy_body(safety={"failureThreshold": 1, "fallback": "local"})
    mesh.down = True
    report = runtime.cycle("edge/p", body)
    assert report.outcome == Outcome.HELD and report.fallback is None
    assert "writing the local fallback failed" in report.reason and not mesh.routes
    conditions = {c["type"]: c for c in status_of(report, None)["conditions"]}
    assert conditions["Fallback"]["status"] == "False"
    mesh.refusing = False
    report = runtime.cycle("edge/p", body)
    assert report.outcome == Outcome.FALLBACK and report.fallback == "local"


def test_a_forbidden_write_becomes_a_condition_not_a_crash():
    mesh = refusing_mesh("patch")
    runtime, _ = runtime_over(mesh)
    body = example_policy_body(safety={"failureThreshold": 2, "fallback": "local"})
    report = runtime.cycle("edge/p", body)
    assert report.outcome == Outcome.HELD and mesh.writes == 0 and not mesh.routes
    for words in ("patch", "virtualservices.networking.istio.io", "namespace edge", "RBAC"):
        assert words in report.forbidden, words
    assert "ClusterRole" in report.forbidden and "meshProvider=istio" in report.forbidden
    status = status_of(report, None)
    applied = next(c for c in status["conditions"] if c["type"] == "WeightsApplied")
    assert applied["status"] == "False" and applied["reason"] == "Forbidden"
    assert applied["message"] == report.forbidden
    assert runtime.store.latest("edge/p").forbidden == report.forbidden  # the API shows it

    # Retried every interval, visibly: each cycle (held, or past failureThreshold falling back
    # to a write that is refused as well) writes nothing and says why.
    for _ in range(3):
        again = runtime.cycle("edge/p", body)
        assert again.outcome in (Outcome.HELD, Outcome.FALLBACK) and not mesh.routes
        assert again.forbidden == report.forbidden
        status = status_of(again, status)
        applied = next(c for c in status["conditions"] if c["type"] == "WeightsApplied")
        assert applied["status"] == "False" and applied["reason"] == "Forbidden"

    mesh.refusing = False  # the rule was granted
    back = runtime.cycle("edge/p", body)
    assert back.outcome == Outcome.APPLIED and back.forbidden is None and mesh.writes == 1
    conditions = status_of(back, status)["conditions"]
    applied = next(c for c in conditions if c["type"] == "WeightsApplied")
    assert applied["status"] == "True" and applied["reason"] == "Written"


def test_writes_that_keep_failing_count_towards_the_fallback():
    """A mesh that refuses every write (an admission webhook, say) fails the interval as a
    metrics outage does: after failureThreshold intervals the fallback is tried."""
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    body = example_policy_body(safety={"failureThreshold": 2, "fallback": "local"})
    mesh.offered["edge-0"] *= 3  # a decision to write
    write = mesh.write

    def refuse(service, routes):
        raise MeshError("admission webhook denied the request")

    mesh.write = refuse
    first = runtime.cycle("edge/p", body)
    assert first.outcome == Outcome.HELD and "(1 more before the fallback)" in first.reason
    second = runtime.cycle("edge/p", body)
    assert second.outcome == Outcome.HELD
    assert "writing the local fallback failed" in second.reason
    mesh.write = write
    assert runtime.cycle("edge/p", body).outcome == Outcome.APPLIED
    mesh.write = refuse  # a written interval starts the count again
    assert "(1 more before the fallback)" in runtime.cycle("edge/p", body).reason


def two_services_refusing(
    refusing: set[str],
) -> tuple[Runtime, QueueingMesh, FakeKube, list[float]]:
    """A runtime over the example mesh with a second service, ``fn2``, beside ``fn``, whose
    writes of the services named in ``refusing`` fail (a 500, a webhook); its inventory reads
    the cluster again once ``now[0]`` has moved 10 s."""
    mesh = example_mesh()
    second = copy.deepcopy(SERVICES[0])
    second["metadata"]["name"] = "fn2"
    second["spec"]["host"] = "fn2.edge.svc.cluster.local"
    second["spec"]["mesh"].update(virtualService="fn2", destinationRule="fn2")
    kube = FakeKube(NODES, [SERVICES[0], second])

    class PartlyRefusing:
        def read(self, service, nodes):
            return mesh.read(service, nodes)

        def write(self, service, routes):
            if service.name in refusing:
                raise MeshError(f"VirtualService edge/{service.name}: 500 Internal Server Error")
            return mesh.write(service, routes)

    now = [0.0]
    clock = iter(range(1_000, 10_000, 10))
    runtime = Runtime(
        kube,
        mesh=PartlyRefusing(),
        reader_for=lambda url: Reader(mesh),
        clock=lambda: next(clock),
        inventory=Inventory(kube, refresh_s=10, clock=lambda: now[0]),
    )
    return runtime, mesh, kube, now


@pytest.mark.parametrize(("refused", "written"), [("fn2", "fn"), ("fn", "fn2")])
def test_a_write_that_fails_part_way_reports_what_the_mesh_carries(refused, written):
    """Of two services, one is refused (a 500, a webhook), whichever comes first: the other
    is written all the same, and the report, and so the status, carries its new weights and
    the refused one's old."""
    refusing: set[str] = set()
    runtime, mesh, _, _ = two_services_refusing(refusing)
    body = example_policy_body(services=["fn", "fn2"])
    first = runtime.cycle("edge/p", body)
    assert first.outcome == Outcome.APPLIED
    stored = status_of(first, None)
    before = {name: mesh.routes[name].by_source for name in ("fn", "fn2")}
    mesh.offered["edge-0"] *= 2.5  # a new decision for both services
    refusing.add(refused)
    report = runtime.cycle("edge/p", body)
    assert report.outcome == Outcome.HELD and "500" in report.reason
    assert f"written all the same: {written}" in report.reason
    assert mesh.routes[written].by_source != before[written]
    assert report.weights[written] == mesh.routes[written].by_source
    assert report.weights[refused] == before[refused] == mesh.routes[refused].by_source
    applied = {s["name"]: s["lastAppliedTime"] for s in status_of(report, stored)["services"]}
    assert applied == {written: timestamp(report.time), refused: timestamp(first.time)}


def test_a_service_that_cannot_be_written_keeps_no_other_on_a_node_that_is_down():
    """The first service's objects are refused for good (not adopted, say) when edge-1's node
    goes down: the second service's routes still leave it at once, in every interval."""
    refusing: set[str] = set()
    runtime, mesh, kube, now = two_services_refusing(refusing)
    body = example_policy_body(services=["fn", "fn2"], safety={"failureThreshold": 2})
    runtime.cycle("edge/p", body)
    assert any(row.get("edge-1", 0) > 0 for row in mesh.routes["fn2"].by_source.values())
    refusing.add("fn")
    node_not_ready(kube)
    for _ in range(3):  # held, then the fallback
        now[0] += 11
        report = runtime.cycle("edge/p", body)
        assert "fn: VirtualService edge/fn: 500" in report.reason
        assert all(row.get("edge-1", 0) == 0 for row in mesh.routes["fn2"].by_source.values())
        assert all(row.get("edge-1", 0) == 0 for row in report.weights["fn2"].values())


def test_a_forbidden_read_is_reported_even_without_a_write():
    mesh = refusing_mesh("get")
    runtime, _ = runtime_over(mesh)
    report = runtime.cycle("edge/p", example_policy_body(dryRun=True))
    assert report.outcome == Outcome.DRY_RUN
    assert report.forbidden.startswith("forbidden: the operator may not get virtualservices")


# -- refused reads while building (403) ------------------------------------------------------


class RefusingKube(FakeKube):
    """The example objects behind an API server that refuses the reads of the kinds in
    ``refusing`` (as the real Kube does: :class:`Forbidden`); ConfigMap checkpoints are the
    bundled mesh-10x3."""

    def __init__(self, *args, refusing=()):
        super().__init__(*args)
        self.refusing = set(refusing)

    def edge_nodes(self):
        if "EdgeNode" in self.refusing:
            raise Forbidden("list", "EdgeNode", "", "")
        return super().edge_nodes()

    def edge_services(self, namespace, names):
        if "EdgeService" in self.refusing:
            raise Forbidden("get", "EdgeService", namespace, names[0])
        return super().edge_services(namespace, names)

    def checkpoint_from_configmap(self, namespace, name, key, into):
        if "ConfigMap" in self.refusing:
            raise Forbidden("get", "ConfigMap", namespace, name)
        shutil.copytree(checkpoint.BUNDLED / "mesh-10x3", into, dirs_exist_ok=True)


def refused_runtime(*refusing: str) -> tuple[Runtime, RefusingKube, QueueingMesh, list[str]]:
    """A runtime over the queueing mesh whose kube refuses ``refusing``; the last value lists
    every mesh read, by service."""
    mesh = example_mesh()
    reads: list[str] = []
    read = mesh.read

    def counted(service, nodes):
        reads.append(service.name)
        return read(service, nodes)

    mesh.read = counted
    kube = RefusingKube(NODES, SERVICES, refusing=refusing)
    return Runtime(kube, mesh=mesh, reader_for=lambda url: Reader(mesh)), kube, mesh, reads


def test_a_forbidden_edge_service_read_holds_the_policy_and_says_what_to_grant():
    """The operator may not get the policy's EdgeService: the cycle is reported (not raised),
    held, with WeightsApplied=False (Forbidden) naming the rule; nothing is read from or
    written to the mesh, no controller is kept, and once the rule is granted the next cycle
    builds the policy and applies its weights."""
    runtime, kube, mesh, reads = refused_runtime("EdgeService")
    body = example_policy_body()
    status = None
    for _ in range(2):  # retried every cycle, refused every time
        report = runtime.cycle("edge/p", body)
        assert report.outcome == Outcome.HELD and report.reason.startswith("forbidden")
        assert "may not get edgeservices.marl.dev in namespace edge (EdgeService fn)" in (
            report.reason
        )
        for words in (
            "forbidden: the operator may not get edgeservices.marl.dev in namespace edge",
            "RBAC rule (apiGroups [marl.dev], resources [edgeservices], verbs [get])",
            "rbac.create=true",
            "watchNamespaces",
        ):
            assert words in report.forbidden, words
        assert mesh.writes == 0 and not mesh.routes and reads == []
        assert "edge/p" not in runtime.controllers
        assert runtime.store.latest("edge/p") == report  # published: the API shows it
        status = status_of(report, status)
        assert status["phase"] == "Holding"
        conditions = {c["type"]: c for c in status["conditions"]}
        applied = conditions["WeightsApplied"]
        assert (applied["status"], applied["reason"]) == ("False", "Forbidden")
        assert applied["message"] == report.forbidden
        assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "Held")
        metrics = conditions["MetricsAvailable"]
        assert (metrics["status"], metrics["reason"]) == ("Unknown", "NotRead")
        assert conditions["Fallback"]["status"] == "False"

    kube.refusing.clear()  # the rule was granted
    back = runtime.cycle("edge/p", body)
    assert back.outcome == Outcome.APPLIED and back.forbidden is None, back.reason
    assert mesh.writes == 1 and mesh.routes and "edge/p" in runtime.controllers
    conditions = {c["type"]: c for c in status_of(back, status)["conditions"]}
    assert (conditions["WeightsApplied"]["status"], conditions["WeightsApplied"]["reason"]) == (
        "True",
        "Written",
    )
    assert conditions["Ready"]["status"] == "True"
    assert conditions["MetricsAvailable"]["status"] == "True"


@pytest.mark.parametrize(
    ("refused", "call", "scope"),
    [
        (
            "EdgeService",
            "get edgeservices.marl.dev in namespace edge (EdgeService fn)",
            "in a Role of each watched namespace (edge must be among them)",
        ),
        (
            "EdgeNode",
            "list edgenodes.marl.dev at the cluster scope",
            "in a ClusterRole (edgenodes are cluster-scoped)",
        ),
        (
            "ConfigMap",
            "get configmaps in namespace edge (ConfigMap my-policy)",
            "in a Role of each watched namespace (edge must be among them)",
        ),
    ],
)
def test_each_refused_read_names_its_rule_and_scope(refused, call, scope):
    runtime, _, mesh, reads = refused_runtime(refused)
    body = example_policy_body(checkpoint={"configMap": {"name": "my-policy"}})
    report = runtime.cycle("edge/p", body)
    assert report.outcome == Outcome.HELD and mesh.writes == 0 and reads == []
    assert report.forbidden.startswith(f"forbidden: the operator may not {call}; ")
    assert scope in report.forbidden and "rbac.create=true" in report.forbidden
    group, resource = {
        "EdgeService": ("marl.dev", "edgeservices"),
        "EdgeNode": ("marl.dev", "edgenodes"),
        "ConfigMap": ('""', "configmaps"),
    }[refused]
    assert f"(apiGroups [{group}], resources [{resource}], verbs [" in report.forbidden
    if refused == "EdgeNode":  # cluster-scoped: no namespace to name or to watch
        assert "namespace edge" not in report.forbidden and "Role of" not in report.forbidden
    conditions = {c["type"]: c for c in status_of(report, None)["conditions"]}
    assert conditions["WeightsApplied"]["message"] == report.forbidden


def test_a_refused_rebuild_keeps_the_weights_last_reported():
    """A new generation whose build is refused: the mesh keeps what the last cycle wrote (the
    report says so, writing nothing), and the old controller is not used any more."""
    runtime, kube, mesh, _ = refused_runtime()
    body = example_policy_body()
    first = runtime.cycle("edge/p", body)
    assert first.outcome == Outcome.APPLIED and mesh.writes == 1
    kube.refusing.add("EdgeNode")
    changed = example_policy_body()
    changed["metadata"]["generation"] = 2
    report = runtime.cycle("edge/p", changed)
    assert report.outcome == Outcome.HELD and report.generation == 2 and mesh.writes == 1
    assert report.weights == first.weights and "edge/p" not in runtime.controllers
    kube.refusing.clear()
    assert runtime.cycle("edge/p", changed).generation == 2
    assert runtime.controllers["edge/p"].generation == 2


def test_a_deleted_policy_leaves_nothing_behind_in_the_runtime():
    """Policies come and go for the life of the process: a deleted one must not leave its
    controller, reports, skip count, lock or term behind."""
    runtime, _ = runtime_over(example_mesh())
    body = example_policy_body()
    runtime.cycle("edge/p", body)
    runtime.skipped["edge/p"] += 1  # as a cycle skipped behind a running one counts it
    runtime.delete("edge/p", body)
    assert "edge/p" not in runtime.controllers and runtime.store.latest("edge/p") is None
    assert "edge/p" not in runtime.skipped and "edge/p" not in runtime._running
    assert "edge/p" not in runtime._terms


def test_a_cycle_that_fails_after_its_policys_deletion_reports_nothing(monkeypatch):
    """A cycle stuck in a mesh read past the deletion's wait, then failing (its read timed
    out): the deleted policy must not come back in the reports."""
    monkeypatch.setattr(runtime_module, "DELETE_WAIT_S", 0.2)
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    body = example_policy_body()
    runtime.cycle("edge/p", body)

    def timed_out(service, nodes):
        raise TimeoutError("read timed out")

    gate, held, _ = hold(mesh, "read", then=timed_out)  # stuck, then timed out
    report, _, _ = retire_during(
        runtime, mesh, body, held, gate, lambda: runtime.delete("edge/p", body)
    )
    assert report is None and runtime.store.latest("edge/p") is None


def hold(obj: Any, name: str, then: Any = None) -> tuple[threading.Event, threading.Event, Any]:
    """Make the calls of ``obj.name`` wait for ``gate`` (``held`` is set once one waits),
    then do what ``then`` does (the original call by default). Returns both events and the
    original (to put back)."""
    gate, held = threading.Event(), threading.Event()
    original = getattr(obj, name)

    def waiting(*args, **kwargs):
        held.set()
        gate.wait(timeout=10)
        return (then or original)(*args, **kwargs)

    setattr(obj, name, waiting)
    return gate, held, original


def retire_during(
    runtime: Runtime,
    mesh: QueueingMesh,
    body: dict[str, Any],
    held: threading.Event,
    gate: threading.Event,
    retire: Any,
) -> tuple[CycleReport | None, int, bool]:
    """Run a cycle of edge/p on a worker; once it waits at ``held``, ``retire()`` the policy
    (delete it, stand down), then let the cycle go. Returns its report, the mesh's writes
    right after the retirement, and whether the cycle was still running then."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        late = pool.submit(runtime.cycle, "edge/p", body)
        assert held.wait(timeout=10)
        retire()
        writes, running = mesh.writes, not late.done()
        gate.set()
        return late.result(timeout=10), writes, running


def test_a_cycle_that_outlasts_the_deletion_writes_nothing_after_it(monkeypatch):
    """A deletion waits DELETE_WAIT_S for a running cycle, then gives the routes back. The
    cycle, when it ends, must neither write them over again nor report for a deleted policy."""
    monkeypatch.setattr(runtime_module, "DELETE_WAIT_S", 0.2)
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    body = example_policy_body()
    assert runtime.cycle("edge/p", body).outcome == Outcome.APPLIED
    gate, held, _ = hold(mesh, "read_metrics")
    del mesh.routes["fn"]  # as given back: the late cycle finds the even split to change
    report, writes, _ = retire_during(
        runtime, mesh, body, held, gate, lambda: runtime.delete("edge/p", body)
    )
    assert report is None  # nobody to tell
    assert mesh.writes == writes and "fn" not in mesh.routes
    assert runtime.store.latest("edge/p") is None


def test_a_deletion_waits_for_a_running_cycle_only_as_long_as_it_is_told():
    """The deletion handler has already waited for the daemon's cycle; the runtime waits
    only for what is left of that one deadline, then restores all the same."""
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    body = example_policy_body()
    assert runtime.cycle("edge/p", body).outcome == Outcome.APPLIED
    gate, held, _ = hold(mesh, "read_metrics")
    report, _, still_running = retire_during(
        runtime, mesh, body, held, gate, lambda: runtime.delete("edge/p", body, wait_s=0.05)
    )
    assert report is None
    assert still_running, "the deletion waited for the cycle past what it was told"
    assert "edge/p" not in runtime.controllers and runtime.store.latest("edge/p") is None
    assert "edge/p" not in runtime._running  # the late cycle let go of its lock, and of it


def test_a_cycle_asked_for_before_the_deletion_and_run_after_it_does_nothing():
    """The daemons' cycles share a few workers: one may still wait for a worker when its
    policy is deleted (the deletion waits for it only so long). Asked for in the policy's
    term, it never runs once the term is over: no write, no controller, no report."""
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    body = example_policy_body()
    term = runtime.term("edge/p")
    assert runtime.cycle("edge/p", body, term=term).outcome == Outcome.APPLIED
    busy = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as worker:
        worker.submit(busy.wait, 10)  # other policies' cycles
        queued = worker.submit(runtime.cycle, "edge/p", body, None, term)
        runtime.delete("edge/p", body)
        del mesh.routes["fn"]  # as given back: a late cycle would find something to write
        writes = mesh.writes
        busy.set()
        assert queued.result(timeout=30) is None
    assert mesh.writes == writes and "fn" not in mesh.routes
    assert "edge/p" not in runtime.controllers and runtime.store.latest("edge/p") is None
    # A policy created again under that name begins a new term, and runs.
    assert runtime.cycle("edge/p", body, term=runtime.term("edge/p")) is not None


def test_a_replica_standing_down_while_a_cycle_builds_keeps_and_writes_nothing():
    """The stand-down comes while a cycle builds the policy (its first cycle, or a spec
    change): the controller built must not be kept, nor write, nor report."""
    mesh = example_mesh()
    runtime, kube = runtime_over(mesh)
    body = example_policy_body()
    assert runtime.cycle("edge/p", body).outcome == Outcome.APPLIED
    changed = example_policy_body()
    changed["metadata"]["generation"] = 2  # the next cycle builds again
    gate, held, _ = hold(kube, "edge_services")  # read while building
    mesh.offered["edge-0"] *= 2.5
    del mesh.routes["fn"]  # something the built controller would write
    report, writes, _ = retire_during(
        runtime, mesh, changed, held, gate, lambda: runtime.stand_down("edge/p")
    )
    assert report is None and mesh.writes == writes and "fn" not in mesh.routes
    assert "edge/p" not in runtime.controllers and runtime.store.latest("edge/p") is None


def test_a_replica_standing_down_writes_and_reports_nothing_more():
    """kopf pauses this replica for a peer while a cycle runs: the cycle must not write over
    the new leader's weights, and the replica must stop serving the policy's report and
    metrics. Leading again later, it builds the policy afresh."""
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    body = example_policy_body()
    assert runtime.cycle("edge/p", body).outcome == Outcome.APPLIED
    assert 'policy="edge/p"' in generate_latest(runtime.instruments.registry).decode()
    gate, held, read = hold(mesh, "read_metrics")
    mesh.offered["edge-0"] *= 2.5  # the late cycle would have a new decision to write
    report, writes, _ = retire_during(
        runtime, mesh, body, held, gate, lambda: runtime.stand_down("edge/p")
    )
    assert report is None
    assert mesh.writes == writes and "edge/p" not in runtime.controllers
    assert runtime.store.latest("edge/p") is None
    assert 'policy="edge/p"' not in generate_latest(runtime.instruments.registry).decode()
    mesh.read_metrics = read
    assert runtime.cycle("edge/p", body).outcome in (Outcome.APPLIED, Outcome.UNCHANGED)
    assert runtime.store.latest("edge/p") is not None


def test_an_unexpected_failure_holds_the_weights_and_says_so(caplog):
    """The API server drops the connection while a built policy reads the mesh (what no
    handler expects): the cycle holds the weights the mesh carries, the status says the cycle
    failed and why (MetricsAvailable Unknown) and keeps naming the checkpoint, the log has the
    traceback, and the next cycle, with the same controller, decides and writes again."""
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    body = example_policy_body()
    first = runtime.cycle("edge/p", body)
    assert first.outcome == Outcome.APPLIED and mesh.writes == 1
    read = mesh.read

    def unreachable(service, nodes):
        raise ConnectionResetError("Connection reset by peer")

    mesh.read = unreachable
    with caplog.at_level(logging.ERROR):
        failed = runtime.cycle("edge/p", body)
    assert failed.outcome == Outcome.HELD and failed.weights == first.weights
    assert failed.reason.startswith("cycle failed: ConnectionResetError: Connection reset by peer")
    assert mesh.writes == 1 and failed.checkpoint == first.checkpoint is not None
    assert any(r.exc_info and "cycle edge/p failed" in r.getMessage() for r in caplog.records)
    conditions = {c["type"]: c for c in status_of(failed, None)["conditions"]}
    assert conditions["Ready"]["status"] == "False"
    assert conditions["MetricsAvailable"]["status"] == "Unknown"
    assert conditions["MetricsAvailable"]["reason"] == "CycleFailed"
    assert runtime.store.latest("edge/p") is failed
    controller = runtime.controllers["edge/p"]  # kept, with its model's window
    mesh.read = read
    assert runtime.cycle("edge/p", body).outcome in (Outcome.APPLIED, Outcome.UNCHANGED)
    assert runtime.controllers["edge/p"] is controller


# -- one cycle per policy at a time ----------------------------------------------------------


class SlowController:
    """Stands in for a PolicyController whose cycle blocks until released."""

    def __init__(self, runtime: Runtime, key: str, generation: int):
        self.key, self.generation = key, generation
        self.mesh = None
        self.releasing: dict[str, list[tuple[str, str]]] = {}  # nothing moved away from
        self.spec = parse_policy_spec(example_policy_body()["spec"])
        self.failures = FailureCounter(self.spec.safety)
        inventory = runtime.inventory  # built from the objects as they are
        self.built_from = fingerprint(
            self.spec, inventory.edge_nodes(), inventory.edge_services("edge", self.spec.services)
        )
        self.entered, self.release = threading.Event(), threading.Event()
        self.active = self.most_active = self.calls = 0
        self.guard = threading.Lock()

    def cycle(self) -> CycleReport:
        with self.guard:
            self.calls += 1
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        self.entered.set()
        self.release.wait(timeout=30)
        with self.guard:
            self.active -= 1
        return CycleReport(self.key, 0.0, self.generation, Outcome.UNCHANGED, "slow cycle")


def test_two_cycles_of_one_policy_never_overlap():
    runtime, _ = runtime_over(example_mesh())
    body = example_policy_body()
    slow = {key: SlowController(runtime, key, 1) for key in ("edge/a", "edge/b")}
    runtime.build = lambda key, body: slow[key]  # type: ignore[method-assign]
    with ThreadPoolExecutor(max_workers=4) as pool:
        first = pool.submit(runtime.cycle, "edge/a", body)
        assert slow["edge/a"].entered.wait(timeout=10)
        # A second cycle of edge/a (a resumed daemon, a timer) while the first one runs: it is
        # skipped at once, not queued behind it; edge/b's cycle runs alongside.
        again = pool.submit(runtime.cycle, "edge/a", body)
        assert again.result(timeout=10) is None
        other = pool.submit(runtime.cycle, "edge/b", body)
        assert slow["edge/b"].entered.wait(timeout=10)
        slow["edge/b"].release.set()
        assert other.result(timeout=10).policy == "edge/b"
        assert not first.done()
        slow["edge/a"].release.set()
        assert first.result(timeout=10).outcome == Outcome.UNCHANGED
    assert slow["edge/a"].calls == 1 and slow["edge/a"].most_active == 1
    assert runtime.skipped == {"edge/a": 1}
    skipped = runtime.instruments.registry.get_sample_value(
        "marl_operator_cycles_skipped_total", {"policy": "edge/a"}
    )
    assert skipped == 1.0
    # Once the running cycle is over, the next one runs again.
    slow["edge/a"].release.set()
    assert runtime.cycle("edge/a", body).outcome == Outcome.UNCHANGED
    assert slow["edge/a"].calls == 2


def test_many_concurrent_cycles_of_one_policy_run_one_at_a_time():
    """Hammering one policy from four workers (the handlers' pool): never two at once, and
    every call either ran or was counted as skipped."""
    runtime, _ = runtime_over(example_mesh())
    slow = SlowController(runtime, "edge/a", 1)
    slow.release.set()  # cycles return at once: overlaps come only from the scheduling
    runtime.build = lambda key, body: slow  # type: ignore[method-assign]
    real_cycle = slow.cycle

    def cycle() -> CycleReport:
        time.sleep(0.002)  # long enough for the other workers to try
        return real_cycle()

    slow.cycle = cycle  # type: ignore[method-assign]
    body = example_policy_body()
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: runtime.cycle("edge/a", body), range(200)))
    ran = [r for r in results if r is not None]
    assert slow.most_active == 1
    assert len(ran) == slow.calls and len(ran) + runtime.skipped["edge/a"] == 200
    assert runtime.skipped["edge/a"] > 0  # the workers did collide


def test_delete_waits_for_the_running_cycle():
    runtime, _ = runtime_over(example_mesh())
    slow = SlowController(runtime, "edge/a", 1)
    runtime.build = lambda key, body: slow  # type: ignore[method-assign]
    order: list[str] = []
    runtime._delete = lambda key, body, others: order.append("restored") or []  # type: ignore[method-assign]
    body = example_policy_body()
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = pool.submit(runtime.cycle, "edge/a", body)
        assert slow.entered.wait(timeout=10)
        deleting = pool.submit(runtime.delete, "edge/a", body)
        time.sleep(0.2)
        assert not deleting.done()  # held until the cycle is over
        order.append("cycle released")
        slow.release.set()
        running.result(timeout=10)
        deleting.result(timeout=10)
    assert order == ["cycle released", "restored"]


def test_a_service_that_cannot_be_given_back_does_not_keep_the_others_from_it():
    """Deleting a two-service policy whose first service's spec is unreadable: the second
    is given back all the same, and the failure carries both what was done and what not."""
    mesh = example_mesh()

    def restore_objects(namespace, ref, objects):
        if ref == "edge/fn":
            raise RestoreIncomplete(["deleted DestinationRule/fn"], ["VirtualService/fn: bad"])
        return [f"deleted VirtualService/{ref.split('/')[1]}"]

    mesh.restore_objects = restore_objects
    runtime = Runtime(
        FakeKube(NODES, [*SERVICES, renamed("fn2")]),
        mesh=mesh,
        reader_for=lambda url: Reader(mesh),
    )
    body = example_policy_body(services=["fn", "fn2"])
    runtime.cycle("edge/p", body)
    with pytest.raises(RestoreIncomplete) as incomplete:
        runtime.delete("edge/p", body)
    assert incomplete.value.done == ["deleted DestinationRule/fn", "deleted VirtualService/fn2"]
    assert incomplete.value.failed == ["VirtualService/fn: bad"]


def test_a_node_whose_capacity_is_given_in_cpu_alone_is_not_a_node_of_no_capacity():
    """An EdgeNode may give capacity.requestsPerSecond, capacity.cpu or both. edge-1 gives
    its 200m alone, beside nodes that serve 500 requests a second per core: taken as 0.2
    requests a second, the static fallback sent it nothing, not even its own clients', and
    the observer saw a node of almost no capacity until its CPU was measured (never, while it
    serves under a request a second)."""
    mixed = copy.deepcopy(NODES)
    del mixed[1]["spec"]["capacity"]["requestsPerSecond"]
    parsed = parse_policy_spec(example_policy_body()["spec"])
    p = build_problem(parsed, mixed, {"fn": SERVICES[0]}, 3)
    static = fallback_table("static", p, 0)["fn"]
    assert static["edge-1"]["edge-1"] >= 20 and static["edge-0"]["edge-1"] >= 20, static
    idle = {
        "fn": ServiceReadings(
            "fn",
            rate={("loadgen-edge-0", "fn-edge-0"): 60.0, ("loadgen-edge-1", "fn-edge-1"): 0.5},
            mean_ms={("loadgen-edge-0", "fn-edge-0"): 20.0, ("loadgen-edge-1", "fn-edge-1"): 5.0},
        )
    }
    tel = Observer(p).telemetry(idle)
    assert tel.capacity[1] >= 20, tel.capacity
    # Nodes in requests per second beside one in cores, and none giving both: no conversion.
    apart = copy.deepcopy(mixed)
    for node in (apart[0], apart[2]):
        del node["spec"]["capacity"]["cpu"]
    with pytest.raises(SpecError, match=r"^EdgeNode edge-1 spec\.capacity\.requestsPerSecond"):
        build_problem(parsed, apart, {"fn": SERVICES[0]}, 3)


def test_a_node_without_capacity_beside_nodes_that_give_theirs_is_refused_by_name():
    """The CRD leaves spec.capacity optional. Beside nodes in requests per second such a node's
    hint was NaN, and every cycle failed on it (the static fallback too); beside nodes in cpu
    it counted as one whole core among millicores. Nodes that all leave it out are equal."""
    parsed = parse_policy_spec(example_policy_body()["spec"])
    for kept in ("requestsPerSecond", "cpu"):
        nodes = copy.deepcopy(NODES)
        for node in nodes:
            node["spec"]["capacity"] = {kept: node["spec"]["capacity"][kept]}
        del nodes[2]["spec"]["capacity"]
        with pytest.raises(SpecError, match=r"^EdgeNode edge-2 spec\.capacity: is needed"):
            build_problem(parsed, nodes, {"fn": SERVICES[0]}, 3)
    for node in nodes:
        node["spec"].pop("capacity", None)
    p = build_problem(parsed, nodes, {"fn": SERVICES[0]}, 3)
    assert list(p.capacity_rps) == [1.0, 1.0, 1.0]


def test_routes_no_cycle_could_write_or_measure_make_the_policy_invalid_at_once():
    """Each was Applied, or failed every cycle with the fallback tried: a pod label value no
    workload's name ends in (the node read as idle however busy), two services of one host
    (one's weights did nothing), and a Gateway API policy over 16 nodes (an HTTPRoute holds
    16 rules: one per node's clients and the catch-all)."""
    parsed = parse_policy_spec(example_policy_body()["spec"])
    labelled = copy.deepcopy(NODES)
    labelled[2]["spec"]["podLabelValue"] = "Site_2"
    with pytest.raises(SpecError, match=r"^EdgeNode edge-2 spec\.podLabelValue: 'Site_2' cannot"):
        build_problem(parsed, labelled, {"fn": SERVICES[0]}, 3)
    twin = {
        **renamed("fn2"),
        "spec": {**renamed("fn2")["spec"], "host": SERVICES[0]["spec"]["host"]},
    }
    two = parse_policy_spec(example_policy_body(services=["fn", "fn2"])["spec"])
    with pytest.raises(SpecError, match=r"^spec\.services: EdgeServices 'fn' and 'fn2' both route"):
        build_problem(two, NODES, {"fn": SERVICES[0], "fn2": twin}, 3)
    assert build_problem(two, NODES, {"fn": SERVICES[0], "fn2": renamed("fn2")}, 3)
    gateway = example("edgeservice-httproute.yaml")[0]
    many = [{"metadata": {"name": f"e{i}"}, "spec": {"nodeNames": [f"k{i}"]}} for i in range(16)]
    wide = parse_policy_spec(example_policy_body(services=["fn-gw"], nodes={})["spec"])
    with pytest.raises(SpecError, match="16 source edge nodes need 17 HTTPRoute rules"):
        build_problem(wide, many, {"fn-gw": gateway}, 3)
    assert build_problem(wide, many[:15], {"fn-gw": gateway}, 3)


def test_a_link_declared_with_two_latencies_is_refused_naming_both():
    """edge-0 said 5 ms to edge-1 and edge-1 said 80 ms back: the one first by name won,
    without a word, and the other declaration did nothing."""
    nodes = copy.deepcopy(NODES)
    for nb in nodes[0]["spec"]["neighbours"]:
        nb["latencyMs"] = 5
    for nb in nodes[1]["spec"]["neighbours"]:
        nb["latencyMs"] = 80 if nb["name"] == "edge-0" else nb.get("latencyMs", 0)
    parsed = parse_policy_spec(example_policy_body()["spec"])
    with pytest.raises(
        SpecError,
        match=r"^EdgeNode edge-1 spec\.neighbours: gives the link to edge-0 latencyMs 80, "
        "and edge-0 gives it 5",
    ):
        build_problem(parsed, nodes, {"fn": SERVICES[0]}, 3)


def test_a_policys_own_queries_run_only_where_the_operator_allows_them():
    """A policy's PromQL runs with the operator's Prometheus credentials: it read another
    team's metrics, which MetricsAvailable then quoted, by whoever may create a policy."""
    body = example_policy_body(prometheus={"queries": {"successRate": "my_success{}"}})
    runtime, _ = runtime_over(example_mesh())
    report = runtime.cycle("edge/p", body)
    assert report.outcome == Outcome.INVALID
    assert report.reason.startswith("spec.prometheus.queries.successRate: this operator runs no")
    assert "--allow-query-overrides" in report.reason
    runtime.allow_query_overrides = True
    assert runtime.cycle("edge/p", body).outcome != Outcome.INVALID


def test_the_learned_models_queue_grows_over_the_policys_interval():
    """The model learns around a fluid queue that grows or drains over one interval: over
    the default 5 s, a policy deciding every 30 s would learn its long queues as surprises."""
    mesh = example_mesh()
    runtime, _ = runtime_over(mesh)
    runtime.cycle("edge/p", example_policy_body(intervalSeconds=30))
    assert runtime.controllers["edge/p"].adapter.model.interval_s == 30


def test_requests_served_by_a_workload_named_for_no_edge_node_are_named_in_the_status():
    """edge-2's server Deployment renamed off the convention (fn-edge-2-v2): its pods still
    carry the node label, so the routes still send it requests, but no edge node is found in
    its name. Its requests, latency and CPU were dropped without a word: edge-2 read as idle
    (incoming 0, no latency), and MetricsAvailable said every service's metrics were read."""
    mesh = example_mesh()

    def moved(values):
        return {(s, "fn-edge-2-v2" if d == "fn-edge-2" else d): v for (s, d), v in values.items()}

    class RenamingReader(Reader):
        def read(self, **kwargs) -> ServiceReadings:
            got = super().read(**kwargs)
            return dataclasses.replace(
                got,
                rate=moved(got.rate),
                success=moved(got.success),
                mean_ms=moved(got.mean_ms),
                p95_ms=moved(got.p95_ms),
                age_s=moved(got.age_s),
                cpu_cores={
                    "fn-edge-2-v2" if w == "fn-edge-2" else w: c for w, c in got.cpu_cores.items()
                },
            )

    runtime = Runtime(
        FakeKube(NODES, SERVICES), mesh=mesh, reader_for=lambda url: RenamingReader(mesh)
    )
    report = runtime.cycle("edge/p", example_policy_body())
    assert mesh.node_latency_ms("fn")["edge-2"][0] > 20  # requests/s edge-2 does serve
    assert report.inputs["fn"]["edge-2"].incoming_rps == 0.0  # what the operator saw
    metrics = condition(report, "MetricsAvailable")
    assert "fn-edge-2-v2" in metrics["message"], metrics["message"]


def test_series_a_template_had_ignored_are_named_where_their_values_are_missed():
    """A sampleAge override that does not aggregate by pair leaves every pair without an age:
    the hold blamed scrapes and staleAfterSeconds, where the template is what to fix; a
    requestRate override that drops the pair labels reads as no request rate at all."""
    mesh = example_mesh()
    problems = {
        "sampleAge": "spec.prometheus.queries.sampleAge returned several series for 3 keys; "
        "they are ignored (aggregate by source_workload, destination_workload)",
        "requestRate": "spec.prometheus.queries.requestRate returned 3 series without the "
        "labels source_workload, destination_workload; they are ignored (keep those labels "
        "in the template)",
    }

    class Ignoring(Reader):
        def __init__(self, mesh, name: str):
            super().__init__(mesh)
            self.name = name

        def read(self, **kwargs) -> ServiceReadings:
            got = super().read(**kwargs)
            lost = {"age_s": {}} if self.name == "sampleAge" else {"rate": {}}
            return dataclasses.replace(got, problems={self.name: problems[self.name]}, **lost)

    for name in problems:
        kube = FakeKube(NODES, SERVICES)
        runtime = Runtime(kube, mesh=mesh, reader_for=lambda url, n=name: Ignoring(mesh, n))
        report = runtime.cycle("edge/p", example_policy_body())
        assert report.outcome == Outcome.HELD and problems[name] in report.reason, report.reason


def test_a_service_only_clients_on_no_edge_node_call_is_served_work_not_missing_metrics():
    """An ingress gateway is on no edge node: a service only it calls has no requests between
    edge nodes, which read as metrics missing for the whole policy. No agent routes those
    requests, but its nodes serve them and spend CPU on them, as when edge clients send them;
    series whose servers are on no edge node either still name the misconfiguration."""
    p = two_services()
    names = ("edge-0", "edge-1", "edge-2")
    pairs = [("istio-ingressgateway", f"heavy-{n}") for n in names]
    gateway = ServiceReadings(
        "heavy",
        rate=dict.fromkeys(pairs, 10.0),
        success=dict.fromkeys(pairs, 1.0),
        mean_ms=dict.fromkeys(pairs, 20.0),
        cpu_cores={f"heavy-{n}": 10.0 * 100.0 / 1000.0 for n in names},
    )
    fn = local_readings("fn", (40.0, 30.0, 20.0), 20.0)
    tel = Observer(p, capacity_alpha=1.0).telemetry({"fn": fn, "heavy": gateway})
    np.testing.assert_allclose(tel.offered[:, 1], 0.0)
    edge_clients = {"fn": fn, "heavy": local_readings("heavy", (10.0, 10.0, 10.0), 100.0)}
    called = Observer(p, capacity_alpha=1.0).telemetry(edge_clients)
    np.testing.assert_allclose(tel.capacity, called.capacity)
    np.testing.assert_allclose(tel.work, called.work)
    nowhere = ServiceReadings("heavy", rate={("istio-ingressgateway", "heavy-cloud"): 5.0})
    with pytest.raises(InsufficientData, match="no series of service heavy names an edge"):
        Observer(p).telemetry({"fn": fn, "heavy": nowhere})


def test_a_service_no_client_has_called_yet_does_not_stop_the_decisions_of_the_others():
    """Istio has no series for a pair until its first request: a second service of the
    policy that no client has called since its proxies started read as "no request rate
    reported", which held every service's weights and, after failureThreshold, wrote the
    fallback over the busy service's routes, while a node whose clients report nothing is
    counted as offering none and decisions go on."""
    mesh = example_mesh()

    class OneIdle(Reader):
        def read(self, **kwargs) -> ServiceReadings:
            if kwargs["service"] == "heavy":
                return ServiceReadings("heavy")
            return super().read(**kwargs)

    kube = FakeKube(NODES, [*SERVICES, renamed("heavy")])
    runtime = Runtime(kube, mesh=mesh, reader_for=lambda url: OneIdle(mesh))
    body = example_policy_body(
        services=["fn", "heavy"], safety={"failureThreshold": 2, "fallback": "local"}
    )
    reports = [runtime.cycle("edge/p", body) for _ in range(3)]
    decided = (Outcome.APPLIED, Outcome.UNCHANGED)
    assert all(r.outcome in decided for r in reports), [(r.outcome, r.reason) for r in reports]
    assert mesh.routes["fn"].by_source["edge-0"] != {"edge-0": 100}
    metrics = condition(reports[-1], "MetricsAvailable")
    assert "heavy: edge-0, edge-1, edge-2" in metrics["message"], metrics["message"]


def test_a_cycle_held_before_it_read_any_metrics_does_not_say_it_read_them():
    """Every edge node down: the cycle holds before it asks Prometheus. MetricsAvailable
    said True, "the last cycle read every service's metrics", and the report carried the
    last read's silent, unmeasured and no-upstream nodes as this cycle's."""
    mesh = example_mesh()
    runtime, kube, now = refreshing_runtime(mesh)
    body = example_policy_body()
    assert runtime.cycle("edge/p", body).outcome == Outcome.APPLIED
    for name in ("kind-worker", "kind-worker2", "kind-worker3"):
        node_not_ready(kube, name)
    now[0] += 10
    held = runtime.cycle("edge/p", body)
    assert held.outcome == Outcome.HELD and "no edge node of the policy is up" in held.reason
    metrics = condition(held, "MetricsAvailable")
    assert metrics["status"] == "Unknown", metrics
    assert (
        metrics["reason"] == "NotRead" and "no edge node of the policy is up" in metrics["message"]
    )
    assert not held.metrics_read and held.silent == {}
