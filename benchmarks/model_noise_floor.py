"""How accurate can any system model be? The noise floor of its per-interval targets, as JSON.

    python benchmarks/model_noise_floor.py                     # mesh-10x3 and mesh-6x3
    python benchmarks/model_noise_floor.py --noise 0           # exact telemetry
    python benchmarks/model_noise_floor.py --plot floor.png    # the four errors as bars
    python benchmarks/model_noise_floor.py --routing rollout   # under the routing rollout plays
    python benchmarks/model_noise_floor.py --scenarios mesh-6x3 --replicas 12 --intervals 10

The system model predicts a node's mean and p95 latency over an interval from its utilisation,
service time and queued work. What no model of those inputs can predict is how the arrivals and
request sizes of that particular interval fall. To estimate that part, ``--replicas`` copies of
the calm scenario run side by side, each with its own arrivals, request sizes and telemetry
noise, under the same routing every interval. That routing is ``--routing``: ``commissioning``,
``simulator.adapt``'s commissioning routing (the base policy mixed with random routings: the
rows the system model starts from), or ``rollout``, the routings rollout decided, interval by
interval, in a run of ``simulator.adapt``'s live loop on the calm scenario (the rows the model
sees once it runs, at the loads rollout keeps). Rows that share an interval, a node and a
service then differ by chance: this interval's, and the queues and measurements that earlier
chance left. Within each such group the prediction is taken to be a smooth function of the
utilisation and the backlog, fitted by least squares on 1, u, u^2 and the backlog, and each
residual is scaled by 1 / sqrt(1 - its leverage): so scaled, residuals are as large as the
noise around the fitted function itself, not as small as a fit on a few dozen rows makes them.
The floor is an estimate: a group knows its interval's routing, time and node, which no model
is told, and the quadratic may miss some of how latency bends near saturation.

Reported per scenario, each as normalised MAE (mean absolute error over the mean target, the
figure the system model is judged by), all on the same rows (those of groups with at least 8
rows whose fit leaves them a residual): ``floor``, that error; ``spread``, the same
estimate around each group's mean alone (what is left knowing nothing of the replica's own
state); ``pooled``, the error of one gradient-boosted model of the system model's inputs
fitted on the replicas' own rows, scored on a fifth of the intervals it did not see (five contiguous
blocks in turn): what a model of these inputs reaches with five times the system model's
data, from the same routings; and ``model``, the error of the system model fitted on
``--train`` intervals of commissioning data (with ``--routing rollout``, as the live run left
it: also fitted on the run's own intervals). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.model_selection import GroupKFold
from tqdm import tqdm

from policies.adaptation import model_rows
from policies.rollout import Policy
from policies.system_model import BACKLOG, MEAN_MS, P95_MS, UTILISATION, WINDOW, SystemModel
from simulator.adapt import (
    IntervalRecorder,
    commissioning_routing,
    commissioning_rows,
    run_arm,
    warm_model,
    warm_start,
)
from simulator.adapt import (
    build_parser as adapt_parser,
)
from simulator.cli import (
    add_scenarios_option,
    at_least,
    json_line,
    non_negative_float,
    non_negative_int,
    parser_from_doc,
    png_path,
    positive_int,
    refuse_unfit_scenarios,
)
from simulator.env import EdgeEnv
from simulator.episodes import build_policy, fitted_scenario
from simulator.scenario import Scenario, load_scenario

LATENCIES = {"mean_ms": MEAN_MS, "p95_ms": P95_MS}
TARGET_NMAE = 0.10
"""The held-out error asked of the system model, drawn in the plot for comparison."""


def chance_errors(utilisation: np.ndarray, backlog: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``|y - E[y | u, backlog]|`` per row of one group, estimated: residuals of a
    least-squares fit on 1, u, u^2 and the backlog, each over sqrt(1 - its leverage). Raw
    residuals are smaller than the chance they measure (the fit bends towards every row),
    leave-one-out ones larger (they add the fit's own error); scaled this way, their squares
    average the noise variance where it is the same size for every row. A row the fit must
    pass through (leverage 1, say the only one with a backlog) has no residual to tell: NaN.
    """
    basis = np.stack([np.ones_like(utilisation), utilisation, utilisation**2, backlog], axis=1)
    return scaled_residuals(basis, y)


def spread_errors(y: np.ndarray) -> np.ndarray:
    """``|y - E[y]|`` per row of one group, estimated the way ``chance_errors`` estimates
    its chance but around the group's mean alone: what is left knowing nothing of a
    replica's own state. Both scale their residuals alike, so where the state explains
    nothing the two estimate the same noise, and the floor falls below the spread by
    what the state does explain."""
    return scaled_residuals(np.ones((len(y), 1)), y)


def scaled_residuals(basis: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares residuals of ``y`` on ``basis``, each over sqrt(1 - its leverage); NaN
    where the fit must pass through the row."""
    hat = basis @ np.linalg.pinv(basis)
    free = 1.0 - np.diag(hat)
    residual = np.abs(y - hat @ y) / np.sqrt(np.maximum(free, 1e-12))
    return np.where(free > 1e-8, residual, np.nan)


def nmae(error: np.ndarray, target: np.ndarray) -> float:
    """Mean absolute error over the mean absolute target, from per-row errors."""
    return float(np.sum(error) / max(np.abs(target).sum(), 1e-12))


Routing = Callable[[int, np.ndarray, np.ndarray], np.ndarray]
"""``routing(interval, observation, action mask) -> weights``: what every replica plays."""


def commissioning(policy: Policy, rng: np.random.Generator) -> Routing:
    """The commissioning routing, drawn afresh each interval from ``rng``."""
    return lambda _, obs, mask: commissioning_routing(policy, obs, mask, rng)


def rollout_routings(
    scenario: Scenario,
    policy: Policy,
    intervals: int,
    interval: int,
    train: int,
    seed: int,
    noise: float,
) -> tuple[Routing, SystemModel]:
    """The routings rollout decides in ``simulator.adapt``'s live loop on ``scenario`` (run
    exactly as its command line runs it by default), and the system model as the run
    left it."""
    argv = ["--interval", str(interval), "--warmup", str(train)]
    args = adapt_parser().parse_args([*argv, "--seed", str(seed), "--noise", str(noise)])
    model = warm_model(scenario, policy, args)
    cycles = run_arm("rollout", scenario, policy, args, model)
    weights = [np.asarray(c.weights, dtype=float) for c in cycles]
    return (lambda t, _obs, _mask: weights[t]), model


def replica_rows(
    scenario: Scenario,
    routing: Routing,
    intervals: int,
    interval: int,
    replica_seeds: list[np.random.SeedSequence],
    telemetry_seed: np.random.SeedSequence,
    noise: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every replica's rows (one replica per seed of ``replica_seeds``): features, targets,
    group (the same interval, node and service across replicas) and interval index."""
    envs = [
        EdgeEnv(
            scenario,
            num_envs=1,
            action_mode="neighbours",
            seed=int(stream.generate_state(1)[0]),
            track_servers=True,
        )
        for stream in replica_seeds
    ]
    telemetry_rng = np.random.default_rng(telemetry_seed)
    obs = [env.reset() for env in envs]
    features, targets, groups, indices = [], [], [], []
    for t in tqdm(range(intervals), desc=scenario.name, leave=False):
        if envs[0].t + interval > scenario.steps:  # a new episode, as commissioning starts one
            obs = [env.reset() for env in envs]
        weights = routing(t, obs[0], envs[0].action_mask())
        for r, env in enumerate(envs):
            recorder = IntervalRecorder(env)
            for _ in range(interval):
                obs[r], _, _, info = env.step(weights[None])
                recorder.add(info)
            tel = recorder.telemetry(telemetry_rng, noise)
            x, y, _ = model_rows(tel, env.mean_cost, interval * scenario.step_seconds)
            features.append(x)
            targets.append(y)
            groups.append(t * len(x) + np.arange(len(x)))
            indices.append(np.full(len(x), t))
    x, y, g, t = (np.concatenate(a) for a in (features, targets, groups, indices))
    keep = np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1)
    return x[keep], y[keep], g[keep], t[keep]


def group_errors(x: np.ndarray, y: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per row and latency ``(R, 2)``: the chance error and the spread around the group's
    mean; NaN for rows of groups under 8 rows (too few for a four-term fit) and rows the
    fit passes through."""
    floor = np.full((len(y), len(LATENCIES)), np.nan)
    spread = floor.copy()
    order = np.argsort(group, kind="stable")
    members = np.split(order, np.flatnonzero(np.diff(group[order])) + 1)
    for rows in (m for m in members if len(m) >= 8):
        for k, column in enumerate(LATENCIES.values()):
            target = y[rows, column]
            floor[rows, k] = chance_errors(x[rows, UTILISATION], x[rows, BACKLOG], target)
            spread[rows, k] = spread_errors(target)
    return floor, spread


def pooled_errors(x: np.ndarray, y: np.ndarray, block: np.ndarray, seed: int) -> np.ndarray:
    """Per row and latency ``(R, 2)``: the error of a boosted model fitted on the other
    blocks of intervals (contiguous, so neighbouring intervals' shared queues do not leak
    from the fit into the score)."""
    error = np.zeros((len(y), len(LATENCIES)))
    for k, column in enumerate(LATENCIES.values()):
        for fit, held in GroupKFold(n_splits=len(np.unique(block))).split(x, groups=block):
            est = HistGradientBoostingRegressor(max_iter=300, random_state=seed)
            est.fit(x[fit], y[fit, column])
            error[held, k] = np.abs(est.predict(x[held]) - y[held, column])
    return error


def noise_floor(
    scenario_name: str,
    replicas: int,
    intervals: int,
    interval: int,
    train: int,
    seed: int,
    noise: float,
    routing: str = "commissioning",
) -> dict:
    calm = dataclasses.replace(load_scenario(scenario_name), events=())
    scenario = fitted_scenario(calm, "default", "neighbours")
    policy = build_policy("default", EdgeEnv(scenario, num_envs=1, action_mode="neighbours"), seed)
    # The replicas' seeds are spawned apart from the ones commissioning and the live loop
    # use, so none of them replays the system model's training data.
    *replica_seeds, routing_seed, telemetry_seed = np.random.SeedSequence([seed, 0xF100]).spawn(
        replicas + 2
    )
    if routing == "commissioning":
        play = commissioning(policy, np.random.default_rng(routing_seed))
        model = SystemModel(interval_s=interval * scenario.step_seconds, seed=seed)
        warm_start(model, commissioning_rows(scenario, policy, train, interval, seed, noise))
    else:  # one live run as long as the replicas' (its episode is stretched to fit)
        scenario = dataclasses.replace(scenario, steps=max(scenario.steps, intervals * interval))
        play, model = rollout_routings(scenario, policy, intervals, interval, train, seed, noise)
    x, y, group, index = replica_rows(
        scenario, play, intervals, interval, replica_seeds, telemetry_seed, noise
    )
    floor, spread = group_errors(x, y, group)
    scored = np.isfinite(floor).all(axis=1)
    if not scored.any():
        raise ValueError(
            f"{scenario_name}: no group of at least 8 rows to fit; raise --replicas or --intervals"
        )
    pooled = pooled_errors(x, y, index * 5 // intervals, seed)
    columns = list(LATENCIES.values())
    target = y[scored][:, columns]
    errors = {
        "floor": floor[scored],
        "spread": spread[scored],
        "pooled": pooled[scored],
        "model": np.abs(model.predict(x[scored])[:, columns] - target),
    }
    result: dict = {
        "scenario": scenario_name,
        "routing": routing,
        "rows": int(scored.sum()),
        "groups": len(np.unique(group[scored])),
        "utilisation": {  # the regime the rows come from
            "mean": float(np.mean(x[scored, UTILISATION])),
            "p95": float(np.percentile(x[scored, UTILISATION], 95)),
        },
    }
    for label, error in errors.items():
        result[f"{label}_nmae"] = {
            name: nmae(error[:, k], target[:, k]) for k, name in enumerate(LATENCIES)
        }
    return result


def plot(runs: list[dict], path: str, target: float = TARGET_NMAE) -> None:
    """The four errors of the mean latency per scenario as bars, against the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ("floor", "spread", "pooled", "model")
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        heights = [r[f"{label}_nmae"]["mean_ms"] for r in runs]
        ax.bar(np.arange(len(runs)) + i * width, heights, width, label=label)
    ax.axhline(target, color="k", ls="--", lw=0.8, label=f"target {target:g}")
    ax.set_xticks(np.arange(len(runs)) + width * (len(labels) - 1) / 2)
    ax.set_xticklabels([r["scenario"] for r in runs])
    ax.set(ylabel="normalised MAE of the mean latency", title="how much of an interval is chance")
    ax.legend(ncols=5, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from ``main`` so that its help can be checked without running it."""
    parser = parser_from_doc("model_noise_floor.py", __doc__)
    add_scenarios_option(parser, ["mesh-10x3", "mesh-6x3"], "bundled names")
    parser.add_argument(
        "--replicas",
        type=at_least(8),
        default=40,
        help="copies under one routing (at least 8: the floor fits four terms per group)",
    )
    parser.add_argument(
        "--intervals",
        type=at_least(5),
        default=60,
        help="intervals per replica (at least 5: the pooled model is scored on 5 blocks)",
    )
    parser.add_argument(
        "--interval", type=positive_int, default=5, help="simulator steps per interval"
    )
    parser.add_argument(
        "--train",
        type=at_least(1, at_most=WINDOW),
        default=WINDOW,
        help=f"intervals the model learns (at most its window, {WINDOW})",
    )
    parser.add_argument(
        "--noise", type=non_negative_float, default=0.05, help="relative telemetry noise"
    )
    parser.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seeds the replicas, routings and telemetry noise",
    )
    parser.add_argument(
        "--routing",
        choices=("commissioning", "rollout"),
        default="commissioning",
        help="what every replica plays: commissioning routings, or rollout's in a live run",
    )
    parser.add_argument(
        "--plot", metavar="PNG", type=png_path, help="the four errors per scenario as bars"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_unfit_scenarios(parser, args.scenarios, args.interval)
    runs = [
        noise_floor(
            name,
            args.replicas,
            args.intervals,
            args.interval,
            args.train,
            args.seed,
            args.noise,
            args.routing,
        )
        for name in tqdm(args.scenarios, desc="noise floor")
    ]
    if args.plot:
        plot(runs, args.plot)
    print(
        json_line(
            {
                "replicas": args.replicas,
                "intervals": args.intervals,
                "noise": args.noise,
                "seed": args.seed,
                "routing": args.routing,
                "runs": runs,
            }
        )
    )


if __name__ == "__main__":
    main()
