"""The training benchmark: a tiny run per seed prints the JSON it promises, and the action
head it is asked for is the one the runs train."""

import json

from benchmark_runner import run_benchmark


def test_a_tiny_run_reports_every_seed_and_trains_the_requested_action_head(tmp_path):
    argv = [
        "--scenario", "dfaas-2", "--seeds", "0", "1",
        "--env-steps", "1500", "--eval-episodes", "2", "--action-mode", "neighbours",
        "--set", "num_envs=4", "--set", "rollout_steps=32", "--out", str(tmp_path),
    ]  # fmt: skip
    report = run_benchmark("train", *argv)
    assert report["action_mode"] == "neighbours"
    assert [run["seed"] for run in report["seeds"]] == [0, 1]
    for run in report["seeds"]:
        assert run["wall_seconds"] > 0 and run["env_steps_per_s"] > 0
        # the process, start-up and the baselines' evaluation included, takes longer
        assert run["process_seconds"] > run["wall_seconds"]
        assert 0 <= run["processed_pct"] <= 100
    mean = sum(run["return_per_agent"] for run in report["seeds"]) / 2
    assert report["mean"]["return_per_agent"] == mean
    for seed in (0, 1):
        meta = json.loads((tmp_path / f"seed{seed}" / "policy.json").read_text())
        assert meta["action"]["mode"] == "neighbours"


def test_an_algo_set_as_a_hyperparameter_is_the_one_trained_and_reported(tmp_path):
    """--algo defaulted to mappo and was always passed on, so it overrode --set algo=ippo
    (as simulator.train's --algo does its --set): every run trained mappo, silently, and the
    report's overrides said ippo."""
    argv = [
        "--scenario", "dfaas-2", "--seeds", "0", "--env-steps", "256", "--eval-episodes", "1",
        "--set", "num_envs=4", "--set", "rollout_steps=32", "--set", "algo=ippo",
        "--out", str(tmp_path),
    ]  # fmt: skip
    report = run_benchmark("train", *argv)
    meta = json.loads((tmp_path / "seed0" / "policy.json").read_text())
    assert meta["algo"] == "ippo"
    assert report["algo"] == "ippo"
    # Run again into the same folder: a benchmark trains anew (a run's folder is otherwise
    # refused to a new run).
    assert run_benchmark("train", *argv)["algo"] == "ippo"


def test_a_failing_run_says_why_and_the_benchmark_fails_with_it(tmp_path):
    """The runs' stderr passes through (their progress, or their error), so a run that
    fails is not a silent wait followed by an exit code."""
    import subprocess
    import sys

    from benchmark_runner import BENCHMARKS

    argv = ["--scenario", "dfaas-2", "--seeds", "0", "--set", "imitate=bogus"]
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train.py"), *argv, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "seed 0: training (1 of 1)" in done.stderr and "imitate: " in done.stderr
    assert done.stdout == ""
