"""Held-out accuracy of the system model learned from telemetry, as JSON.

    python benchmarks/model_accuracy.py                       # mesh-10x3 and mesh-6x3, seeds 0-2
    python benchmarks/model_accuracy.py --scenarios mesh-6x3 --seeds 0 --train 120

Per scenario and seed, the model sees ``--train`` intervals of 5-second telemetry of the calm
scenario (5% measurement noise; the base policy mixed with random routings, as
``simulator.adapt`` warm-starts it), is fitted once, and is scored on the rows of the next
``--test`` intervals, which it never learned from: normalised MAE (mean absolute error over
the mean absolute target) and R^2 per target. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from tqdm import tqdm

from policies.system_model import TARGETS, SystemModel, score
from simulator.adapt import commissioning_rows
from simulator.env import EdgeEnv
from simulator.episodes import build_policy
from simulator.scenario import load_scenario


def held_out(scenario_name: str, seed: int, train: int, test: int, interval: int) -> dict:
    """Fit on ``train`` intervals, score on the ``test`` intervals that follow."""
    scenario = load_scenario(scenario_name)
    env = EdgeEnv(scenario, num_envs=1, action_mode="neighbours")
    policy = build_policy("default", env, seed)
    rows = list(commissioning_rows(scenario, policy, train + test, interval, seed, noise=0.05))
    model = SystemModel(seed=seed)
    for features, targets in rows[:train]:
        model.add(features, targets)
    model.fit()
    x = np.concatenate([f for f, _ in rows[train:]])
    y = np.concatenate([t for _, t in rows[train:]])
    keep = np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1)
    accuracy = score(y[keep], model.predict(x[keep]))
    return {
        "scenario": scenario_name,
        "seed": seed,
        "train_rows": model.rows,
        **accuracy.as_dict(),
        "worst_nmae": accuracy.worst_nmae,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=["mesh-10x3", "mesh-6x3"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train", type=int, default=360, help="intervals learned from")
    parser.add_argument("--test", type=int, default=60, help="held-out intervals scored")
    parser.add_argument("--interval", type=int, default=5, help="simulator steps per interval")
    args = parser.parse_args()
    runs = [
        held_out(name, seed, args.train, args.test, args.interval)
        for name, seed in tqdm(
            [(n, s) for n in args.scenarios for s in args.seeds], desc="model accuracy"
        )
    ]
    mean = {t: float(np.mean([r["nmae"][t] for r in runs])) for t in TARGETS}
    print(
        json.dumps(
            {
                "train_intervals": args.train,
                "test_intervals": args.test,
                "runs": runs,
                "mean_nmae": mean,
            }
        )
    )


if __name__ == "__main__":
    main()
