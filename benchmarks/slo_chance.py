"""Is an SLO miss after a change the controller's doing or the load's? Per interval, how often
each controller misses a latency target over many seeds, as JSON.

    python benchmarks/slo_chance.py                                  # four change scenarios
    python benchmarks/slo_chance.py --scenarios mesh-10x3-surge --seeds 16 --plot slo.png
    python benchmarks/slo_chance.py --arms oracle oracle-per-interval   # no rollout: faster
    python benchmarks/slo_chance.py --policy runs/mesh-10x3__mappo__0   # rollout on another

``simulator.adapt`` counts, in one run, rollout's SLO violations from the third cycle after
each change in the intervals where the oracle had none. Near saturation, whether a 5-second
interval's p95 crosses its target is partly a draw of that interval's arrivals and request
sizes, so the count depends on which intervals the oracle happened to get through. Here each
arm runs on ``--seeds`` seeds (each its own arrivals and telemetry noise, exactly as
``simulator.adapt --seed S``), and for every interval from the third cycle after a
change the share of seeds in which the arm missed at least one service's target is reported:

- ``oracle``: simulator.adapt's yardstick, the fluid optimum re-solved at each change;
- ``oracle-per-interval``: the fluid optimum re-solved every interval for that interval's
  expected arrivals, a clairvoyant controller that also follows drift within a piece (a
  diurnal workload) and never reads a noisy measurement. What it misses is the load's doing;
- ``rollout`` and ``base``: simulator.adapt's controllers with its default settings.

Also per scenario: the mesh's expected load per interval (the work arriving over all live
capacity, what every node would carry under a perfect balance); each seed's count as
simulator.adapt reports it; and, over the intervals that count falls in, the mean share of
the *other* seeds in which the oracle itself missed that interval (near 1: the oracle's clean
interval was a lucky draw). The last line is one JSON object.
"""

from __future__ import annotations

import argparse

import numpy as np
from tqdm import tqdm

from policies.baselines import PolicyError
from policies.checkpoint import CheckpointError
from simulator.adapt import (
    CHANGE_SCENARIOS,
    Cycle,
    change_cycles,
    load,
    run_arm,
    settled_windows,
    violations_where_clean,
    warm_model,
)
from simulator.adapt import (
    build_parser as adapt_parser,
)
from simulator.cli import (
    add_scenarios_option,
    at_least,
    json_line,
    parser_from_doc,
    png_path,
    positive_int,
    refuse_unfit_scenarios,
)
from simulator.env import Timeline
from simulator.fluid import expected_arrivals, oracle_schedule
from simulator.scenario import Scenario

ARMS = ("oracle", "oracle-per-interval", "rollout", "base")


def missed(cycles: list[Cycle], at: list[int]) -> np.ndarray:
    """``(len(at),)`` whether any service missed its target in each of the cycles ``at``."""
    return np.array([bool(cycles[i].slo_violations) for i in at])


def slo_chance(
    name: str, seeds: list[int], arms: list[str], interval: int, policy: str = "default"
) -> dict:
    """Every arm of ``arms`` on scenario ``name`` for each seed, ``policy`` the base policy
    rollout improves on; miss rates per interval."""
    argv = ["--scenario", name, "--interval", str(interval), "--policy", policy]
    args = adapt_parser().parse_args(argv)
    scenario, _ = load(args)
    per_interval = None
    if "oracle-per-interval" in arms:  # solved once: it depends on the scenario, not the seed
        per_interval = oracle_schedule(scenario, samples=256, every=interval)
    runs: dict[str, list[list[Cycle]]] = {arm: [] for arm in dict.fromkeys(["oracle", *arms])}
    for seed in tqdm(seeds, desc=name):
        run_args = argparse.Namespace(**{**vars(args), "seed": seed})
        _, policy = load(run_args)
        model = warm_model(scenario, policy, run_args) if "rollout" in runs else None
        for arm in runs:
            schedule = per_interval if arm == "oracle-per-interval" else None
            kind = "oracle" if arm.startswith("oracle") else arm
            runs[arm].append(run_arm(kind, scenario, policy, run_args, model, schedule))
    summary = chance_summary(runs, settled_windows(scenario, interval, len(runs["oracle"][0])))
    expected = mesh_load(scenario, interval)[summary["after_3_cycles"]]
    return {
        "scenario": name,
        "change_cycles": change_cycles(scenario, interval),
        **summary,
        "mesh_load": expected.round(4).tolist(),
    }


def mesh_load(scenario: Scenario, interval: int) -> np.ndarray:
    """``(cycles,)`` the work the mesh is expected to receive per second in each interval
    over all its live capacity: the utilisation of every node under a perfect balance, which
    no routing can bring any node below."""
    rates = expected_arrivals(scenario, samples=256)  # (T, N, S) requests per step
    work = (rates * np.array([s.mean_cpu for s in scenario.services])).sum(axis=(1, 2))
    cpu = Timeline.of(scenario).cpu.sum(axis=1)
    per_step = work / np.maximum(cpu, 1e-9)
    starts = np.arange(0, scenario.steps, interval)  # as simulator.adapt's cycles, the last short
    return np.add.reduceat(per_step, starts) / np.diff([*starts, scenario.steps])


def chance_summary(runs: dict[str, list[list[Cycle]]], windows: list[tuple[int, int]]) -> dict:
    """Miss rates per interval of ``windows`` from each arm's runs (one per seed, the same
    seeds for every arm), and, when rollout ran, the per-seed count simulator.adapt reports
    with the oracle's miss rate in the other seeds where that count falls."""
    at = [i for lo, hi in windows for i in range(lo, hi)]
    misses = {arm: np.stack([missed(r, at) for r in runs[arm]]) for arm in runs}  # (seeds, I)
    result: dict = {
        "after_3_cycles": at,
        "miss_rate": {arm: misses[arm].mean(axis=0).round(4).tolist() for arm in runs},
        "mean_miss_rate": {arm: float(misses[arm].mean()) for arm in runs},
    }
    if "rollout" in runs:
        counted = [
            violations_where_clean(r, o, at)
            for r, o in zip(runs["rollout"], runs["oracle"], strict=True)
        ]
        oracle = misses["oracle"]
        others = (oracle.sum(axis=0)[None] - oracle) / (len(oracle) - 1)
        lucky = others[misses["rollout"] & ~oracle]
        result["slo_violations_after_3_cycles"] = counted
        result["seeds_with_none"] = int(sum(c == 0 for c in counted))
        result["oracle_miss_rate_where_counted"] = float(lucky.mean()) if lucky.size else None
    return result


def plot(results: list[dict], path: str) -> None:
    """Per scenario, each arm's miss rate per interval, changes dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(10, 2.6 * len(results)), squeeze=False)
    for ax, result in zip(axes[:, 0], results, strict=True):
        t = np.asarray(result["after_3_cycles"], dtype=float)
        gaps = np.flatnonzero(np.diff(t) > 1) + 1  # a line per window, not across changes
        for arm, rates in result["miss_rate"].items():
            ax.plot(
                np.insert(t, gaps, np.nan),
                np.insert(rates, gaps, np.nan),
                marker=".",
                lw=1,
                label=arm,
            )
        for c in result["change_cycles"]:
            ax.axvline(c, color="k", ls="--", lw=0.8)
        ax.set(ylim=(-0.03, 1.03), ylabel="share of seeds missing", title=result["scenario"])
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("control interval (from the third after each change)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from ``main`` so that its help can be checked without running it."""
    parser = parser_from_doc("slo_chance.py", __doc__)
    add_scenarios_option(parser, list(CHANGE_SCENARIOS), "bundled change scenarios")
    parser.add_argument(
        "--seeds",
        type=at_least(2),
        default=8,
        help="seeds 0..N-1 per scenario (at least 2: a miss rate needs more than one draw)",
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=ARMS,
        default=list(ARMS[:3]),
        help="controllers to run (the oracle always runs: it is the yardstick)",
    )
    parser.add_argument(
        "--interval", type=positive_int, default=5, help="simulator steps per interval"
    )
    parser.add_argument(
        "--policy",
        default="default",
        help="the base policy: a checkpoint, a heuristic's name, or the bundled default",
    )
    parser.add_argument(
        "--plot", metavar="PNG", type=png_path, help="miss rates per interval, per scenario"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_unfit_scenarios(parser, args.scenarios, args.interval, needs_changes=True)
    for name in args.scenarios:  # before hours of runs, as simulator.adapt checks it
        try:
            load(adapt_parser().parse_args(["--scenario", name, "--policy", args.policy]))
        except (CheckpointError, PolicyError) as error:
            parser.error(f"--policy: {error}")
    seeds = list(range(args.seeds))
    results = [
        slo_chance(name, seeds, args.arms, args.interval, args.policy) for name in args.scenarios
    ]
    if args.plot:
        plot(results, args.plot)
    print(
        json_line(
            {"seeds": args.seeds, "interval": args.interval, "policy": args.policy, "runs": results}
        )
    )


if __name__ == "__main__":
    main()
