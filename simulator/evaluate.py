"""Evaluate a routing policy on a scenario.

Examples::

    python -m simulator.evaluate --scenario dfaas-paise25 --policy apl --episodes 100 --seed 0
    python -m simulator.evaluate --scenario dfaas-paise25 --policy fixed:0.6,0.4,0 --json
    python -m simulator.evaluate --scenario dfaas-paise25 --policy global-node --episodes 100
    python -m simulator.evaluate --scenario dfaas-paise25 --workload normal --policy apl

Episodes run as one vectorised batch (``--envs`` at a time), so 100 episodes cost about as
much as a few. ``global-node`` is the reference upper bound: the scenario pooled into one node
with all resources and all arrivals, every request served locally.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
from tqdm import tqdm

from policies.baselines import PolicyContext, PolicyError, make_heuristic
from simulator.cli import parser_from_doc
from simulator.env import ActionMode, EdgeEnv
from simulator.scenario import Scenario, ScenarioError, WorkloadSpec, load_scenario

BOUNDS = ("global-node",)


def policy_context(env: EdgeEnv) -> PolicyContext:
    scenario = env.scenario
    node = scenario.nodes[0]
    return PolicyContext(
        action_mode=env.action_mode,
        max_degree=env.topology.max_degree,
        local_capacity=math.floor(node.cpu / float(np.mean(env.mean_cost))),
        queue_capacity=float(node.queue_capacity),
    )


def run_episodes(
    scenario: Scenario,
    policy: str,
    episodes: int,
    seed: int,
    num_envs: int = 100,
    action_mode: ActionMode | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Per-episode metrics of ``policy`` over ``episodes`` episodes (arrays of length episodes)."""
    if policy == "global-node":
        scenario, policy = scenario.pooled(), "apl"
    batch = max(1, min(num_envs, episodes))
    env = EdgeEnv(scenario, num_envs=batch, action_mode=action_mode, seed=seed)
    act = make_heuristic(policy, policy_context(env), seed=seed)
    results: dict[str, list[np.ndarray]] = {}
    rounds = math.ceil(episodes / batch)
    bar = tqdm(
        total=rounds * env.steps,
        desc=f"{scenario.name} {policy}",
        disable=not progress,
        unit="step",
        leave=False,
    )
    for _ in range(rounds):
        obs, done = env.reset(), False
        while not done:
            obs, _, done, _ = env.step(act(obs, env.action_mask()))
            bar.update(1)
        for key, value in env.episode_metrics().items():
            results.setdefault(key, []).append(value)
    bar.close()
    return {k: np.concatenate(v)[:episodes] for k, v in results.items()}


def summarise(per_episode: dict[str, np.ndarray]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, values in per_episode.items():
        out[key] = float(np.nanmean(values))
        out[f"{key}_std"] = float(np.nanstd(values))
    out["episodes"] = len(next(iter(per_episode.values())))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = parser_from_doc("python -m simulator.evaluate", __doc__)
    parser.add_argument("--scenario", default="dfaas-paise25", help="bundled name or YAML path")
    parser.add_argument(
        "--policy", default="apl", help="heuristic name, fixed:L,F,R, or global-node (bound)"
    )
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--envs", type=int, default=100, help="episodes simulated at once")
    parser.add_argument("--workload", help="replace every workload by this kind (e.g. normal)")
    parser.add_argument("--action-mode", choices=("split3", "neighbours"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        scenario = load_scenario(args.scenario)
        if args.workload:
            scenario = scenario.with_workload(WorkloadSpec(args.workload, {}))
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
        **summarise(per_episode),
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print(
        f"{scenario.name}  policy={args.policy}  episodes={summary['episodes']}  seed={args.seed}"
    )
    for key in per_episode:
        print(f"  {key:<26} {summary[key]:>12.3f}  +/- {summary[key + '_std']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
