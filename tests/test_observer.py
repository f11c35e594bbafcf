"""The observer's arithmetic, figure by figure: from Istio's per-workload readings to the
telemetry the policy and the system model see (several workloads per node, rejected requests,
smoothing across intervals, the policy's time step, what the status is told)."""

from __future__ import annotations

import numpy as np
import pytest
from marl_operator.observer import MIN_BUSY, InsufficientData, Observer, node_of
from marl_operator.problem import MeshProblem, build_problem
from marl_operator.prometheus import ServiceReadings
from marl_operator.spec import parse_policy_spec
from operator_fakes import example, example_policy_body, renamed

NODES, SERVICES = example("edgenodes.yaml"), example("edgeservice.yaml")

CORES = (0.3, 0.2, 0.12)  # the example EdgeNodes' capacity.cpu
HINTS = (150.0, 100.0, 60.0)  # and their requestsPerSecond


def problem() -> MeshProblem:
    parsed = parse_policy_spec(example_policy_body()["spec"])
    return build_problem(parsed, NODES, {"fn": SERVICES[0]}, 3)


def readings(pairs, cpu=None, service: str = "fn") -> dict[str, ServiceReadings]:
    """``pairs``: ``(client workload, server workload) -> (rps, success, mean ms)``; ``cpu``:
    server workload -> cores."""
    return {
        service: ServiceReadings(
            service,
            rate={pair: v[0] for pair, v in pairs.items()},
            success={pair: v[1] for pair, v in pairs.items()},
            mean_ms={pair: v[2] for pair, v in pairs.items()},
            p95_ms={pair: 2 * v[2] for pair, v in pairs.items()},
            cpu_cores=dict(cpu or {}),
        )
    }


def local(rps=(40.0, 30.0, 20.0), success=1.0, ms=20.0, cpu=None):
    """Each node's clients served by their own node."""
    pairs = {(f"loadgen-edge-{i}", f"fn-edge-{i}"): (r, success, ms) for i, r in enumerate(rps)}
    return readings(pairs, cpu)


def test_two_client_workloads_on_a_node_add_their_load_and_average_their_latency():
    tel = Observer(problem()).telemetry(
        readings(
            {
                ("loadgen-edge-0", "fn-edge-1"): (30.0, 1.0, 15.0),
                ("frontend-edge-0", "fn-edge-1"): (10.0, 1.0, 55.0),
                ("loadgen-edge-1", "fn-edge-1"): (20.0, 1.0, 10.0),
            }
        )
    )
    assert tel.offered[0, 0] == 40.0 and tel.incoming[1, 0] == 60.0
    # edge-0's clients saw (30 x 15 + 10 x 55) / 40 = 25 ms, less the 5 ms link: 20 ms at
    # edge-1; edge-1's own clients 10 ms. The server's mean weighs them by their requests.
    assert tel.mean_ms[1, 0] == pytest.approx((40 * 20.0 + 20 * 10.0) / 60)
    # What each source's clients saw, link included: the policy's latency input.
    np.testing.assert_allclose(tel.mesh.latency_ms[0, :2, 0], [25.0, 10.0])


def test_a_pair_without_a_rate_does_not_overwrite_one_with_requests():
    got = readings({("loadgen-edge-0", "fn-edge-0"): (40.0, 1.0, 20.0)})
    got["fn"].mean_ms[("frontend-edge-0", "fn-edge-0")] = 900.0  # no rate reported for it
    tel = Observer(problem()).telemetry(got)
    assert tel.mean_ms[0, 0] == pytest.approx(20.0)


def test_two_server_workloads_on_a_node_add_their_cpu():
    cpu = {"fn-edge-0": 0.1, "fn-edge-0b-edge-0": 0.05, "fn-edge-1": 0.1, "fn-edge-2": 0.06}
    pairs = {(f"loadgen-edge-{i}", f"fn-edge-{i}"): (20.0, 1.0, 20.0) for i in range(3)}
    pairs[("loadgen-edge-0", "fn-edge-0b-edge-0")] = (10.0, 1.0, 20.0)
    tel = Observer(problem()).telemetry(readings(pairs, cpu))
    assert tel.busy[0] == pytest.approx(0.15 / CORES[0])


def test_capacity_counts_only_the_requests_served_and_is_smoothed_across_intervals():
    """Answered with an error, a request says nothing of what the node can serve; and one
    interval's measurement moves the estimate halfway (the operator's smoothing)."""
    observer = Observer(problem())  # the operator's own smoothing, 0.5
    busy = np.array([0.5, 0.5, 0.5])
    cpu = {f"fn-edge-{i}": busy[i] * CORES[i] for i in range(3)}
    first = observer.telemetry(local(rps=(60.0, 40.0, 20.0), success=0.5, cpu=cpu))
    served = np.array([30.0, 20.0, 10.0])
    estimate = served / busy
    np.testing.assert_allclose(first.capacity, 0.5 * estimate + 0.5 * np.array(HINTS))
    np.testing.assert_allclose(first.mesh.utilisation[0], busy)  # measured, not load/capacity
    second = observer.telemetry(local(rps=(60.0, 40.0, 20.0), success=0.5, cpu=cpu))
    np.testing.assert_allclose(second.capacity, 0.5 * estimate + 0.5 * first.capacity)


def test_an_idle_cpu_teaches_nothing_of_capacity():
    busy = MIN_BUSY / 5
    cpu = {f"fn-edge-{i}": busy * CORES[i] for i in range(3)}
    tel = Observer(problem(), capacity_alpha=1.0).telemetry(local(rps=(1.0, 1.0, 1.0), cpu=cpu))
    np.testing.assert_allclose(tel.capacity, HINTS)


def test_a_busy_node_that_serves_nothing_keeps_its_capacity():
    """Served requests over busy CPU: a node whose pods burn CPU while no request reaches it
    measured a capacity of zero, halved interval after interval towards it by the smoothing,
    and no request was routed there again to correct it."""
    observer = Observer(problem())
    cpu = {"fn-edge-0": 0.15, "fn-edge-1": 0.1, "fn-edge-2": 0.03}  # edge-2 a quarter busy
    for _ in range(10):  # edge-2 serves half a request per second: too few to tell
        tel = observer.telemetry(local(rps=(75.0, 50.0, 0.5), cpu=cpu))
    assert tel.capacity[2] == HINTS[2]
    np.testing.assert_allclose(tel.capacity[:2], [150.0, 100.0])
    # Its CPU is busy all the same: the policy and the model see it so.
    np.testing.assert_allclose(tel.mesh.utilisation[0], [0.5, 0.5, 0.25])


def test_the_cost_of_a_request_is_kept_through_intervals_that_cannot_measure_it():
    """Two services, so that each one's work relative to their mean is visible."""
    parsed = parse_policy_spec(example_policy_body(services=["fn", "heavy"])["spec"])
    p = build_problem(parsed, NODES, {"fn": SERVICES[0], "heavy": renamed("heavy")}, 3)

    def interval(fn_ms: float, heavy_ms: float, heavy_rps=10.0, heavy_cpu=True):
        fn = local(cpu={f"fn-edge-{i}": r * fn_ms / 1000 for i, r in enumerate((40, 30, 20))})
        pairs = {(f"loadgen-edge-{i}", f"heavy-edge-{i}"): (heavy_rps, 1.0, 20.0) for i in range(3)}
        cpu = {f"heavy-edge-{i}": heavy_rps * heavy_ms / 1000 for i in range(3)}
        return fn | readings(pairs, cpu if heavy_cpu else {}, service="heavy")

    observer = Observer(p)
    first = observer.telemetry(interval(20.0, 100.0))
    np.testing.assert_allclose(first.work, [20 / 60, 100 / 60])
    # Smoothed: heavy now costs 60 ms, halfway from 100 to 20.
    second = observer.telemetry(interval(20.0, 20.0))
    np.testing.assert_allclose(observer.cpu_per_request, [0.020, 0.060])
    np.testing.assert_allclose(second.work, [20 / 40, 60 / 40])
    # Too few requests (0.1 per s on each node) to tell a request's cost from idle CPU; and
    # no CPU reported at all: both keep what was learned.
    for quiet in (interval(20.0, 500.0, heavy_rps=0.1), interval(20.0, 20.0, heavy_cpu=False)):
        np.testing.assert_allclose(observer.telemetry(quiet).work, second.work)
        np.testing.assert_allclose(observer.cpu_per_request, [0.020, 0.060])


def test_a_node_that_served_nothing_adds_no_cpu_to_the_cost_of_a_request():
    cpu = {"fn-edge-0": 0.8, "fn-edge-1": 0.6, "fn-edge-2": 0.05}
    observer = Observer(problem(), capacity_alpha=1.0)
    observer.telemetry(local(rps=(40.0, 30.0, 0.0), cpu=cpu))
    assert observer.cpu_per_request[0] == pytest.approx(1.4 / 70)


def test_backlog_carries_over_and_follows_the_policy_s_time_step():
    """Queued work by Little's law: at most all of the node's time is spent waiting; the
    next interval starts from where this one ended; the policy counts per step."""
    observer = Observer(problem(), step_seconds=2.0)
    slow = local(rps=(300.0, 30.0, 20.0), ms=60.0)  # edge-0 far over its 150 rps hint
    first = observer.telemetry(slow)
    wait_s = (60.0 - 1000.0 / HINTS[0]) / 1000.0
    assert first.backlog_end[0] == pytest.approx(wait_s)  # utilisation 2, counted as 1
    assert first.mesh.backlog[0, 0] == pytest.approx(wait_s / 2.0)
    np.testing.assert_allclose(first.mesh.offered[0, :, 0], [600.0, 60.0, 40.0])
    second = observer.telemetry(local(rps=(100.0, 30.0, 20.0), ms=20.0))
    np.testing.assert_allclose(second.backlog_start, first.backlog_end)
    assert second.backlog_end[0] < first.backlog_end[0]


def test_the_status_is_told_the_success_ratio_and_a_ratio_over_one_rejects_nothing():
    observer = Observer(problem())
    observer.telemetry(local(success=0.9))
    assert observer.inputs["fn"]["edge-0"].success == pytest.approx(0.9)
    tel = observer.telemetry(local(success=1.05))  # rates extrapolated over the window
    np.testing.assert_allclose(tel.rejected, 0.0)
    assert observer.inputs["fn"]["edge-0"].success == pytest.approx(1.0)


def test_only_clients_that_found_no_upstream_are_named_and_a_node_down_is_not_unmeasured():
    pairs = {
        ("loadgen-edge-0", "fn-edge-0"): (40.0, 1.0, 20.0),
        ("loadgen-edge-1", "unknown"): (0.0, 1.0, 20.0),
        ("loadgen-edge-2", "unknown"): (3.0, 0.0, 1.0),
    }
    got = readings(pairs)
    got["fn"].rate[("loadgen-edge-0", "fn-edge-1")] = 10.0  # served, no latency reported
    observer = Observer(problem())
    observer.telemetry(got)
    assert observer.no_upstream == {"fn": {"edge-2": 3.0}}
    assert observer.unmeasured == {"fn": ("edge-1",)}
    observer.telemetry(got, down=np.array([False, True, False]))
    assert observer.unmeasured == {}


def test_a_workload_maps_to_the_node_of_its_longest_label_suffix_in_any_order():
    for labels in ({"b": 0, "a-b": 1}, {"a-b": 1, "b": 0}):
        assert node_of("fn-a-b", labels) == 1
        assert node_of("fn-b", labels) == 0
    assert node_of("edge-1", {"edge-1": 4}) == 4  # a workload named as the label itself
    assert node_of("fn-edge-10", {"edge-1": 4}) is None


def test_a_service_without_a_rate_is_named():
    with pytest.raises(InsufficientData, match="no request rate reported for service fn"):
        Observer(problem()).telemetry({"fn": ServiceReadings("fn", {}, {}, {}, {}, {})})


def test_requests_from_clients_on_no_edge_node_count_in_what_a_node_served():
    """An ingress gateway is a client on no edge node (the catch-all rule routes it): each
    node serves its requests and spends CPU on them. Left out of the requests served but not
    out of the CPU, they made every node's capacity look half of what it is here (the share
    of edge clients), and a request cost twice its CPU."""
    pairs = {(f"loadgen-edge-{i}", f"fn-edge-{i}"): (30.0, 1.0, 20.0) for i in range(3)}
    pairs |= {("istio-ingressgateway", f"fn-edge-{i}"): (30.0, 1.0, 20.0) for i in range(3)}
    # 60 requests a second served, each node's CPU what its hint says that takes
    cpu = {f"fn-edge-{i}": 60.0 / HINTS[i] * CORES[i] for i in range(3)}
    observer = Observer(problem(), capacity_alpha=1.0)
    tel = observer.telemetry(readings(pairs, cpu))
    np.testing.assert_allclose(tel.capacity, HINTS)
    # 300m at 150 requests a second: 2 ms of CPU a request
    assert observer.inputs["fn"]["edge-0"].cpu_ms_per_request == pytest.approx(2.0)


def test_a_link_declared_slower_than_what_clients_see_gives_no_negative_latency():
    """The serving node's latency is the client's less the link's declared one-way latency.
    edge-0's clients see 8 ms from edge-2 over a link declared at 12 ms (its round trip, say):
    edge-2 then served in -4 ms, which the status showed and the system model learnt from,
    and nothing named EdgeNode edge-0's spec.neighbours latencyMs."""
    observer = Observer(problem())
    tel = observer.telemetry(readings({("loadgen-edge-0", "fn-edge-2"): (20.0, 1.0, 8.0)}))
    assert tel.mean_ms[2, 0] >= 0.0, tel.mean_ms[2, 0]
    assert observer.inputs["fn"]["edge-2"].mean_ms >= 0.0
    assert observer.links_over == {"edge-0/edge-2": 8.0}
