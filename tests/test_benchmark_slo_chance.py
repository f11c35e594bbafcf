"""The SLO-chance benchmark: its miss rates and counts from known cycles, and a tiny run that
agrees with simulator.adapt seed by seed."""

import importlib.util
import json

import pytest
from benchmark_runner import BENCHMARKS, refusal, run_benchmark

from simulator import adapt
from simulator.scenario import load_scenario

SCRIPT = BENCHMARKS / "slo_chance.py"
SURGE = "name: tiny-surge\nextends: mesh-6x3\nsteps: 60\nevents:\n" + (
    "  - {at: 20, until: 60, kind: surge, node: site-b, factor: 1.5}\n"
)


def load_benchmark():
    spec = importlib.util.spec_from_file_location("slo_chance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cycles(missed: dict[int, list[str]], n: int = 6) -> list[adapt.Cycle]:
    return [adapt.Cycle(1.0, 10.0, {}, 0.0, missed.get(i, [])) for i in range(n)]


def test_miss_rates_and_the_oracle_s_luck_where_rollout_is_counted():
    runs = {
        # Three seeds. Interval 3: the oracle misses in seeds 1 and 2 but not in seed 0,
        # where rollout misses two services: counted 2, and the oracle missed that interval
        # in both other seeds.
        "oracle": [cycles({}), cycles({3: ["auth"]}), cycles({3: ["auth"], 5: ["auth"]})],
        "rollout": [cycles({3: ["auth", "infer"], 1: ["auth"]}), cycles({3: ["auth"]}), cycles({})],
    }
    summary = load_benchmark().chance_summary(runs, [(2, 4), (5, 6)])
    assert summary["after_3_cycles"] == [2, 3, 5]  # interval 1 is before the window
    assert summary["miss_rate"]["oracle"] == pytest.approx([0, 2 / 3, 1 / 3], abs=1e-4)
    assert summary["miss_rate"]["rollout"] == pytest.approx([0, 2 / 3, 0], abs=1e-4)
    assert summary["slo_violations_after_3_cycles"] == [2, 0, 0]
    assert summary["seeds_with_none"] == 2
    assert summary["oracle_miss_rate_where_counted"] == pytest.approx(1.0)


def test_without_rollout_only_the_rates_are_reported():
    runs = {"oracle": [cycles({4: ["auth"]}), cycles({})], "oracle-per-interval": [cycles({})] * 2}
    summary = load_benchmark().chance_summary(runs, [(3, 6)])
    assert summary["mean_miss_rate"] == {"oracle": pytest.approx(1 / 6), "oracle-per-interval": 0}
    assert "slo_violations_after_3_cycles" not in summary


def test_the_mesh_load_is_the_expected_work_over_the_live_capacity(tmp_path):
    path = tmp_path / "tiny-surge.yaml"
    path.write_text(SURGE)
    load = load_benchmark().mesh_load(load_scenario(str(path)), 5)
    calm = load_benchmark().mesh_load(load_scenario("mesh-6x3"), 5)
    assert load.shape == (12,) and calm.shape == (60,)
    # mesh-6x3's Poisson rates by hand: 18 req/s per node and service, site-b's infer 28
    # and site-d's resize 30; mean work 10 (resize), 25 (infer), 4 (auth); 6000 CPU/s.
    by_hand = (6 * 18 * (10 + 25 + 4) + 10 * 25 + 12 * 10) / 6000
    assert calm.mean() == pytest.approx(by_hand, rel=0.02)
    # site-b's whole load times 1.5 from step 20 (the fourth interval on): half its work more.
    extra = 0.5 * (18 * 10 + 28 * 25 + 18 * 4) / 6000
    assert load[4:].mean() - load[:4].mean() == pytest.approx(extra, rel=0.1)
    # One figure per cycle of simulator.adapt, the short last one too (58 steps: 11 and 3).
    path.write_text(SURGE.replace("60", "58"))
    short = load_benchmark().mesh_load(load_scenario(str(path)), 5)
    assert short.shape == (12,) and short[-1] == pytest.approx(load[-1], rel=0.1)


def test_a_tiny_run_counts_what_simulator_adapt_counts_seed_by_seed(tmp_path, capsys):
    path = tmp_path / "tiny-surge.yaml"
    path.write_text(SURGE)
    argv = ["--scenarios", str(path), "--seeds", "2", "--plot", str(tmp_path / "slo.png")]
    report = run_benchmark(
        "slo_chance", *argv, "--arms", "oracle-per-interval", "rollout", "--policy", "default"
    )
    assert report["policy"] == "default"
    assert (tmp_path / "slo.png").stat().st_size > 10_000
    (result,) = report["runs"]
    assert result["change_cycles"] == [4] and result["after_3_cycles"] == [7, 8, 9, 10, 11]
    assert set(result["miss_rate"]) == {"oracle", "oracle-per-interval", "rollout"}
    assert len(result["mesh_load"]) == 5
    for rates in result["miss_rate"].values():
        assert len(rates) == 5 and all(r in (0.0, 0.5, 1.0) for r in rates)
    for seed, counted in enumerate(result["slo_violations_after_3_cycles"]):
        assert adapt.main(["--scenario", str(path), "--json", "--seed", str(seed)]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert counted == summary["slo_violations_after_3_cycles"]
    # The oracles alone, the same seeds: the same rates.
    again = run_benchmark("slo_chance", *argv[:4], "--arms", "oracle", "oracle-per-interval")
    assert again["runs"][0]["miss_rate"] == {
        arm: result["miss_rate"][arm] for arm in ("oracle", "oracle-per-interval")
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "1"], "--seeds: must be at least 2"),
        # No interval would follow a change: it printed null rates.
        (["--scenarios", "mesh-6x3"], "'mesh-6x3' has no events"),
        # Checked before any run, not after hours of the first scenario's.
        (["--policy", "no-such-run"], "--policy: "),
    ],
)
def test_what_measures_nothing_is_refused_naming_the_flag(argv, message):
    assert message in refusal("slo_chance", *argv)
