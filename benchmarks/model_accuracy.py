"""Held-out accuracy of the system model learned from telemetry, as JSON.

    python benchmarks/model_accuracy.py                       # mesh-10x3 and mesh-6x3, seeds 0-2
    python benchmarks/model_accuracy.py --scenarios mesh-6x3 --seeds 0 --train 120
    python benchmarks/model_accuracy.py --plot accuracy.png   # held-out predicted vs observed
    python benchmarks/model_accuracy.py --routing rollout     # on a live run's intervals

Per scenario and seed, the model sees ``--train`` intervals of 5-second telemetry of the calm
scenario (5% measurement noise; the base policy mixed with random routings, as
``simulator.adapt`` warm-starts it), is fitted once, and is scored on the rows of the next
``--test`` intervals, which it never learned from: normalised MAE (mean absolute error over
the mean absolute target) and R^2 per target, and of each held-out interval's mean latency
over the whole mesh (``mesh_mean_ms``: the rows weighted by the requests each served, the
latency part of a decision's cost). With ``--routing rollout`` the held-out intervals are
instead ``--test`` intervals of ``simulator.adapt``'s live loop on the calm scenario, each
scored before the model learns from it: the loads rollout keeps, not commissioning's random
routings, some of which overload a node. The last line is one JSON object. How low the
per-row error could go at all is ``benchmarks/model_noise_floor.py``'s question; where the
per-row error of the mean latency comes from, each commissioning run says by the rows'
utilisation and by their requests (``by_utilisation``, ``by_requests``: each bin's rows, its
own normalised MAE, and its share of the run's absolute error).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import numpy as np
from tqdm import tqdm

from policies.system_model import MEAN_MS, TARGETS, UTILISATION, WINDOW, SystemModel, score
from simulator.adapt import build_parser as adapt_parser
from simulator.adapt import commissioning_rows, run_arm, warm_model, warm_start
from simulator.cli import (
    add_scenarios_option,
    at_least,
    json_line,
    non_negative_int,
    parser_from_doc,
    png_path,
    positive_int,
    refuse_unfit_scenarios,
)
from simulator.env import EdgeEnv
from simulator.episodes import build_policy, fitted_scenario
from simulator.scenario import load_scenario

UTILISATION_BINS = (0.0, 0.4, 0.6, 0.75, 0.85, 1.0, None)
REQUEST_BINS = (0.0, 20.0, 50.0, 100.0, None)


def error_by_bin(values: np.ndarray, edges: tuple, y: np.ndarray, p: np.ndarray) -> list[dict]:
    """The mean latency's error over rows binned by ``values`` (``edges``, None: open
    above): rows, normalised MAE and share of all rows' absolute error, per bin."""
    error = np.abs(y - p)
    total = max(float(error.sum()), 1e-12)
    bins = []
    for low, high in itertools.pairwise(edges):
        rows = (values >= low) & (values < (np.inf if high is None else high))
        target = float(np.abs(y[rows]).sum())
        bins.append(
            {
                "from": low,
                "to": high,
                "rows": int(rows.sum()),
                "nmae": float(error[rows].sum()) / target if target > 0 else None,
                "error_share": float(error[rows].sum()) / total,
            }
        )
    return bins


def held_out(
    scenario_name: str, seed: int, train: int, test: int, interval: int, routing: str
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Fit on ``train`` intervals, score on ``test`` intervals it never learned from: the
    commissioning intervals that follow, or those of a live run. Returns the scores, and the
    held-out targets and predictions for the plot."""
    calm = dataclasses.replace(load_scenario(scenario_name), events=())
    scenario = fitted_scenario(calm, "default", "neighbours")
    env = EdgeEnv(scenario, num_envs=1, action_mode="neighbours")
    policy = build_policy("default", env, seed)
    # simulator.adapt's settings, its telemetry noise among them, for both routings.
    argv = ["--interval", str(interval), "--warmup", str(train), "--seed", str(seed)]
    args = adapt_parser().parse_args(argv)
    if routing == "commissioning":
        rows = list(commissioning_rows(scenario, policy, train + test, interval, seed, args.noise))
        model = SystemModel(interval_s=interval * scenario.step_seconds, seed=seed)
        warm_start(model, rows[:train])
        x = np.concatenate([r.features for r in rows[train:]])
        y = np.concatenate([r.targets for r in rows[train:]])
        requests = np.concatenate([r.requests for r in rows[train:]])
        index = np.repeat(np.arange(test), [len(r.features) for r in rows[train:]])
        keep = np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1)
        x, y, requests, index = x[keep], y[keep], requests[keep], index[keep]
        predicted = model.predict(x)
        mean, guess = y[:, MEAN_MS], predicted[:, MEAN_MS]
        bins = {
            "by_utilisation": error_by_bin(x[:, UTILISATION], UTILISATION_BINS, mean, guess),
            "by_requests": error_by_bin(requests, REQUEST_BINS, mean, guess),
        }
    else:  # the model scores each live interval before it learns from it
        live = dataclasses.replace(scenario, steps=test * interval)
        model = warm_model(live, policy, args, scored_intervals=test)
        run_arm("rollout", live, policy, args, model)
        y, predicted, requests, index = model.held_out()
        bins = {}  # the live rows' features are not kept
    accuracy = score(y, predicted, requests, index)
    result = {
        "scenario": scenario_name,
        "seed": seed,
        "train_rows": model.rows,
        **accuracy.as_dict(),
        "worst_nmae": accuracy.worst_nmae,
        **bins,
    }
    return result, y, predicted


def plot(held: list[tuple[dict, np.ndarray, np.ndarray]], path: str) -> None:
    """Held-out predicted against observed mean and p95 latency, one colour per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    for ax, target in zip(axes, ("mean_ms", "p95_ms"), strict=True):
        column = TARGETS.index(target)
        for name in dict.fromkeys(r["scenario"] for r, _, _ in held):
            y = np.concatenate([t[:, column] for r, t, _ in held if r["scenario"] == name])
            p = np.concatenate([q[:, column] for r, _, q in held if r["scenario"] == name])
            ax.scatter(y, p, s=4, alpha=0.3, label=name)
        ax.axline((1, 1), slope=1, color="k", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel=f"observed {target}", title=target)
        ax.set_ylabel(f"predicted {target}")
        ax.legend(markerscale=3)
    fig.suptitle("system model on held-out intervals")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from ``main`` so that its help can be checked without running it."""
    parser = parser_from_doc("model_accuracy.py", __doc__)
    add_scenarios_option(parser, ["mesh-10x3", "mesh-6x3"], "bundled names")
    parser.add_argument(
        "--seeds",
        type=non_negative_int,
        nargs="+",
        default=[0, 1, 2],
        help="one run per scenario and seed",
    )
    parser.add_argument(
        "--train",
        type=at_least(1, at_most=WINDOW),
        default=WINDOW,
        help=f"intervals learned from (at most the model's window, {WINDOW})",
    )
    parser.add_argument("--test", type=positive_int, default=60, help="held-out intervals scored")
    parser.add_argument(
        "--interval", type=positive_int, default=5, help="simulator steps per interval"
    )
    parser.add_argument(
        "--plot", metavar="PNG", type=png_path, help="held-out predicted vs observed latency"
    )
    parser.add_argument(
        "--routing",
        choices=("commissioning", "rollout"),
        default="commissioning",
        help="held-out intervals: commissioning's, or a live rollout run's",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    # A live run's scenario is cut to --test intervals, so any interval fits it.
    fits = args.interval if args.routing == "commissioning" else 1
    refuse_unfit_scenarios(parser, args.scenarios, fits)
    held = [
        held_out(name, seed, args.train, args.test, args.interval, args.routing)
        for name, seed in tqdm(
            [(n, s) for n in args.scenarios for s in args.seeds], desc="model accuracy"
        )
    ]
    if args.plot:
        plot(held, args.plot)
    runs = [result for result, _, _ in held]
    scored = {t: [r["nmae"][t] for r in runs if r["nmae"][t] is not None] for t in runs[0]["nmae"]}
    mean = {t: float(np.mean(v)) if v else None for t, v in scored.items()}
    print(
        json_line(
            {
                "train_intervals": args.train,
                "test_intervals": args.test,
                "routing": args.routing,
                "runs": runs,
                "mean_nmae": mean,
            }
        )
    )


if __name__ == "__main__":
    main()
