import json
import subprocess
import sys


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=300
    )


def test_evaluate_json_contract():
    p = run(
        "simulator.evaluate",
        "--scenario",
        "dfaas-2",
        "--policy",
        "apl",
        "--episodes",
        "3",
        "--json",
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    for key in (
        "processed_pct",
        "rejected_pct",
        "return_per_agent",
        "episodes",
        "forwarded_pct",
        "jain_utilisation",
    ):
        assert key in out
    assert out["episodes"] == 3


def test_evaluate_table_and_errors():
    p = run(
        "simulator.evaluate",
        "--scenario",
        "dfaas-2",
        "--policy",
        "fixed:0.6,0.4,0",
        "--episodes",
        "2",
    )
    assert p.returncode == 0 and "processed_pct" in p.stdout
    p = run(
        "simulator.evaluate", "--scenario", "dfaas-2", "--policy", "least-loaded", "--episodes", "1"
    )
    assert p.returncode == 2 and "neighbours" in p.stderr
    p = run("simulator.evaluate", "--scenario", "nope", "--episodes", "1")
    assert p.returncode == 2 and "bundled" in p.stderr


def test_bench_json_contract():
    p = run(
        "simulator.bench",
        "--scenario",
        "dfaas-2",
        "--envs",
        "64",
        "--steps",
        "5",
        "--warmup",
        "2",
        "--json",
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["env_steps_per_s"] > 0 and out["agent_steps_per_s"] == 2 * out["env_steps_per_s"]
