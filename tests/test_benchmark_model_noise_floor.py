"""The noise-floor benchmark: its estimate of chance recovers a known noise, and a tiny run
prints the JSON it promises, the same for the same seed."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from benchmark_runner import BENCHMARKS, refusal, run_benchmark

SCRIPT = BENCHMARKS / "model_noise_floor.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("model_noise_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chance_errors_measure_the_noise_around_the_true_function_in_small_groups():
    """In groups of 12 rows, raw residuals of a four-term fit come out about a fifth below the
    noise and leave-one-out ones about a fifth above; the estimate must land on it."""
    chance_errors = load_benchmark().chance_errors
    rng = np.random.default_rng(0)
    sigma, errors = 3.0, []
    for _ in range(2000):
        u, backlog = rng.uniform(0.2, 1.0, 12), rng.exponential(0.3, 12)
        truth = 20.0 + 40.0 * u + 80.0 * u**2 + 50.0 * backlog
        errors.append(chance_errors(u, backlog, truth + rng.normal(0.0, sigma, 12)))
    expected = sigma * np.sqrt(2.0 / np.pi)  # mean |N(0, sigma)|
    assert np.mean(np.concatenate(errors)) == pytest.approx(expected, rel=0.03)


def test_chance_errors_are_zero_when_the_latency_is_a_function_of_the_state():
    u = np.linspace(0.1, 1.2, 20)
    backlog = np.sin(7 * u) ** 2
    errors = load_benchmark().chance_errors(u, backlog, 5.0 + 9.0 * u**2 + 3.0 * backlog)
    assert errors.max() < 1e-9


def test_a_row_the_fit_must_pass_through_has_no_error_to_tell():
    """The only row with a backlog has leverage 1: its residual is zero by construction, and
    counting it as zero chance would pull the floor down."""
    u = np.linspace(0.3, 0.9, 10)
    backlog = np.zeros(10)
    backlog[4] = 0.5
    y = 10.0 + 20.0 * u + np.random.default_rng(1).normal(0.0, 1.0, 10)
    errors = load_benchmark().chance_errors(u, backlog, y)
    assert np.isnan(errors[4]) and np.isfinite(np.delete(errors, 4)).all()


@pytest.mark.parametrize("explained", [True, False])
def test_the_floor_falls_below_the_spread_by_what_the_state_explains(explained):
    """Groups of 8 rows, their latency a function of the utilisation or not: the floor and
    the spread both estimate the noise where the state explains nothing, and only the floor
    does where it explains the rest."""
    benchmark = load_benchmark()
    rng = np.random.default_rng(2)
    sigma, groups, rows = 3.0, 500, 8
    u = rng.uniform(0.2, 1.0, groups * rows)
    backlog = rng.exponential(0.3, groups * rows)
    truth = 20.0 + (60.0 * u**2 + 50.0 * backlog if explained else 0.0)
    x = np.zeros((groups * rows, 3))
    x[:, benchmark.UTILISATION], x[:, benchmark.BACKLOG] = u, backlog
    y = np.zeros((groups * rows, 4))
    y[:, benchmark.MEAN_MS] = y[:, benchmark.P95_MS] = truth + rng.normal(0.0, sigma, len(u))
    floor, spread = benchmark.group_errors(x, y, np.repeat(np.arange(groups), rows))
    noise = sigma * np.sqrt(2.0 / np.pi)
    assert np.nanmean(floor) == pytest.approx(noise, rel=0.05)
    if explained:
        assert np.nanmean(spread) > 3 * noise
    else:
        assert np.nanmean(spread) == pytest.approx(noise, rel=0.05)


def run(*extra: str) -> dict:
    # 25-step intervals: mesh-6x3's 300-step episode ends after 12, so the run starts another.
    argv = ["--scenarios", "mesh-6x3", "--replicas", "8", "--intervals", "14", "--interval", "25"]
    argv += ["--train", "30"]
    return run_benchmark("model_noise_floor", *argv, *extra)


@pytest.fixture(scope="module")
def plotted(tmp_path_factory) -> tuple[dict, Path]:
    """A tiny run under commissioning routings, with its plot."""
    path = tmp_path_factory.mktemp("floor") / "floor.png"
    return run("--plot", str(path)), path


def test_a_tiny_run_reports_floor_spread_pooled_and_model_on_the_same_rows(plotted):
    report, path = plotted
    assert path.stat().st_size > 10_000
    assert report["replicas"] == 8 and report["intervals"] == 14 and report["noise"] == 0.05
    (result,) = report["runs"]
    assert result["scenario"] == "mesh-6x3" and result["routing"] == "commissioning"
    assert result["groups"] > 12 * 18 and result["rows"] >= 8 * result["groups"] * 0.9
    for target in ("mean_ms", "p95_ms"):
        # Both estimate the same chance where the state explains nothing (how much it does
        # depends on the routings); a model knows less than the group.
        assert 0 < result["floor_nmae"][target] < 1.1 * result["spread_nmae"][target]
        assert result["floor_nmae"][target] < result["pooled_nmae"][target]
        assert result["model_nmae"][target] > 0
    assert run() == report


def test_under_rollouts_routing_the_replicas_run_at_the_loads_rollout_keeps(plotted):
    """The live loop's routings keep every node near or under rollout's utilisation cap;
    commissioning's random routings overload some. The floor is estimated on either."""
    live = run("--routing", "rollout")
    assert live["routing"] == "rollout" and plotted[0]["routing"] == "commissioning"
    (busy,), (kept,) = plotted[0]["runs"], live["runs"]
    assert kept["utilisation"]["p95"] < 0.95 < busy["utilisation"]["p95"]
    assert 0 < kept["floor_nmae"]["mean_ms"] < kept["spread_nmae"]["mean_ms"]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--replicas", "4", "--replicas: must be at least 8"), ("--intervals", "3", "at least 5")],
)
def test_too_little_data_for_the_fits_is_refused_naming_the_flag(flag, value, message):
    assert message in refusal("model_noise_floor", flag, value)
