"""How accurate can any system model be? The noise floor of its per-interval targets, as JSON.

    python benchmarks/model_noise_floor.py                     # mesh-10x3 and mesh-6x3
    python benchmarks/model_noise_floor.py --noise 0           # exact telemetry
    python benchmarks/model_noise_floor.py --scenarios mesh-6x3 --replicas 12 --intervals 10

The system model predicts a node's mean and p95 latency over an interval from its utilisation,
service time and queued work. What no model of those inputs can predict is how the arrivals
and request sizes of that particular interval fall. To measure that part, ``--replicas``
copies of the calm scenario run side by side, each with its own arrivals and request sizes,
under the same routing every interval (``simulator.adapt``'s commissioning routing: the base
policy mixed with random routings). Rows that share an interval, a node and a service differ
only in that chance, and in the utilisation and backlog it led to. Within each such group the
best possible prediction is a smooth function of those two, estimated by a least-squares
fit on 1, u, u^2 and the backlog. Each residual is scaled by 1 / sqrt(1 - leverage), which
makes it as large, on average, as the chance around the true function is: the error of the
best possible prediction rather than of a fit on a few dozen rows. A richer basis (cubic,
with interactions) gave the same floor to within 0.01. The group's knowledge of the time of
day and the routing is more than a model is given, so the floor is, if anything, optimistic.

Reported per scenario, each as normalised MAE (mean absolute error over the mean target, the
figure the system model is judged by): ``floor``, that error; ``spread``, the
error of each group's median (what is left knowing nothing of the replica's own state);
``pooled``, the error of one gradient-boosted model of the system model's three inputs fitted
on the replicas' own rows, scored on intervals it did not see (five folds by interval): what
a model of these inputs reaches with plenty of data from the same routings; and ``model``,
the error of the system model fitted on ``--train`` intervals of commissioning data, scored on
the same rows. The last line is one JSON object.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.model_selection import GroupKFold
from tqdm import tqdm

from policies.adaptation import model_rows
from policies.system_model import MEAN_MS, P95_MS, SystemModel
from simulator.adapt import IntervalRecorder, commissioning_routing, commissioning_rows, warm_start
from simulator.cli import parser_from_doc
from simulator.env import EdgeEnv
from simulator.episodes import build_policy
from simulator.scenario import load_scenario

LATENCIES = {"mean_ms": MEAN_MS, "p95_ms": P95_MS}
UTILISATION, BACKLOG = 0, 2  # feature columns


def chance_errors(utilisation: np.ndarray, backlog: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``|y - E[y | u, backlog]|`` per row of one group, estimated: residuals of a
    least-squares fit on 1, u, u^2 and the backlog, each over sqrt(1 - its leverage). Raw
    residuals are smaller than the chance they measure (the fit bends towards every row), and
    leave-one-out ones larger (they add the fit's own error); scaled this way, their squares
    average the noise variance exactly."""
    basis = np.stack([np.ones_like(utilisation), utilisation, utilisation**2, backlog], axis=1)
    hat = basis @ np.linalg.pinv(basis)
    residual = y - hat @ y
    return np.abs(residual) / np.sqrt(np.maximum(1.0 - np.diag(hat), 1e-6))


def pooled_errors(x: np.ndarray, y: np.ndarray, interval: np.ndarray, seed: int) -> dict:
    """Normalised MAE per latency of one boosted model per target on all rows but a fifth of
    the intervals, scored on that fifth, five times over."""
    nmae = {}
    for name, column in LATENCIES.items():
        error = np.zeros(len(y))
        for fit, held in GroupKFold(n_splits=5).split(x, groups=interval):
            est = HistGradientBoostingRegressor(max_iter=300, random_state=seed)
            est.fit(x[fit], y[fit, column])
            error[held] = np.abs(est.predict(x[held]) - y[held, column])
        nmae[name] = float(error.sum() / max(np.abs(y[:, column]).sum(), 1e-12))
    return nmae


def replica_rows(
    scenario_name: str, replicas: int, intervals: int, interval: int, seed: int, noise: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every replica's rows: features, targets, group (the same interval, node and service
    across replicas) and interval index."""
    scenario = dataclasses.replace(load_scenario(scenario_name), events=())
    envs = [
        EdgeEnv(
            scenario,
            num_envs=1,
            action_mode="neighbours",
            seed=seed * 10_000 + r,
            track_servers=True,
        )
        for r in range(replicas)
    ]
    policy = build_policy("default", envs[0], seed)
    routing_rng = np.random.default_rng(seed + 7919)
    telemetry_rng = np.random.default_rng(seed + 104729)
    obs = [env.reset() for env in envs]
    features, targets, groups, indices = [], [], [], []
    for t in tqdm(range(intervals), desc=scenario_name, leave=False):
        if envs[0].t + interval > scenario.steps:  # a new episode, as commissioning starts one
            obs = [env.reset() for env in envs]
        weights = commissioning_routing(policy, obs[0], envs[0].action_mask(), routing_rng)
        for r, env in enumerate(envs):
            recorder = IntervalRecorder(env)
            for _ in range(interval):
                obs[r], _, _, info = env.step(weights[None])
                recorder.add(info)
            tel = recorder.telemetry(telemetry_rng, noise)
            x, y = model_rows(tel, env.mean_cost, interval * scenario.step_seconds)
            features.append(x)
            targets.append(y)
            groups.append(t * len(x) + np.arange(len(x)))
            indices.append(np.full(len(x), t))
    x, y, g, t = (np.concatenate(a) for a in (features, targets, groups, indices))
    keep = np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1)
    return x[keep], y[keep], g[keep], t[keep]


def group_errors(x: np.ndarray, y: np.ndarray, group: np.ndarray) -> dict:
    """The floor and the spread (normalised MAE per latency) over groups of at least eight
    rows (fewer replicas served it: too few rows for a four-term fit)."""
    ids, sizes = np.unique(group, return_counts=True)
    members = [group == g for g in ids[sizes >= 8]]
    result: dict = {"groups": len(members), "floor_nmae": {}, "spread_nmae": {}}
    for name, column in LATENCIES.items():
        floor = spread = total = 0.0
        for rows in members:
            target = y[rows, column]
            floor += chance_errors(x[rows, UTILISATION], x[rows, BACKLOG], target).sum()
            spread += np.abs(target - np.median(target)).sum()
            total += np.abs(target).sum()
        result["floor_nmae"][name] = float(floor / max(total, 1e-12))
        result["spread_nmae"][name] = float(spread / max(total, 1e-12))
    return result


def noise_floor(
    scenario_name: str,
    replicas: int,
    intervals: int,
    interval: int,
    train: int,
    seed: int,
    noise: float,
) -> dict:
    x, y, group, index = replica_rows(scenario_name, replicas, intervals, interval, seed, noise)
    scenario = load_scenario(scenario_name)
    model = SystemModel(seed=seed)
    policy = build_policy("default", EdgeEnv(scenario, num_envs=1, action_mode="neighbours"), seed)
    warm_start(model, commissioning_rows(scenario, policy, train, interval, seed, noise))
    predicted = model.predict(x)
    return {
        "scenario": scenario_name,
        "rows": len(y),
        **group_errors(x, y, group),
        "pooled_nmae": pooled_errors(x, y, index, seed),
        "model_nmae": {
            name: float(np.abs(predicted[:, c] - y[:, c]).sum() / max(np.abs(y[:, c]).sum(), 1e-12))
            for name, c in LATENCIES.items()
        },
    }


def main() -> None:
    parser = parser_from_doc("model_noise_floor.py", __doc__)
    parser.add_argument("--scenarios", nargs="+", default=["mesh-10x3", "mesh-6x3"])
    parser.add_argument("--replicas", type=int, default=40, help="copies under one routing")
    parser.add_argument("--intervals", type=int, default=60, help="intervals per replica")
    parser.add_argument("--interval", type=int, default=5, help="simulator steps per interval")
    parser.add_argument("--train", type=int, default=360, help="intervals the model learns")
    parser.add_argument("--noise", type=float, default=0.05, help="relative telemetry noise")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.replicas < 8:
        parser.error("--replicas must be at least 8: the floor fits four terms per group")
    runs = [
        noise_floor(
            name, args.replicas, args.intervals, args.interval, args.train, args.seed, args.noise
        )
        for name in tqdm(args.scenarios, desc="noise floor")
    ]
    print(
        json.dumps(
            {
                "replicas": args.replicas,
                "intervals": args.intervals,
                "noise": args.noise,
                "seed": args.seed,
                "runs": runs,
            }
        )
    )


if __name__ == "__main__":
    main()
