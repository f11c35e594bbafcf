"""The simulated data plane (demo/dataplane/): built from the example custom resources, it
routes requests by the weights it is given, exports Istio-style metrics that agree with its
own ground truth, and shows the property the closed-loop test relies on: after a node loses
half its capacity, static equal weights make p95 explode and weights that move traffic away
bring it back down."""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kube_schema import load_documents
from kubernetes.client.exceptions import ApiException
from marl_operator.mesh import routing
from marl_operator.mesh.istio import IstioWriter
from marl_operator.observer import Observer
from marl_operator.problem import build_problem
from marl_operator.prometheus import ServiceReadings
from marl_operator.spec import parse_policy_spec
from operator_fakes import example_policy_body
from prometheus_client.parser import text_string_to_metric_families

from demo import dataplane
from demo.dataplane import DataPlane, RouteFollower
from simulator.env import EdgeEnv

ROOT = Path(__file__).resolve().parents[1]
EDGE_NODES = load_documents(ROOT / "examples" / "edgenodes.yaml")
EDGE_SERVICES = load_documents(ROOT / "examples" / "edgeservice.yaml")
NODES = ("edge-0", "edge-1", "edge-2")

RECOMMENDED_LOAD = dict.fromkeys(NODES, 40.0)
"""The closed loop's load: equal weights give every node 40 req/s, which edge-2 (60 req/s)
carries before, and not after, it loses half its capacity."""


def example_plane(load: Mapping[str, Any] | None = None, seed: int = 0, **kw: Any) -> DataPlane:
    return DataPlane(EDGE_NODES, EDGE_SERVICES, load or RECOMMENDED_LOAD, seed=seed, **kw)


def samples(text: bytes) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, keyed by sample name and label set."""
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def pair_totals(dp: DataPlane, name: str, code: str = "200") -> dict[tuple[str, str], float]:
    """``name`` summed by (source workload, destination workload) for one response code."""
    totals: dict[tuple[str, str], float] = {}
    for (sample, labels), value in samples(dp.metrics_text()).items():
        lab = dict(labels)
        if sample == name and lab["response_code"] == code:
            key = (lab["source_workload"], lab["destination_workload"])
            totals[key] = totals.get(key, 0.0) + value
    return totals


def capacity_weights(dp: DataPlane) -> dict[str, dict[str, int]]:
    """Every source sends in proportion to the nodes' current capacity (a good routing)."""
    capacity = dp.capacity()
    row = routing.integer_weights(capacity)
    return {source: {n: w for n, w in row.items() if w > 0} for source in capacity}


def line_nodes() -> list[dict[str, Any]]:
    """a - b - c, with pod labels other than the names; c forgets to list b (asymmetric)."""

    def node(name: str, label: str, neighbours: list[tuple[str, float]]) -> dict[str, Any]:
        return {
            "apiVersion": "marl.dev/v1alpha1",
            "kind": "EdgeNode",
            "metadata": {"name": name},
            "spec": {
                "nodeNames": [f"k-{name}"],
                "podLabelValue": label,
                "neighbours": [{"name": n, "latencyMs": ms} for n, ms in neighbours],
                "capacity": {"requestsPerSecond": 50, "cpu": "500m"},
            },
        }

    return [
        node("a", "site-a", [("b", 3)]),
        node("b", "site-b", [("a", 3), ("c", 4)]),
        node("c", "site-c", []),
    ]


# --------------------------------------------------------------------------------------------
# Building the scenario


def test_scenario_comes_from_the_custom_resources():
    dp = example_plane()
    scenario = dp.env.scenario
    assert [n.cpu for n in scenario.nodes] == [150.0, 100.0, 60.0]
    assert [n.queue_capacity for n in scenario.nodes] == [1500, 1000, 600]
    assert {tuple(sorted(k)): v for k, v in scenario.links_ms.items()} == {
        ("edge-0", "edge-1"): 5.0,
        ("edge-0", "edge-2"): 12.0,
        ("edge-1", "edge-2"): 8.0,
    }
    assert dp.neighbours == {
        "edge-0": ["edge-1", "edge-2"],
        "edge-1": ["edge-0", "edge-2"],
        "edge-2": ["edge-0", "edge-1"],
    }
    assert [n.cores for n in dp.nodes] == [0.3, 0.2, 0.12]
    uncounted = {
        **EDGE_NODES[2],
        "spec": {**EDGE_NODES[2]["spec"], "capacity": {"requestsPerSecond": 60}},
    }
    assert dataplane.EdgeNodeSpec.from_object(uncounted).cores == dataplane.DEFAULT_CORES
    assert scenario.service_names == ["fn"] and scenario.services[0].latency_target_ms == 200
    assert scenario.services[0].mean_cpu == pytest.approx(1.0)  # one request, one unit of work


def test_one_sided_links_are_used_both_ways(caplog):
    dp = DataPlane(line_nodes(), EDGE_SERVICES, {"a": 10}, seed=0)
    assert dp.neighbours == {"a": ["b"], "b": ["a", "c"], "c": ["b"]}
    assert "link made symmetric" in caplog.text


def test_quantities_and_load_parsing():
    assert dataplane.cpu_cores("2500m") == 2.5
    assert dataplane.cpu_cores(2) == 2.0
    assert dataplane.cpu_cores("0.5") == 0.5
    for bad in ("abc", "0", "-1"):
        with pytest.raises(ValueError):
            dataplane.cpu_cores(bad)
    assert dataplane.parse_load("edge-0=40, edge-1=12.5") == {"edge-0": 40.0, "edge-1": 12.5}
    assert dataplane.parse_load("fn/edge-0=3") == {"fn": {"edge-0": 3.0}}
    for bad in ("edge-0", "edge-0=-1", "edge-0=x", "edge-0=1,fn/edge-1=2"):
        with pytest.raises(ValueError):
            dataplane.parse_load(bad)
    with pytest.raises(ValueError, match="edge-9"):
        example_plane({"edge-9": 10})
    assert dataplane.parse_work("fn=1, heavy=5") == {"fn": 1.0, "heavy": 5.0}
    for bad in ("fn", "fn=0", "fn=-1", "fn=x", "=2"):
        with pytest.raises(ValueError, match="--work"):
            dataplane.parse_work(bad)
    with pytest.raises(ValueError, match="heavy"):
        example_plane(work={"heavy": 5.0})
    with pytest.raises(ValueError, match="work of fn"):
        example_plane(work={"fn": 0.0})


# --------------------------------------------------------------------------------------------
# Routing and metrics


def test_equal_weights_split_the_offered_load():
    dp = example_plane(seed=0)
    assert dp.route_origin("fn") == "equal"
    dp.run(300)
    rates = pair_totals(dp, "istio_requests_total")
    assert len(rates) == 9  # every node sends to itself and both neighbours
    for (source, dest), count in rates.items():
        assert source.startswith("loadgen-edge-") and dest.startswith("fn-edge-")
        # 40 req/s x 300 s / 3: Poisson with sd about 63, so 4 sd is 250.
        assert count == pytest.approx(4000, abs=250), (source, dest)
    assert pair_totals(dp, "istio_requests_total", "503") == {}


def test_set_routes_moves_the_requests():
    dp = example_plane(seed=1)
    weights = {"edge-0": 70, "edge-1": 20, "edge-2": 10}
    assert dp.set_routes("fn", {"edge-0": weights}) == []
    dp.run(300)
    rates = pair_totals(dp, "istio_requests_total")
    for dest, w in weights.items():
        expected = 40 * 300 * w / 100
        assert rates[("loadgen-edge-0", f"fn-{dest}")] == pytest.approx(
            expected, abs=4 * np.sqrt(expected)
        )
    # The other sources had no rule and no catch-all: equal weights.
    assert rates[("loadgen-edge-1", "fn-edge-2")] == pytest.approx(4000, abs=250)


def check_histograms(exposition: dict[tuple[str, frozenset], float]) -> tuple[float, float]:
    """Every request series has a histogram with Istio's buckets, cumulative, whose count is
    the series' value; returns the total count and sum of the 200 series."""
    hist = "istio_request_duration_milliseconds"
    total_count = total_sum = 0.0
    for (name, labels), value in exposition.items():
        if name != "istio_requests_total":
            continue
        assert exposition[(f"{hist}_count", labels)] == value
        buckets = sorted(
            (float(dict(lab)["le"]), v)
            for (n, lab), v in exposition.items()
            if n == f"{hist}_bucket" and frozenset(kv for kv in lab if kv[0] != "le") == labels
        )
        assert [le for le, _ in buckets] == [*dataplane.ISTIO_BUCKETS_MS, float("inf")]
        assert buckets[-1][1] == value
        assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
        if dict(labels)["response_code"] == "200":
            total_count += value
            total_sum += exposition[(f"{hist}_sum", labels)]
    return total_count, total_sum


def test_histograms_agree_with_counters_and_truth():
    dp = example_plane(seed=2)
    dp.run(300)
    total_count, total_sum = check_histograms(samples(dp.metrics_text()))
    assert total_count == pytest.approx(120 * 300, rel=0.03)
    assert total_sum / total_count == pytest.approx(dp.mean_ms("fn", 300), rel=0.05)
    assert 5 < dp.mean_ms("fn", 300) < dp.p95_ms("fn", 300) < 200


def test_metrics_parse_and_counters_only_grow():
    dp = example_plane(seed=3)
    dp.run(30)
    first = samples(dp.metrics_text())
    dp.degrade("edge-2", 0.5)  # 503s appear: new series, and every old one keeps growing
    dp.run(120)
    second = samples(dp.metrics_text())
    assert set(first) < set(second)
    for key, value in first.items():
        assert second[key] >= value, key
    codes = {dict(labels).get("response_code") for _, labels in second}
    assert {"200", "503"} <= codes
    check_histograms(second)  # 503s too
    pods = {
        dict(labels)["pod"]: v for (n, labels), v in second.items() if n.startswith("container")
    }
    workloads = {re.fullmatch(r"(.+)-[a-z0-9]+-[a-z0-9]+", pod).group(1) for pod in pods}
    assert workloads == {"fn-edge-0", "fn-edge-1", "fn-edge-2"}
    families = {f.name: f.type for f in text_string_to_metric_families(dp.metrics_text().decode())}
    assert families["istio_requests"] == "counter"
    assert families["istio_request_duration_milliseconds"] == "histogram"
    assert families["container_cpu_usage_seconds"] == "counter"


def test_same_seed_same_metrics():
    texts = []
    for seed in (7, 7, 8):
        dp = example_plane(seed=seed)
        dp.set_routes("fn", {"edge-2": {"edge-0": 50, "edge-1": 50}})
        dp.run(60)
        texts.append(dp.metrics_text())
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_cpu_counter_is_busy_fraction_times_cores():
    dp = example_plane(seed=4)
    dp.run(200)
    cpu = {
        dict(labels)["pod"].rsplit("-", 2)[0]: v
        for (name, labels), v in samples(dp.metrics_text()).items()
        if name == "container_cpu_usage_seconds_total"
    }
    served = pair_totals(dp, "istio_requests_total")
    for node in dp.nodes:
        workload = f"fn-{node.name}"
        busy = dp.utilisation(node.name, 200)
        assert cpu[workload] == pytest.approx(busy * node.cores * 200, rel=1e-6)  # float32 sums
        # Independently: requests served there, one unit of work each, over its capacity.
        work = sum(v for (_, dest), v in served.items() if dest == workload)
        assert cpu[workload] == pytest.approx(
            work / node.requests_per_second * node.cores, rel=0.03
        )


def container_cpu(dp: DataPlane) -> dict[str, float]:
    """CPU seconds by workload (the pod name without its two hashes)."""
    return {
        dict(labels)["pod"].rsplit("-", 2)[0]: v
        for (name, labels), v in samples(dp.metrics_text()).items()
        if name == "container_cpu_usage_seconds_total"
    }


@pytest.mark.parametrize("heavy", [1.0, 5.0])
def test_cpu_is_split_among_services_by_their_work(heavy):
    """fn2 gets a third of fn's requests, each ``heavy`` times as costly (``--work``): its
    CPU is ``heavy / 3`` of fn's, and the operator reads that back as its work per request."""
    second = copy.deepcopy(EDGE_SERVICES[0])
    second["metadata"]["name"] = "fn2"
    second["spec"]["host"] = "fn2.edge.svc.cluster.local"  # one host is one service
    second["spec"]["mesh"].update(virtualService="fn2", destinationRule="fn2")
    load = {"fn": dict.fromkeys(NODES, 30.0), "fn2": dict.fromkeys(NODES, 10.0)}
    dp = DataPlane(EDGE_NODES, [EDGE_SERVICES[0], second], load, seed=5, work={"fn2": heavy})
    seconds = 200
    dp.run(seconds)
    cpu = container_cpu(dp)
    for node in NODES:
        assert cpu[f"fn-{node}"] / cpu[f"fn2-{node}"] == pytest.approx(3.0 / heavy, rel=0.15)
    served = pair_totals(dp, "istio_requests_total")

    def service_of(workload: str) -> str:  # fn2-edge-0 -> fn2
        return workload.split("-", 1)[0]

    readings = {
        svc: ServiceReadings(
            svc,
            rate={pair: n / seconds for pair, n in served.items() if service_of(pair[1]) == svc},
            cpu_cores={w: v / seconds for w, v in cpu.items() if service_of(w) == svc},
        )
        for svc in ("fn", "fn2")
    }
    parsed = parse_policy_spec(example_policy_body(services=["fn", "fn2"])["spec"])
    problem = build_problem(parsed, EDGE_NODES, {"fn": EDGE_SERVICES[0], "fn2": second}, 3)
    work = Observer(problem).telemetry(readings).work
    assert work[1] / work[0] == pytest.approx(heavy, rel=0.1)


# --------------------------------------------------------------------------------------------
# The property the closed loop checks


def test_degradation_hurts_equal_weights_and_rerouting_recovers():
    dp = example_plane(seed=0)
    dp.run(120)
    before = dp.p95_ms("fn", 30)
    dp.degrade("edge-2", 0.5)
    control = example_plane(seed=0)  # the same run that keeps equal weights throughout
    control.run(120)
    control.degrade("edge-2", 0.5)
    dp.run(90)
    control.run(90)
    after_equal = dp.p95_ms("fn", 30)
    dp.set_routes("fn", capacity_weights(dp))
    dp.run(90)
    control.run(90)
    rerouted, still_equal = dp.p95_ms("fn", 30), control.p95_ms("fn", 30)
    target = 200.0
    assert before < target / 2
    assert after_equal > 20 * before and still_equal > 20 * before
    assert rerouted <= 0.7 * still_equal
    assert rerouted < target / 2
    assert dp.lost_fraction("fn", 30) == 0.0 < control.lost_fraction("fn", 30)


def test_a_failed_node_refuses_what_is_routed_to_it_and_its_series_stop():
    """Envoy answers 503 UH for a subset without endpoints, as destination ``unknown``: the
    weight on a failed node is lost, not moved to the others (as the simulator's action mask
    would); the node's own clients stop, and so do the series of its pods."""
    dp = example_plane(seed=0)
    dp.run(30)
    before = pair_totals(dp, "istio_requests_total")
    dp.fail("edge-1")
    dp.run(30)
    assert dp.capacity()["edge-1"] == 0 and dp.truth(10)["down"] == ["edge-1"]
    # equal weights: a third of edge-0's and edge-2's requests go to edge-1, and are lost
    assert 0.2 < dp.lost_fraction("fn", 30) < 0.45
    refused = pair_totals(dp, "istio_requests_total", "503")
    assert refused[("loadgen-edge-0", "unknown")] > 0 and refused[("loadgen-edge-2", "unknown")] > 0
    flags = {
        dict(labels)["response_flags"]
        for (name, labels) in samples(dp.metrics_text())
        if name == "istio_requests_total" and dict(labels)["destination_workload"] == "unknown"
    }
    assert flags == {"UH"}
    after = pair_totals(dp, "istio_requests_total")
    assert not any(source == "loadgen-edge-1" for source, _ in after)  # its clients' pods: gone
    assert any(source == "loadgen-edge-1" for source, _ in before)
    cpu = [
        lab
        for (name, lab) in samples(dp.metrics_text())
        if name == "container_cpu_usage_seconds_total"
    ]
    assert cpu and not any(dict(lab)["pod"].startswith("fn-edge-1") for lab in cpu)
    # routed around it, nothing is lost
    dp.set_routes(
        "fn", {"edge-0": {"edge-0": 70, "edge-2": 30}, "edge-2": {"edge-0": 50, "edge-2": 50}}
    )
    dp.run(30)
    assert dp.lost_fraction("fn", 20) == 0.0
    with pytest.raises(ValueError, match="unknown edge node"):
        dp.fail("edge-9")


def test_pods_out_of_the_endpoints_refuse_their_service_alone():
    """fn's pods on edge-1 stop being ready: fn's requests routed there are answered 503 UH,
    fn2's are served there as before, and edge-1's clients of both go on sending."""
    second = copy.deepcopy(EDGE_SERVICES[0])
    second["metadata"]["name"] = "fn2"
    second["spec"]["host"] = "fn2.edge.svc.cluster.local"  # one host is one service
    second["spec"]["mesh"].update(virtualService="fn2", destinationRule="fn2")
    load = {"fn": dict.fromkeys(NODES, 30.0), "fn2": dict.fromkeys(NODES, 10.0)}
    dp = DataPlane(EDGE_NODES, [EDGE_SERVICES[0], second], load, seed=3)
    dp.run(20)
    dp.unready("edge-1", "fn")
    served_before = pair_totals(dp, "istio_requests_total")
    dp.run(30)
    truth = dp.truth(20)
    assert truth["unready"] == ["fn/edge-1"] and truth["down"] == []
    assert dp.capacity()["edge-1"] > 0
    assert 0.2 < dp.lost_fraction("fn", 20) < 0.45  # a third of the equal weights
    assert dp.lost_fraction("fn2", 20) == 0.0
    served = pair_totals(dp, "istio_requests_total")
    refused = pair_totals(dp, "istio_requests_total", "503")
    assert refused[("loadgen-edge-1", "unknown")] > 0  # its own clients still send
    for client in ("loadgen-edge-0", "loadgen-edge-1"):
        key = (client, "fn-edge-1")
        assert served[key] == served_before[key]  # nothing more of fn served there
    assert (
        served[("loadgen-edge-0", "fn2-edge-1")] > served_before[("loadgen-edge-0", "fn2-edge-1")]
    )
    with pytest.raises(ValueError, match="unknown service"):
        dp.unready("edge-1", "nope")
    with pytest.raises(ValueError, match="unknown edge node"):
        dp.unready("edge-9", "fn")


@pytest.mark.parametrize("at", [19, 20, 21], ids=["before-the-boundary", "at-it", "after-it"])
def test_a_failing_nodes_queue_is_lost_once_and_apart_from_the_seconds_requests(at):
    """Its queue goes at the failure, at an episode's boundary too (where the step has no
    previous one to compare with); those requests are counted apart, so the share of a
    second's requests that is lost stays a share; the next episode keeps the node down."""
    dp = example_plane(seed=0, episode_steps=20)
    dp.degrade("edge-2", 0.3)  # a queue builds up
    dp.run(at)
    queued = int(dp.env.model.q_len[0, 2])
    assert queued > 100
    dp.fail("edge-2")
    dp.run(1)
    assert dp.env.model.q_len[0, 2] == 0
    assert dp.truth(1)["services"]["fn"]["lost_on_failure"] >= queued
    assert 0 < dp.lost_fraction("fn", 1) <= 1
    dp.run(25)  # across the next boundary
    assert not dp.env.timeline.active[dp.env.t, 2] and dp.env.model.q_len[0, 2] == 0


# --------------------------------------------------------------------------------------------
# Routes the simulator cannot represent


def test_destinations_out_of_reach_are_dropped_and_the_rest_renormalised(caplog):
    dp = DataPlane(line_nodes(), EDGE_SERVICES, {"a": 20, "b": 20, "c": 20}, seed=0)
    problems = dp.set_routes("fn", {"a": {"a": 50, "c": 50}, "c": {"a": 100}, "zz": {"a": 1}})
    assert dp.routes("fn")["a"] == {"a": 50}  # c is not a neighbour of a
    assert dp.routes("fn")["c"] == {"c": 1, "b": 1}  # nothing reachable left: equal weights
    assert dp.routes("fn")["b"] == {"b": 1, "a": 1, "c": 1}  # no rule, no catch-all: equal
    assert len(problems) == 4 and all(p in caplog.text for p in problems)
    assert any("'zz'" in p for p in problems)
    dp.run(50)
    rates = pair_totals(dp, "istio_requests_total")
    # Workloads are named by pod-label value, as the operator maps them to nodes.
    assert rates[("loadgen-site-a", "fn-site-a")] == pytest.approx(20 * 50, rel=0.2)
    assert {dest for src, dest in rates if src == "loadgen-site-a"} == {"fn-site-a"}
    assert {dest for src, dest in rates if src == "loadgen-site-c"} == {"fn-site-b", "fn-site-c"}


def test_invalid_weights_change_nothing():
    dp = example_plane()
    dp.set_routes("fn", {"edge-0": {"edge-1": 100}})
    for bad in (
        {"edge-0": {"edge-1": -1}},
        {"edge-0": {"edge-1": float("nan")}},
        {"edge-0": {"edge-1": "10"}},
    ):
        with pytest.raises(ValueError):
            dp.set_routes("fn", bad)
    assert dp.routes("fn")["edge-0"] == {"edge-1": 100}
    with pytest.raises(ValueError, match="unknown service"):
        dp.set_routes("nope", {})
    for node, factor in (("edge-9", 0.5), ("edge-1", 0.0), ("edge-1", float("inf"))):
        with pytest.raises(ValueError):
            dp.degrade(node, factor)


def test_sources_without_a_rule_follow_the_catch_all():
    dp = example_plane()
    dp.set_routes("fn", {"edge-0": {"edge-0": 100}}, default={"edge-1": 60, "edge-2": 40})
    assert dp.routes("fn") == {
        "edge-0": {"edge-0": 100},
        "edge-1": {"edge-1": 60, "edge-2": 40},
        "edge-2": {"edge-1": 60, "edge-2": 40},
    }
    dp.reset_routes("fn")
    assert dp.route_origin("fn") == "equal"


# --------------------------------------------------------------------------------------------
# Following VirtualServices


class FakeApi:
    """CustomObjectsApi as the data plane calls it, serving fixed objects."""

    def __init__(self, objects: dict[str, Any] | None = None, error: int | None = None):
        self.objects = objects or {}
        self.error = error
        self.calls: list[tuple] = []

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append((group, version, namespace, plural, name))
        if self.error:
            raise ApiException(status=self.error, reason="test")
        if name not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        return copy.deepcopy(self.objects[name])

    def list_cluster_custom_object(self, group, version, plural):
        assert (group, version, plural) == ("marl.dev", "v1alpha1", "edgenodes")
        return {"items": copy.deepcopy(EDGE_NODES)}

    def list_namespaced_custom_object(self, group, version, namespace, plural):
        assert (group, version, plural) == ("marl.dev", "v1alpha1", "edgeservices")
        return {"items": copy.deepcopy(EDGE_SERVICES) if namespace == "edge" else []}


def operator_virtual_service(dp: DataPlane, table: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The VirtualService the operator's Istio writer produces for ``table``."""
    routes = routing.build_routes(table, dp.mesh_nodes)
    objects = IstioWriter().desired(dp.services["fn"], routes)
    (vs,) = (o for o in objects if o["kind"] == "VirtualService")
    return vs


def test_virtual_services_written_by_the_operator_round_trip(monkeypatch, caplog):
    dp = example_plane()
    table = routing.weights_from_fractions(
        {
            "edge-0": {"edge-0": 0.62, "edge-1": 0.31, "edge-2": 0.07},
            "edge-1": {"edge-1": 1.0, "edge-0": 0.0, "edge-2": 0.0},
            "edge-2": {"edge-2": 0.2, "edge-0": 0.5, "edge-1": 0.3},
        }
    )
    received = []
    set_routes = dp.set_routes
    monkeypatch.setattr(
        dp, "set_routes", lambda *a, **kw: received.append(a) or set_routes(*a, **kw)
    )
    api = FakeApi({"fn": operator_virtual_service(dp, table)})
    follower = RouteFollower(dp, api)
    follower.poll()
    assert api.calls == [("networking.istio.io", "v1", "edge", "virtualservices", "fn")]
    expected = {src: {d: w for d, w in row.items() if w > 0} for src, row in table.items()}
    assert received == [("fn", expected)]
    assert dp.routes("fn") == expected and dp.route_origin("fn") == "set"
    follower.poll()  # unchanged: not applied again
    assert len(received) == 1

    api.objects["fn"]["spec"]["http"][0]["route"][0]["destination"]["subset"] = "v1"
    follower.poll()
    assert "VirtualService ignored" in caplog.text
    assert dp.routes("fn") == expected  # a malformed object changes nothing

    api.error = 500
    follower.poll()
    assert "routes in force stay" in caplog.text and dp.routes("fn") == expected

    api.error = None
    api.objects.clear()
    follower.poll()
    assert dp.route_origin("fn") == "equal"  # no VirtualService: static equal weights


# --------------------------------------------------------------------------------------------
# The simulator additions the data plane uses


def test_episodes_continue_with_their_queues_and_capacity_changes_apply_from_now():
    dp = example_plane(seed=6, episode_steps=50)
    dp.degrade("edge-2", 0.25)  # 15 req/s against 40 offered: a queue builds up
    dp.run(49)
    env: EdgeEnv = dp.env
    queue = env.model.q_len.copy()
    assert queue[0, 2] > 300
    dp.run(2)  # across the episode boundary
    assert dp.seconds == 51 and env.t == 1
    assert env.model.q_len[0, 2] >= queue[0, 2]  # kept, not emptied
    assert env.timeline.cpu[1, 2] == pytest.approx(15.0)  # the degradation was re-applied
    env.set_node_cpu("edge-2", 42.0)
    assert env.timeline.cpu[0, 2] == pytest.approx(15.0)  # the past is left alone
    assert np.all(env.timeline.cpu[1:, 2] == 42.0)
    with pytest.raises(ValueError):
        env.set_node_cpu("edge-2", -1.0)


# --------------------------------------------------------------------------------------------
# HTTP and the runner


def fetch(url: str, method: str = "GET") -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_http_endpoints():
    dp = example_plane()
    dp.run(15)
    server = dataplane.start_http_server(dp, port=0)
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        status, body = fetch(f"{base}/metrics")
        assert status == 200 and ("istio_requests_total", frozenset()) not in samples(body)
        assert any(name == "istio_requests_total" for name, _ in samples(body))
        status, body = fetch(f"{base}/degrade?node=edge-1&factor=0.5", "POST")
        assert status == 200 and json.loads(body)["capacity_rps"]["edge-1"] == 50
        assert fetch(f"{base}/degrade?node=edge-1&factor=0", "POST")[0] == 400
        assert fetch(f"{base}/degrade?node=edge-1", "POST")[0] == 400
        assert fetch(f"{base}/degrade?node=edge-1&factor=0.5")[0] == 405
        assert fetch(f"{base}/nothing")[0] == 404
        status, body = fetch(f"{base}/truth")
        truth = json.loads(body)
        assert truth["degraded"] == {"edge-1": 0.5} and truth["seconds"] == 15
        assert truth["services"]["fn"]["p95_ms"] > 0
        assert truth["routes"]["fn"]["origin"] == "equal"
        assert truth["routes"]["fn"]["by_source"]["edge-0"] == {
            "edge-0": 1,
            "edge-1": 1,
            "edge-2": 1,
        }
        assert truth["down"] == []
        assert fetch(f"{base}/fail?node=edge-9", "POST")[0] == 400
        assert fetch(f"{base}/fail", "POST")[0] == 400
        assert fetch(f"{base}/fail?node=edge-2")[0] == 405
        status, body = fetch(f"{base}/fail?node=edge-2", "POST")
        assert status == 200 and json.loads(body)["capacity_rps"]["edge-2"] == 0
        assert json.loads(fetch(f"{base}/truth")[1])["down"] == ["edge-2"]
        assert fetch(f"{base}/unready?node=edge-1", "POST")[0] == 400
        assert fetch(f"{base}/unready?node=edge-1&service=fn")[0] == 405
        status, body = fetch(f"{base}/unready?node=edge-1&service=fn", "POST")
        assert status == 200 and json.loads(body) == {"node": "edge-1", "service": "fn"}
        assert json.loads(fetch(f"{base}/truth")[1])["unready"] == ["fn/edge-1"]
    finally:
        server.shutdown()
        server.server_close()


def test_runner_serves_and_stops(capsys):
    args = Namespace(
        namespace="edge",
        port=0,
        host="127.0.0.1",
        load={"edge-0": 40.0},
        speed=200.0,
        seed=0,
        poll_seconds=0.05,
        queue_seconds=10.0,
        work={},
        startup_timeout=5.0,
        log_every=0,
    )
    api = FakeApi()
    stop = threading.Event()
    runner = threading.Thread(target=dataplane.run, args=(args, api, stop))
    runner.start()
    try:
        port = None
        deadline = time.monotonic() + 20
        while port is None and time.monotonic() < deadline:
            found = re.search(r"ready port=(\d+)", capsys.readouterr().out)
            port = found and int(found.group(1))
            time.sleep(0.02)
        assert port, "the runner never printed 'ready port=N'"
        time.sleep(0.3)
        exposition = samples(fetch(f"http://127.0.0.1:{port}/metrics")[1])
        assert exposition[("marl_dataplane_simulated_seconds_total", frozenset())] > 10
        assert len(api.calls) >= 2  # the VirtualService is polled
    finally:
        stop.set()
        runner.join(timeout=10)
    assert not runner.is_alive()


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("--poll-seconds", "0", "must be more than 0"),  # polled the API server in a spin
        ("--poll-seconds", "-1", "must be more than 0"),
        ("--queue-seconds", "0", "must be more than 0"),
        ("--speed", "0", "must be more than 0"),
        ("--speed", "nan", "expected a finite number"),
        ("--startup-timeout", "-5", "must be at least 0"),
        ("--log-every", "0", "must be at least 1"),
    ],
)
def test_settings_that_would_spin_or_stand_still_are_refused(option, value, said, capsys):
    argv = ["--kubeconfig", "unused", "--load", "edge-0=40", option, value]
    with pytest.raises(SystemExit) as exit_:
        dataplane.main(argv, api_factory=lambda path: FakeApi())
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {said}" in err, err


def test_main_stops_cleanly_on_sigterm(capsys):
    api = FakeApi()
    done = threading.Event()

    def terminate_once_serving() -> None:
        deadline = time.monotonic() + 20
        while len(api.calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        if not done.is_set():  # main installs its handlers before it polls
            os.kill(os.getpid(), signal.SIGTERM)

    handler_before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate_once_serving, daemon=True).start()
    argv = [
        "--kubeconfig",
        "unused",
        "--namespace",
        "edge",
        "--port",
        "0",
        "--load",
        "edge-0=40",
        "--speed",
        "100",
        "--poll-seconds",
        "0.05",
        "--log-every",
        "5",
    ]
    try:
        code = dataplane.main(argv, api_factory=lambda path: api)
    finally:
        done.set()
    assert code == 0
    captured = capsys.readouterr()
    assert re.search(r"^ready port=\d+$", captured.out, re.MULTILINE)
    logs = [json.loads(line) for line in captured.err.splitlines()]
    assert {"serving", "truth", "stopped"} <= {entry["message"] for entry in logs}
    assert signal.getsignal(signal.SIGTERM) is handler_before
    # Nothing to read: refused with a message and exit code 1, not a traceback.
    empty = FakeApi()
    empty.list_cluster_custom_object = lambda *a: {"items": []}
    argv = [
        "--kubeconfig",
        "unused",
        "--namespace",
        "edge",
        "--load",
        "edge-0=1",
        "--startup-timeout",
        "0",
    ]
    assert dataplane.main(argv, api_factory=lambda path: empty) == 1
    assert "found 0 EdgeNodes" in capsys.readouterr().err


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        dataplane.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "python -m demo.dataplane --kubeconfig" in out and "--load" in out
