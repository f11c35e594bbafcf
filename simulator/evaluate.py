"""Evaluate a routing policy on a scenario.

Examples::

    python -m simulator.evaluate --scenario dfaas-paise25 --policy apl --episodes 100 --seed 0
    python -m simulator.evaluate --scenario dfaas-paise25 --policy fixed:0.6,0.4,0 --json
    python -m simulator.evaluate --scenario dfaas-paise25 --policy global-node --episodes 100
    python -m simulator.evaluate --scenario dfaas-paise25 --workload normal --policy apl
    python -m simulator.evaluate --scenario mesh-10x3 --policy oracle --episodes 20
    python -m simulator.evaluate --scenario mesh-10x3 --compare --episodes 20 --plot cmp.png

Episodes run as one vectorised batch (``--envs`` at a time), so 100 episodes cost about as
much as a few. ``global-node`` is the reference upper bound: the scenario pooled into one node
with all resources and all arrivals, every request served locally. ``oracle`` (scenarios with
latency targets) plays the fluid-model optimum, re-solved after every event. ``--compare`` runs
every baseline and the bound or oracle side by side, with costs relative to the oracle.
"""

from __future__ import annotations

import argparse
import sys

from policies.baselines import PolicyError
from simulator.cli import json_line, non_negative_int, parser_from_doc, png_path, positive_int
from simulator.compare import compare, default_policies, format_table, plot
from simulator.env import default_action_mode
from simulator.episodes import episode_batch, run_episodes, summarise
from simulator.scenario import Scenario, ScenarioError, WorkloadSpec, load_scenario
from simulator.workloads import USER_KINDS, validate_user


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from ``main`` so that its help can be checked without running it."""
    parser = parser_from_doc("python -m simulator.evaluate", __doc__)
    parser.add_argument("--scenario", default="dfaas-paise25", help="bundled name or YAML path")
    parser.add_argument(
        "--policy",
        help="heuristic name, fixed:L,F,R, oracle, global-node, default (the bundled "
        "checkpoint) or a checkpoint directory (default apl; with --compare, an extra policy "
        "to add to the table)",
    )
    parser.add_argument(
        "--episodes", type=positive_int, default=100, help="episodes to average over"
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seeds the episodes' workloads"
    )
    parser.add_argument(
        "--envs",
        type=positive_int,
        default=100,
        help="episodes simulated at once; they share one random stream, so the episodes "
        "drawn depend on it as on --seed (the same two give the same numbers)",
    )
    parser.add_argument(
        "--workload",
        type=parameterless_workload,
        help="replace every workload by this kind with its default parameters (e.g. normal)",
    )
    parser.add_argument(
        "--action-mode",
        choices=("split3", "neighbours"),
        help="the policy's action head (default: the scenario's; see simulator.train --help)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--compare", action="store_true", help="run every baseline and the bound/oracle too"
    )
    parser.add_argument(
        "--plot", metavar="PNG", type=png_path, help="with --compare: save a bar chart"
    )
    return parser


def parameterless_workload(kind: str) -> str:
    """An argparse type for ``--workload``: a kind that runs on its default parameters (a
    ``replay`` needs a file, which only a scenario file can give)."""
    try:
        validate_user(kind, {})
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"{error} (--workload takes no parameters: write a scenario file for this one)"
            if kind in USER_KINDS
            else str(error)
        ) from None
    return kind


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plot and not args.compare:  # it would be ignored: the chart compares policies
        parser.error("--plot draws the comparison's bar chart: add --compare")
    args.envs = episode_batch(args.envs, args.episodes)  # what runs, and so what is reported
    try:
        scenario = load_scenario(args.scenario)
        if args.workload:
            scenario = scenario.with_workload(WorkloadSpec(args.workload, {}))
        if args.compare:
            return _compare(scenario, args)
        args.policy = args.policy or "apl"
        per_episode = run_episodes(
            scenario,
            args.policy,
            args.episodes,
            args.seed,
            args.envs,
            args.action_mode,
            progress=not args.json and sys.stderr.isatty(),
        )
    except (ScenarioError, PolicyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        "scenario": scenario.name,
        "policy": args.policy,
        "seed": args.seed,
        "envs": args.envs,
        **summarise(per_episode),
    }
    if args.json:
        print(json_line(summary))
        return 0
    print(
        f"{scenario.name}  policy={args.policy}  episodes={summary['episodes']}  "
        f"seed={args.seed}  envs={args.envs}"
    )
    for key in per_episode:
        print(f"  {key:<26} {summary[key]:>12.3f}  +/- {summary[key + '_std']:.3f}")
    return 0


def _compare(scenario: Scenario, args) -> int:
    mode = args.action_mode or default_action_mode(scenario)
    names = default_policies(scenario, mode)
    if args.policy and args.policy not in names:
        names.insert(0, args.policy)
    rows = compare(
        scenario,
        names,
        args.episodes,
        args.seed,
        args.envs,
        mode,
        progress=not args.json and sys.stderr.isatty(),
    )
    if args.json:
        run = {"scenario": scenario.name, "seed": args.seed, "envs": args.envs}
        print(json_line({**run, "policies": rows}))
    else:
        print(f"{scenario.name}  episodes={args.episodes}  seed={args.seed}  envs={args.envs}")
        print(format_table(rows))
    if args.plot:  # after the results: a plot that cannot be saved must not lose them
        sys.stdout.flush()
        plot(rows, args.plot, f"{scenario.name}: {args.episodes} episodes, seed {args.seed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
