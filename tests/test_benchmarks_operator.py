"""The operator scale benchmark: its stub Prometheus speaks the operator's templates, its mesh
fits the bundled checkpoint, and a tiny run prints the JSON it promises."""

import importlib.util
import sys

import numpy as np
import pytest
from benchmark_runner import BENCHMARKS, run_benchmark
from marl_operator.observer import Observer
from marl_operator.problem import build_problem
from marl_operator.prometheus import PrometheusReader
from marl_operator.spec import parse_policy_spec

SCRIPT = BENCHMARKS / "operator_scale.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("operator_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


def test_mesh_fits_the_checkpoint_and_the_stub_answers_every_template(bench):
    mesh = bench.ring_with_chords(10, np.random.default_rng(0))
    assert max(len(v) for v in mesh.neighbours.values()) <= bench.MAX_DEGREE
    policy = bench.routing_policy("bench-0", 10, "http://127.0.0.1:9")
    problem = build_problem(
        parse_policy_spec(policy["spec"]),
        mesh.edge_nodes(),
        {"fn": bench.edge_service("bench-0")},
        max_degree=bench.MAX_DEGREE,
    )
    stub = bench.StubPrometheus(mesh, seed=0)
    reader = PrometheusReader("http://stub", query=stub.answer)
    readings = reader.read(
        namespace="bench-0", service="fn", host="fn.bench-0.svc.cluster.local", window="30s"
    )
    pairs = {(f"loadgen-{a}", f"fn-{b}") for a in mesh.names for b in (a, *mesh.neighbours[a])}
    for series in (readings.rate, readings.success, readings.mean_ms, readings.p95_ms):
        assert set(series) == pairs
    assert set(readings.age_s) == pairs  # the stub's jitter applies to every answer
    assert all(abs(age / bench.SCRAPE_AGE_S - 1) < 0.2 for age in readings.age_s.values())
    assert readings.fresh(120) is readings
    assert set(readings.cpu_cores) == {f"fn-{x}" for x in mesh.names}
    assert "unknown" not in stub.queries
    telemetry = Observer(problem).telemetry({"fn": readings})
    assert np.all(telemetry.offered > 0) and np.all(np.isfinite(telemetry.mean_ms))


def test_decision_times_are_those_of_new_decisions_and_split_by_path(bench):
    """Cycles that kept their last decision (a one-step check) or held were pooled with the
    decisions, so the percentiles were mostly of not deciding."""
    cycle = bench.LoggedCycle
    kept = [cycle(0.0, "p", "Unchanged", 5.0, "kept")] * 8
    new = [cycle(0.0, "p", "Applied", ms, path) for ms, path in
           ((40.0, "rollout_learned"), (60.0, "rollout_prior"))]  # fmt: skip
    out = bench.decision_times([*kept, *new, cycle(0.0, "p", "Held", 0.0, "other")])
    assert out["decisions"] == 2 and out["decision_ms_p50"] == 50.0
    assert out["decision_ms_by_path"]["kept"] == {"cycles": 8, "p50": 5.0, "p95": 5.0, "max": 5.0}
    assert set(out["decision_ms_by_path"]) == {"kept", "other", "rollout_learned", "rollout_prior"}
    reason = "previous rollout decision kept for 2 intervals: its predicted gain and ..."
    assert bench.decision_path(reason) == "kept"


@pytest.mark.integration
def test_tiny_run_prints_the_json_contract():
    args = ["--policies", "2", "--nodes", "3", "--interval", "5", "--duration", "6"]
    out = run_benchmark("operator_scale", *args, "--warmup", "2", timeout=300)
    for key in ("cpu_cores_mean", "rss_mb_peak", "cycles_per_s", "expected_cycles_per_s"):
        assert isinstance(out[key], float), key
    assert out["policies_cycled"] == 2 and out["cycles"] >= 2
    assert sum(p["cycles"] for p in out["decision_ms_by_path"].values()) >= out["decisions"]
    assert set(out["meets_target"]) == {"cpu", "memory", "cycles"}
    # the cycles measured decided and wrote (a held cycle skips most of the work)
    assert out["outcomes"] and set(out["outcomes"]) <= {"Applied", "Unchanged"}, out["outcomes"]
    # and read every policy's pods through its Service (ready on every node)
    assert out["policies_pods_ready"] == 2
