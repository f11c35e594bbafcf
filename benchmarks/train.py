"""Benchmark training: wall time, env steps/s and final metrics over several seeds, as JSON.

Examples::

    python benchmarks/train.py --scenario dfaas-paise25 --seeds 0 1 2
    python benchmarks/train.py --scenario dfaas-paise25 --seeds 0 1 2 --action-mode neighbours
    python benchmarks/train.py --scenario dfaas-2 --seeds 0 --env-steps 50000 --eval-episodes 10
    python benchmarks/train.py --scenario mesh-10x3 --seeds 0 --env-steps 300000 --set gamma=0.9

Each seed is one ``python -m simulator.train ... --json`` run in a fresh process.
``wall_seconds`` and ``env_steps_per_s`` are what the run measures of its training loop;
``process_seconds`` is the whole process, start-up and the baselines' evaluation included, as
a user waits for it. A line per seed on stderr says how far it is, and on a terminal each
run's own progress bar. Prints one JSON object:
the per-seed results and their mean.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simulator.cli import json_line, non_negative_int, parser_from_doc, positive_int

KEYS = (
    "return_per_agent",
    "processed_pct",
    "latency_mean_ms",
    "wall_seconds",
    "process_seconds",
    "env_steps_per_s",
)


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from ``main`` so that its help can be checked without running it."""
    parser = parser_from_doc("train.py", __doc__)
    parser.add_argument("--scenario", default="dfaas-paise25", help="bundled name or YAML path")
    parser.add_argument(
        "--algo",
        choices=("mappo", "ippo"),
        help="centralised or independent critics (default: mappo, or the --set algo=...)",
    )
    parser.add_argument(
        "--seeds",
        type=non_negative_int,
        nargs="+",
        default=[0, 1, 2],
        help="one training run per seed",
    )
    parser.add_argument(
        "--env-steps",
        type=positive_int,
        default=1_296_000,
        help="environment steps per run (each steps every agent once)",
    )
    parser.add_argument(
        "--eval-episodes", type=int, default=50, help="episodes of each run's final evaluation"
    )
    parser.add_argument(
        "--action-mode",
        choices=("split3", "neighbours"),
        help="the action head (default: the scenario's; see simulator.train --help)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one hyperparameter in every run (repeatable)",
    )
    parser.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        for i, seed in enumerate(args.seeds):
            cmd = [
                sys.executable, "-m", "simulator.train", "--scenario", args.scenario,
                "--env-steps", str(args.env_steps), "--seed", str(seed),
                "--eval-episodes", str(args.eval_episodes), "--out", str(root / f"seed{seed}"),
                "--json", "--overwrite",  # each run of the benchmark trains anew
            ]  # fmt: skip
            if args.algo:  # given, it wins over a --set algo=, as simulator.train's does
                cmd += ["--algo", args.algo]
            if args.action_mode:
                cmd += ["--action-mode", args.action_mode]
            for item in args.set:
                cmd += ["--set", item]
            print(f"seed {seed}: training ({i + 1} of {len(args.seeds)})", file=sys.stderr)
            started = time.perf_counter()
            # stderr passes through: the run's progress bar, or its error.
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
            if done.returncode != 0:
                return done.returncode
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["process_seconds"] = time.perf_counter() - started
            runs.append({"seed": seed, **{k: result[k] for k in KEYS if k in result}})
            algo = json.loads((Path(result["out"]) / "policy.json").read_text())["algo"]
            print(f"seed {seed}: done in {result['process_seconds']:.0f} s", file=sys.stderr)
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in KEYS if k in runs[0]}
    print(
        json_line(
            {
                "scenario": args.scenario,
                "algo": algo,  # what the runs trained, however it was asked for
                "action_mode": args.action_mode or "default",
                "env_steps": args.env_steps,
                "eval_episodes": args.eval_episodes,
                "overrides": args.set,
                "seeds": runs,
                "mean": mean,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
