"""Train a routing policy on a scenario with multi-agent PPO.

Examples::

    python -m simulator.train --scenario dfaas-paise25 --algo mappo --env-steps 1296000 \\
        --seed 0 --out runs/paise-mappo-0
    python -m simulator.train --scenario dfaas-paise25 --action-mode neighbours --seed 0 \\
        --out runs/paise-neighbours-0
    python -m simulator.train --scenario mesh-10x3 --algo ippo --env-steps 200000 --out runs/mesh
    python -m simulator.train --scenario dfaas-2 --env-steps 20000 --set learning_rate=3e-4
    python -m simulator.train --scenario mesh-10x3 --env-steps 300000 \\
        --set imitate=least-request --out runs/mesh-clone
    python -m simulator.train --config my-hparams.yaml --out runs/x --resume
    torchrun --standalone --nproc-per-node 2 -m simulator.train --scenario dfaas-paise25 \\
        --out runs/ddp

The output directory receives the checkpoint (``policy.pt`` + ``policy.json``, loadable by
``simulator.evaluate --policy DIR`` and by the operator; ``finished`` in it says whether the
run reached its ``--env-steps``), ``train_state.pt`` for ``--resume``, ``progress.csv`` and
``evaluations.csv`` (written at every periodic evaluation), TensorBoard logs under ``tb/``
and ``learning_curve.png``. Ctrl-C or SIGTERM saves a checkpoint before exiting. A folder
that holds a run is not trained into anew unless ``--overwrite`` says so. ``--resume`` needs
the settings the run was started with (its ``--config``/``--set``, ``--seed``); one that
differs is refused by name. A larger ``--env-steps`` extends the run:
the learning rate and the entropy bonus anneal over the new budget from where it puts them,
so they step back up when resumed.
``--env-steps`` counts environment steps (each steps every agent once) over all processes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from policies import checkpoint
from policies.baselines import Policy, PolicyError
from policies.checkpoint import CheckpointError, LoadedPolicy
from policies.mappo import Trainer
from policies.ppo import ALGOS, PPOConfig
from simulator.cli import (
    json_line,
    make_folder,
    non_negative_int,
    parser_from_doc,
    positive_int,
)
from simulator.env import EdgeEnv, default_action_mode
from simulator.episodes import build_policy, run_episodes, summarise
from simulator.scenario import Scenario, ScenarioError, load_scenario

STATE_FILE = "train_state.pt"


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C (or SIGTERM) within the block takes effect at its end. An update interrupted
    part-way left the weights and the optimiser some minibatches into it and the normalisers
    counting its rollout, while its number was not counted: the state saved on the way out
    was one no run passes through, and a resumed run repeated that update on top of it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: received.append(signum))
        for sig in STOP_SIGNALS
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (``timeout``, a batch scheduler, a pod's deletion) stops a run as Ctrl-C does,
    saving before it exits: by default it killed the run with nothing saved since the last
    periodic evaluation, and no summary."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


FINAL_SEED = 30_000
"""Offset of the final evaluation's seed (and of the baselines' the summary compares with)."""


def reference_baselines(action_mode: str, max_degree: int) -> list[str]:
    """The heuristics drawn beside the learning curve: the naive and the strongest one (on a
    mesh, one that chooses among neighbours, which nodes without any do not have)."""
    if action_mode == "split3":
        return ["apl", "fill-local-then-forward"]
    return ["apl", "least-request"] if max_degree > 0 else ["apl"]


def git_revision(where: Path | None = None) -> str:
    """The commit the code (``where``: this package's) was trained at, with ``-dirty`` when
    tracked files differ from it: retraining at that commit alone would not give these
    weights."""
    where = where or Path(__file__).resolve().parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=5)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        revision = git("rev-parse", "HEAD")
        edited = revision and git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{revision}-dirty" if edited else revision or "unknown"


def load_config(path: str | None, overrides: list[str]) -> PPOConfig:
    """Defaults, then the config file (YAML or JSON mapping), then ``--set key=value``."""
    cfg = PPOConfig()
    if path:
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise ValueError(
                f"--config {path}: cannot read it ({error.strerror or error})"
            ) from None
        data = _yaml(text, f"config {path}") or {}
        if not isinstance(data, dict):
            raise ValueError(f"config {path}: expected a mapping of hyperparameters")
        cfg = cfg.replace(**data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        cfg = cfg.replace(**{key: _yaml(raw, f"--set {item}")})
    return cfg


def _yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{where}: not valid YAML ({' '.join(str(error).split())})") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - libraries that still read the global state
    torch.manual_seed(seed)


def evaluate_model(trainer: Trainer, scenario: Scenario, episodes: int, seed: int) -> dict:
    policy = LoadedPolicy.from_module(trainer.model)
    per_episode = run_episodes(
        scenario, policy, episodes, seed, num_envs=episodes, action_mode=trainer.env.action_mode
    )
    return summarise(per_episode)


def plot_curve(rows: list[dict], evals: list[dict], baselines: dict, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in (
        (axes[0], "return_per_agent", "return per agent"),
        (axes[1], "processed_pct", "processed %"),
    ):
        train = [(r["env_steps"], r[key]) for r in rows if r.get(key) is not None]
        if train:
            ax.plot(*zip(*train, strict=True), color="#4c72b0", alpha=0.6, label="training")
        if evals:
            ax.plot(
                [e["env_steps"] for e in evals],
                [e[key] for e in evals],
                "o-",
                color="#c44e52",
                label="evaluation (mean action)",
            )
        for (name, values), style in zip(baselines.items(), ("--", ":"), strict=False):
            ax.axhline(values[key], color="gray", linestyle=style, label=name)
        ax.set_xlabel("environment steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from ``main`` so that its help can be checked without running it."""
    parser = parser_from_doc("python -m simulator.train", __doc__)
    parser.add_argument("--scenario", default="dfaas-paise25", help="bundled name or YAML path")
    parser.add_argument("--algo", choices=ALGOS, help="default: mappo")
    parser.add_argument(
        "--env-steps",
        type=positive_int,
        default=1_296_000,
        help="environment steps to train for (each steps every agent once)",
    )
    parser.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seeds the workloads, the network and the sampling",
    )
    parser.add_argument("--out", help="output directory (default runs/SCENARIO__ALGO__SEED)")
    parser.add_argument("--config", help="YAML/JSON file of hyperparameters (PPOConfig fields)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override one"
    )
    parser.add_argument(
        "--action-mode",
        choices=("split3", "neighbours"),
        help="split3: the reference's (local, forward evenly, reject), the default of dfaas "
        "scenarios; neighbours: a share per neighbour, as a mesh routes (default elsewhere)",
    )
    parser.add_argument(
        "--eval-episodes", type=positive_int, default=50, help="episodes of the final evaluation"
    )
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="train anew into an OUT that holds a run, replacing its files (a new run is "
        "refused there otherwise)",
    )
    parser.add_argument(
        "--threads", type=non_negative_int, default=0, help="torch threads (0: default)"
    )
    parser.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    return parser


RESUME_FREE = ("eval_every", "eval_episodes")
"""Hyperparameters a resumed run may change: they say when and how much to evaluate, and no
update depends on them."""


def resume_mismatch(
    out: Path,
    scenario: str,
    mode: str,
    algo: str,
    config: PPOConfig | None = None,
    seed: int | None = None,
) -> str | None:
    """What of this run differs from the one saved in ``out`` (its checkpoint's meta), named
    by option, or None: resumed on another scenario, a run would go on silently and relabel
    its checkpoint as the new one's; resumed with other hyperparameters or another seed (the
    first run's --set or --config not repeated), it would train on with them, record them as
    the whole run's, and count its budget in updates of another size."""
    try:
        meta = checkpoint.read_meta(out)
    except CheckpointError:
        return None  # the state itself is checked when it is loaded
    saved = {
        "--scenario": meta.get("scenario"),
        "--action-mode": (meta.get("action") or {}).get("mode"),
        "--algo": meta.get("algo"),
    }
    asked = {"--scenario": scenario, "--action-mode": mode, "--algo": algo}
    differs = [k for k, v in saved.items() if v is not None and v != asked[k]]
    was = [f"{k} {saved[k]}" for k in differs]
    now = [f"{k} {asked[k]}" for k in differs]
    hyper = meta.get("hyperparameters")
    if config is not None and isinstance(hyper, dict):
        for key, value in vars(config).items():
            if key in (*RESUME_FREE, "algo") or key not in hyper or hyper[key] == value:
                continue
            was.append(f"--set {key}={_flag_value(hyper[key])}")
            now.append(f"--set {key}={_flag_value(value)}")
    if seed is not None and meta.get("seed") is not None and meta["seed"] != seed:
        was.append(f"--seed {meta['seed']}")
        now.append(f"--seed {seed}")
    if not was:
        return None
    return (
        f"{out} was trained with {' '.join(was)}, and this run asks for {' '.join(now)}: "
        f"resume with {' '.join(was)}, or train into a new --out"
    )


def _flag_value(value: object) -> str:
    """``value`` as ``--set`` reads it back (YAML): an empty string must be quoted."""
    return '""' if value == "" else str(value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    world, rank = 1, 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        world, rank = dist.get_world_size(), dist.get_rank()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.config, args.set)
        if args.algo:
            cfg = cfg.replace(algo=args.algo)
        scenario = load_scenario(args.scenario)
        mode = args.action_mode or default_action_mode(scenario)
    except (ScenarioError, PolicyError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seed_everything(args.seed + 1000 * rank)
    env = EdgeEnv(scenario, num_envs=cfg.num_envs, action_mode=mode, seed=args.seed + 1000 * rank)
    out = Path(args.out or f"runs/{scenario.name}__{cfg.algo}__{args.seed}")
    # Every process checks (the folder is shared): one that went on alone waited for the
    # others' first exchange and ended in a traceback under the message. A teacher that
    # cannot be built is refused first: it left an empty --out, or none of the old run. (A
    # resumed run imitates no more: its teacher may be gone.)
    teaches = bool(cfg.imitate) and not (args.resume and (out / STATE_FILE).is_file())
    teacher, problem = _build_teacher(cfg.imitate, env, args.seed) if teaches else (None, None)
    problem = problem or make_folder(out, "--out")
    if not problem and not args.resume and not args.overwrite:
        problem = _holds_a_run(out)
    if not problem and args.overwrite and rank == 0:  # one process removes the old run
        problem = _replace_run(out)
    if problem:  # before any work, not a traceback once the run is set up
        if rank == 0:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    per_update = cfg.num_envs * cfg.rollout_steps * world
    # The teacher's steps count towards the budget (every process imitates on its own envs).
    imitation = cfg.imitate_steps * cfg.num_envs * world if cfg.imitate else 0
    total_updates = max(math.ceil((args.env_steps - imitation) / per_update), 0)
    trainer = Trainer(env, cfg, total_updates)
    lead = rank == 0
    resumed = args.resume and (out / STATE_FILE).is_file()
    if args.resume and not resumed and rank == 0:
        print(f"--resume: no saved state in {out}; starting a new run", file=sys.stderr)
    if resumed:
        mismatch = resume_mismatch(out, scenario.name, mode, cfg.algo, cfg, args.seed)
        if mismatch:
            print(f"error: --resume: {mismatch}", file=sys.stderr)
            return 2
        try:
            trainer.load_state_dict(torch.load(out / STATE_FILE, weights_only=True))
        except pickle.UnpicklingError:
            # torch's own message suggests weights_only=False: never for a file from elsewhere.
            print(
                f"error: --resume: {out / STATE_FILE} holds objects other than tensors and "
                "numbers, so it was not loaded: it is not a training state simulator.train "
                "wrote; train into a new --out",
                file=sys.stderr,
            )
            return 2
        except (RuntimeError, KeyError, ValueError, TypeError, EOFError, OSError) as exc:
            print(
                f"error: --resume: {out / STATE_FILE} does not fit this run ({exc}); it was "
                "saved with other settings (--algo, --action-mode, --set) or is damaged: "
                "resume with the settings it was trained with, or train into a new --out",
                file=sys.stderr,
            )
            return 2
        # Go on to new episodes and new sampling noise, fixed by the seed and how far the run
        # is: rebuilt from --seed alone, the resumed run would train again on the arrivals
        # (and the noise) its first updates had. (Not the same numbers as a run never
        # stopped: the episode under way and its queues are not saved.)
        resume_seed = [args.seed + 1000 * rank, trainer.updates]
        torch.manual_seed(int(np.random.SeedSequence(resume_seed).generate_state(1)[0]))
        trainer.restart(resume_seed)
    elif teacher is not None:
        error = trainer.imitate(teacher, args.seed + 1000 * rank)
        if rank == 0 and not args.json:
            print(f"cloned {cfg.imitate}: Hellinger distance of the weights {error:.4f}")

    baselines = {}
    rows: list[dict] = []
    evals: list[dict] = []
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        if resumed:  # the curve so far, for the plot and the clock: the files are appended to
            rows, evals = _read_csv(out / PROGRESS_FILE), _read_csv(out / EVALUATIONS_FILE)
        else:  # a new run's curve starts new files
            for name in (PROGRESS_FILE, EVALUATIONS_FILE):
                (out / name).unlink(missing_ok=True)
        # On the final evaluation's episodes (its seed and count, all in one batch as
        # evaluate_model runs them): the summary sets the two side by side, and a gap
        # measured on other episodes would carry their sampling noise, about as large.
        for name in reference_baselines(mode, scenario.max_degree):
            baselines[name] = summarise(
                run_episodes(
                    scenario,
                    name,
                    args.eval_episodes,
                    FINAL_SEED + args.seed,
                    num_envs=args.eval_episodes,
                    action_mode=mode,
                )
            )
    meta = {
        **checkpoint.spec_for(mode, env.topology.max_degree),
        "algo": cfg.algo,
        "scenario": scenario.name,
        # What the operator acts by (runtime.py): the time unit the observations count in,
        # and the price of a lost request in latency targets.
        "environment": {
            "step_seconds": float(scenario.step_seconds),
            "reject_penalty": float(scenario.reject_penalty),
        },
        "hyperparameters": vars(cfg),
        "seed": args.seed,
        # Part of what the seed reproduces: torch's CPU kernels sum in another order on
        # another number of threads, and the weights drift apart from the first update.
        "torch_threads": torch.get_num_threads(),
        "processes": world,
        "git_revision": git_revision(),
        "env_steps_budget": args.env_steps,
    }

    writer = None
    if lead:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))

    written = [len(rows), len(evals)]  # rows already in progress.csv, evaluations.csv

    def save_all(final_metrics: dict | None = None, finished: bool = False) -> None:
        """Checkpoint, training state and the progress rows so far: what a crash or a kill
        leaves behind is the last evaluation's state, with its curve up to there, and a
        policy.json that says the run did not finish."""
        if not lead:
            return
        _write_csv(out / PROGRESS_FILE, rows[written[0] :])
        _write_csv(out / EVALUATIONS_FILE, evals[written[1] :])
        written[:] = [len(rows), len(evals)]
        checkpoint.save(
            out,
            trainer.model,
            {
                **meta,
                "trained_env_steps": trainer.env_steps * world,
                "finished": finished,
                "metrics": final_metrics or (evals[-1] if evals else {}),
            },
        )
        # Temp file then rename: a save cut short must not replace the last good state.
        torch.save(trainer.state_dict(), out / (STATE_FILE + ".tmp"))
        (out / (STATE_FILE + ".tmp")).replace(out / STATE_FILE)

    # A resumed run's clock goes on from where it stopped: its steps per second are the
    # whole run's steps over the whole run's time.
    started = time.perf_counter() - (rows[-1]["seconds"] if rows else 0.0)
    bar = tqdm(
        total=total_updates * per_update,
        initial=trainer.updates * per_update,
        unit="step",
        # Drawn on stderr, so with --json too: stdout keeps the one JSON line.
        disable=not lead or not sys.stderr.isatty(),
        desc=f"{scenario.name} {cfg.algo}",
    )
    # Without a terminal (a pipe to tee, a CI log) a bar draws nothing: a line per evaluation.
    log_lines = lead and not args.json and bar.disable
    interrupted = False
    with terminate_as_interrupt():
        try:
            while trainer.updates < total_updates:
                batch = trainer.collect()
                with interrupts_deferred():
                    stats = trainer.update(batch)
                bar.update(per_update)
                recent = trainer.finished[-4:]
                row = {
                    "update": trainer.updates,
                    "env_steps": trainer.env_steps * world,
                    "seconds": time.perf_counter() - started,
                    "return_per_agent": np.mean([e["return_per_agent"] for e in recent])
                    if recent
                    else None,
                    "processed_pct": np.mean([e["processed_pct"] for e in recent])
                    if recent
                    else None,
                    **stats,
                }
                row["env_steps_per_s"] = row["env_steps"] / max(row["seconds"], 1e-9)
                rows.append(row)
                if recent:
                    bar.set_postfix(
                        ret=f"{row['return_per_agent']:.1f}", proc=f"{row['processed_pct']:.1f}%"
                    )
                if lead:
                    for key, value in row.items():
                        if value is not None and key != "update":
                            writer.add_scalar(
                                key if "/" in key else f"train/{key}", value, row["env_steps"]
                            )
                    if trainer.updates % cfg.eval_every == 0:
                        result = evaluate_model(
                            trainer, scenario, cfg.eval_episodes, 20_000 + args.seed
                        )
                        evals.append({"env_steps": row["env_steps"], **result})
                        for key in ("return_per_agent", "processed_pct"):
                            writer.add_scalar(f"eval/{key}", result[key], row["env_steps"])
                        save_all()
                        if log_lines:
                            print(
                                f"{scenario.name} {cfg.algo}: {row['env_steps']:,} of "
                                f"{total_updates * per_update:,} env steps, evaluated return per "
                                f"agent {result['return_per_agent']:.1f}, processed "
                                f"{result['processed_pct']:.1f}%",
                                file=sys.stderr,
                                flush=True,
                            )
        except KeyboardInterrupt:
            interrupted = True
    bar.close()
    trained_s = time.perf_counter() - started  # the loop's: not the final evaluation's too

    final = {}
    if lead:
        if not interrupted:
            try:  # minutes of a large evaluation: Ctrl-C there still saves the updates
                with terminate_as_interrupt():
                    final = evaluate_model(
                        trainer, scenario, args.eval_episodes, FINAL_SEED + args.seed
                    )
            except KeyboardInterrupt:
                interrupted = True
        if final:
            final["eval_episodes"] = args.eval_episodes
            # The figures the summary and policy.json report, on episodes of their own.
            for key in ("return_per_agent", "processed_pct"):
                writer.add_scalar(f"final/{key}", final[key], trainer.env_steps * world)
        elif evals:  # the saved model's last figures: those of its last periodic evaluation
            last = dict(evals[-1])
            final = {"evaluated_at_env_steps": last.pop("env_steps"), **last}
        final["wall_seconds"] = trained_s
        final["trained_env_steps"] = trainer.env_steps * world
        final["env_steps_per_s"] = final["trained_env_steps"] / max(final["wall_seconds"], 1e-9)
        save_all(final, finished=not interrupted)
        plot_curve(
            rows, evals, baselines, out / "learning_curve.png", f"{scenario.name} {cfg.algo}"
        )
        writer.close()
        summary = {"out": str(out), "interrupted": interrupted, **final}
        summary.update(
            {
                f"baseline/{k}/{m}": v[m]
                for k, v in baselines.items()
                for m in ("return_per_agent", "processed_pct")
            }
        )
        print(json_line(summary) if args.json else _readable(summary))
    if world > 1:
        dist.destroy_process_group()
    return 130 if interrupted else 0


def _build_teacher(name: str, env: EdgeEnv, seed: int) -> tuple[Policy | None, str | None]:
    """The policy ``imitate`` names, built for ``env`` before the run touches its folder, or
    why it cannot be. The random states :func:`seed_everything` seeded are left as they
    were, whatever building it draws, so the run's numbers do not depend on when it was
    built."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()  # noqa: NPY002 - what seed_everything seeded
    try:
        with torch.random.fork_rng(devices=[]):
            return build_policy(name, env, seed), None
    except PolicyError as exc:
        return None, f"imitate: {exc}"
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002


PROGRESS_FILE = "progress.csv"
EVALUATIONS_FILE = "evaluations.csv"


def _holds_a_run(out: Path) -> str | None:
    """Why a new run must not train into ``out``: a run's checkpoint is there, which the new
    run's first save would replace (and a crash before it would leave beside its logs)."""
    held = [name for name in ("policy.json", STATE_FILE) if (out / name).exists()]
    if not held:
        return None
    return (
        f"--out: {str(out)!r} holds a run already ({', '.join(held)}): --resume continues "
        "it, --overwrite replaces it; or choose another --out"
    )


RUN_FILES = ("policy.pt", "policy.json", STATE_FILE, PROGRESS_FILE, EVALUATIONS_FILE)


def _replace_run(out: Path) -> str | None:
    """Remove the files of the run in ``out`` (``--overwrite``), its TensorBoard logs among
    them: left, they mixed two runs' curves in one folder. None, or why they could not be."""
    try:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        if (out / "tb").exists():
            shutil.rmtree(out / "tb")
    except OSError as error:
        return f"--overwrite: cannot remove the run in {str(out)!r} ({error})"
    return None


def _read_csv(path: Path) -> list[dict]:
    """Rows ``_write_csv`` wrote, numbers as numbers (counts as whole ones) and empty cells
    as None."""

    def number(key: str, text: str | None) -> float | int | None:
        if text in ("", None):
            return None
        return int(float(text)) if key in ("update", "env_steps", "episodes") else float(text)

    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: number(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    fields = list(rows[0])
    mode = "a" if path.exists() else "w"
    with path.open(mode, newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if mode == "w":
            w.writeheader()
        w.writerows(rows)


def _readable(summary: dict) -> str:
    lines = [f"checkpoint: {summary['out']}/policy.pt"]
    if summary["interrupted"]:
        at = summary.get("evaluated_at_env_steps")
        lines.append(
            f"  interrupted after {summary['trained_env_steps']:,} env steps: "
            + (f"the figures are its evaluation at {at:,.0f}" if at else "not yet evaluated")
        )
    for key, value in summary.items():
        if isinstance(value, float):
            lines.append(f"  {key:<44} {value:>12.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
