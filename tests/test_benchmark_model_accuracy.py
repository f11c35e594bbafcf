"""The model accuracy benchmark: a tiny run prints the JSON it promises, scored on rows the
model never learned from, and the same seed gives the same numbers."""

import pytest
from benchmark_runner import refusal, run_benchmark


def run(*extra: str) -> dict:
    argv = ["--scenarios", "mesh-6x3", "--seeds", "0", "--train", "60", "--test", "12", *extra]
    return run_benchmark("model_accuracy", *argv)


def test_a_tiny_run_scores_held_out_rows_and_is_reproducible(tmp_path):
    report = run("--plot", str(tmp_path / "accuracy.png"))
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    assert report["train_intervals"] == 60 and report["test_intervals"] == 12
    (result,) = report["runs"]
    assert result["scenario"] == "mesh-6x3" and result["seed"] == 0
    assert result["train_rows"] > 100 and result["rows"] > 20  # 18 (node, service) per interval
    assert 0 < result["nmae"]["mean_ms"] < 1 and result["r2"]["mean_ms"] <= 1
    assert result["worst_nmae"] >= result["nmae"]["mean_ms"]
    assert report["mean_nmae"]["mean_ms"] == result["nmae"]["mean_ms"]
    # The mesh's mean latency per held-out interval, where the rows' chance averages out.
    assert 0 < result["nmae"]["mesh_mean_ms"] < result["nmae"]["mean_ms"]
    assert report["mean_nmae"]["mesh_mean_ms"] == result["nmae"]["mesh_mean_ms"]
    # Where the error comes from: every row in one bin of each kind, the shares adding up.
    for kind in ("by_utilisation", "by_requests"):
        bins = result[kind]
        assert sum(b["rows"] for b in bins) == result["rows"], kind
        assert sum(b["error_share"] for b in bins) == pytest.approx(1.0), kind
        assert bins[-1]["to"] is None and bins[0]["from"] == 0.0
        assert all(b["nmae"] is not None and b["nmae"] >= 0 for b in bins if b["rows"]), kind
    assert run() == report


def test_a_live_run_scores_each_interval_before_learning_from_it():
    report = run("--routing", "rollout")
    assert report["routing"] == "rollout"
    (result,) = report["runs"]
    # 60 commissioning intervals, then the 12 live ones it was scored on (18 rows each, less
    # those with too few requests), every one learned from after it was scored
    assert 0 < result["rows"] <= 12 * 18
    assert result["train_rows"] == 60 * 18 + result["rows"]
    assert 0 < result["nmae"]["mesh_mean_ms"] < 1 and 0 < result["nmae"]["mean_ms"] < 1
    assert run("--routing", "rollout") == report


@pytest.mark.parametrize("name", ["model_accuracy", "model_noise_floor"])
def test_more_training_intervals_than_the_model_keeps_are_refused(name):
    """--train 480 reported 480 training intervals while the model's window kept 360."""
    assert "--train: must be at most 360, got 480" in refusal(name, "--train", "480")
