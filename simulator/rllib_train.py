"""Train one shared policy with Ray RLlib through the PettingZoo wrapper (optional extra).

Examples::

    pip install -e '.[rllib]'
    python -m simulator.rllib_train --scenario dfaas-2 --iterations 5 --json

The project's own learner (``simulator.train``) is the fast path: it steps batches of
environments without the single-environment PettingZoo view. This entry point exists for
teams that already run RLlib clusters: the same environment, a shared policy for every agent,
RLlib's PPO. It reports RLlib's mean episode return per iteration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from simulator.cli import non_negative_int, parser_from_doc, positive_int
from simulator.pettingzoo_env import EdgeParallelEnv
from simulator.scenario import ScenarioError, load_scenario

ENV_NAME = "marl-edge-routing"


def build_config(scenario: str, seed: int, batch: int):
    """An RLlib PPO config with one policy ("shared") mapped to every agent."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.env.wrappers.pettingzoo_env import ParallelPettingZooEnv
    from ray.tune.registry import register_env

    register_env(
        ENV_NAME,
        lambda cfg: ParallelPettingZooEnv(EdgeParallelEnv(cfg["scenario"], seed=cfg["seed"])),
    )
    return (
        PPOConfig()
        .environment(ENV_NAME, env_config={"scenario": scenario, "seed": seed})
        .multi_agent(policies={"shared"}, policy_mapping_fn=lambda agent_id, *a, **k: "shared")
        .env_runners(num_env_runners=0)
        .training(train_batch_size=batch, minibatch_size=min(batch, 256), num_epochs=5)
        .debugging(seed=seed)
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from ``main`` so that its help can be checked without running it."""
    parser = parser_from_doc("python -m simulator.rllib_train", __doc__)
    parser.add_argument("--scenario", default="dfaas-2", help="bundled name or YAML path")
    parser.add_argument(
        "--iterations", type=positive_int, default=5, help="RLlib training iterations"
    )
    parser.add_argument("--batch", type=positive_int, default=1000, help="env steps per iteration")
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seeds RLlib and the workloads"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the return of every iteration as JSON"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # here, not inside Ray's workers, where a bad file ended in 75 lines of traceback
        load_scenario(args.scenario)
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        import ray
    except ImportError:
        print("error: Ray RLlib is not installed: pip install -e '.[rllib]'", file=sys.stderr)
        return 2
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        algo = build_config(args.scenario, args.seed, args.batch).build()
        history = []
        for i in range(args.iterations):
            result = algo.train()
            runners = result.get("env_runners", {})
            history.append(
                {"iteration": i + 1, "episode_return_mean": runners.get("episode_return_mean")}
            )
            if not args.json:
                print(history[-1])
        algo.stop()
    finally:
        ray.shutdown()
    if args.json:
        print(json.dumps({"scenario": args.scenario, "history": history}))
    return 0


def fix_hash_seed() -> None:
    """Run this command again with Python's string hashing fixed, unless it is already.

    RLlib keeps agent names in sets, whose order follows the per-process hash of strings:
    the same ``--seed`` gave one of two histories at random on a two-agent scenario. Only a
    number fixes it ("random", or nothing, does not); the command is run again as it was
    given (``sys.orig_argv``: as a module or a script, with the interpreter's options)."""
    if not os.environ.get("PYTHONHASHSEED", "").isdigit():
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


if __name__ == "__main__":
    fix_hash_seed()
    raise SystemExit(main())
