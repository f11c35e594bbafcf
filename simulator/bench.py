"""Measure simulator throughput.

Examples::

    python -m simulator.bench --scenario dfaas-paise25 --envs 4096 --json
    python -m simulator.bench --scenario mesh-10x3 --envs 512 --steps 50

Steps a batch of ``--envs`` environments with a fixed-split policy after ``--warmup`` steps
and reports env steps per second (one step of one environment), agent steps per second
(env steps x agents), latency of one batch step, and peak memory.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np

from policies.baselines import PolicyError, make_heuristic
from simulator.cli import json_line, non_negative_int, parser_from_doc, positive_int
from simulator.env import ActionMode, EdgeEnv
from simulator.episodes import policy_context
from simulator.scenario import ScenarioError, load_scenario


def measure(
    scenario_name: str,
    envs: int,
    steps: int,
    warmup: int,
    seed: int,
    policy: str,
    action_mode: ActionMode | None = None,
) -> dict:
    scenario = load_scenario(scenario_name)
    env = EdgeEnv(scenario, num_envs=envs, seed=seed, action_mode=action_mode)
    act = make_heuristic(policy, policy_context(env), seed=seed)
    obs = env.reset()
    actions = act(obs, env.action_mask())
    durations = []
    for i in range(warmup + steps):
        if env.t >= env.steps:
            env.reset()
        start = time.perf_counter()
        env.step(actions)
        if i >= warmup:
            durations.append(time.perf_counter() - start)
    total = float(np.sum(durations))
    ms = np.array(durations) * 1e3
    return {
        "scenario": scenario.name,
        "envs": envs,
        "agents": env.num_agents,
        "steps_measured": steps,
        "policy": policy,
        "action_mode": env.action_mode,
        "env_steps_per_s": envs * steps / total,
        "agent_steps_per_s": envs * env.num_agents * steps / total,
        "batch_step_ms_p50": float(np.percentile(ms, 50)),
        "batch_step_ms_p95": float(np.percentile(ms, 95)),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from ``main`` so that its help can be checked without running it."""
    parser = parser_from_doc("python -m simulator.bench", __doc__)
    parser.add_argument("--scenario", default="dfaas-paise25", help="bundled name or YAML path")
    parser.add_argument(
        "--envs", type=positive_int, default=4096, help="environments stepped as one batch"
    )
    parser.add_argument("--steps", type=positive_int, default=100, help="measured batch steps")
    parser.add_argument(
        "--warmup", type=non_negative_int, default=20, help="batch steps run before timing"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seeds the workloads")
    parser.add_argument(
        "--policy",
        default="fixed:0.6,0.4,0",
        help="actions are computed once and replayed, so only the simulator is timed",
    )
    parser.add_argument(
        "--action-mode",
        choices=("split3", "neighbours"),
        help="the action head the policy fills (default: the scenario's)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = measure(
            args.scenario,
            args.envs,
            args.steps,
            args.warmup,
            args.seed,
            args.policy,
            args.action_mode,
        )
    except (ScenarioError, PolicyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json_line(result))
    else:
        for key, value in result.items():
            print(f"{key:<20} {value:,.1f}" if isinstance(value, float) else f"{key:<20} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
