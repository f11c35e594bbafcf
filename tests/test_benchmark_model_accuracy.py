"""The model accuracy benchmark: a tiny run prints the JSON it promises, scored on rows the
model never learned from, and the same seed gives the same numbers."""

from benchmark_runner import run_benchmark


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
    assert run() == report
