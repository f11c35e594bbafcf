"""Training end to end on small budgets: it learns, checkpoints round-trip safely, a layout
mismatch is refused by name, runs resume, and two processes train one policy."""

import csv
import json
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from policies import checkpoint
from policies.baselines import PolicyError
from simulator import train as train_module
from simulator.env import EdgeEnv
from simulator.episodes import build_policy, run_episodes, summarise
from simulator.scenario import load_scenario
from simulator.train import main as train_main

SMALL = ["--set", "num_envs=16", "--set", "eval_every=1000", "--eval-episodes", "16"]
TINY = ["--eval-episodes", "2", "--set", "num_envs=8"]


def train(out, env_steps: int, *extra: str) -> int:
    """``simulator.train`` on dfaas-2 into ``out``, JSON output."""
    args = ["--scenario", "dfaas-2", "--env-steps", str(env_steps), "--out", str(out), "--json"]
    return train_main([*args, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "dfaas-2"
    code = train(out, 40000, "--seed", "0", *SMALL)
    assert code == 0
    return out


def test_smoke_training_beats_random(trained):
    scenario = load_scenario("dfaas-2")
    learned = summarise(run_episodes(scenario, str(trained), 32, seed=5))
    random = summarise(run_episodes(scenario, "random", 32, seed=5))
    assert learned["return_per_agent"] > random["return_per_agent"] + 5


def test_checkpoint_files_and_safe_round_trip(trained):
    meta = json.loads((trained / "policy.json").read_text())
    for key in (
        "format_version",
        "observation",
        "action",
        "scenario",
        "hyperparameters",
        "git_revision",
        "metrics",
    ):
        assert key in meta
    assert meta["metrics"]["eval_episodes"] == 16
    state = torch.load(trained / "policy.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    policy = checkpoint.load(trained / "policy.pt")
    env = EdgeEnv(load_scenario("dfaas-2"), num_envs=3, seed=1)
    obs = env.reset()
    again = checkpoint.load(trained)
    np.testing.assert_array_equal(policy(obs, env.action_mask()), again(obs, env.action_mask()))
    assert (trained / "learning_curve.png").stat().st_size > 1000
    assert (trained / "progress.csv").read_text().startswith("update,env_steps")


def test_tensorboard_logs_hold_the_progress_rows_and_the_evaluations(trained):
    """``tb/`` carries what progress.csv and policy.json say, at the same env steps (a
    row's return only once an episode has ended; the final evaluation at the end)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = EventAccumulator(str(trained / "tb"))
    logs.Reload()
    with (trained / "progress.csv").open() as f:
        rows = list(csv.DictReader(f))
    rows = [r for r in rows if r["return_per_agent"]]  # empty until an episode has ended
    assert len(rows) > 2
    returns = logs.Scalars("train/return_per_agent")
    assert [e.step for e in returns] == [int(r["env_steps"]) for r in rows]
    assert [e.value for e in returns] == pytest.approx([float(r["return_per_agent"]) for r in rows])
    meta = json.loads((trained / "policy.json").read_text())
    for key in ("return_per_agent", "processed_pct"):
        (final,) = logs.Scalars(f"final/{key}")
        assert final.step == meta["trained_env_steps"]
        assert final.value == pytest.approx(meta["metrics"][key])


def test_spec_mismatch_names_the_field(trained):
    """A per-node (split3) checkpoint in a per-neighbour environment: the field that differs,
    and the option that evaluates it as it was trained."""
    env = EdgeEnv(load_scenario("mesh-10x3"), num_envs=1)
    with pytest.raises(PolicyError, match=r"'action\.mode' is 'split3' in the checkpoint"):
        build_policy(str(trained), env, seed=0)
    neighbours = EdgeEnv(load_scenario("dfaas-2"), num_envs=1, action_mode="neighbours")
    wanted = r"but 'neighbours' in the environment .*--action-mode split3;"
    with pytest.raises(PolicyError, match=wanted):
        build_policy(str(trained), neighbours, seed=0)


def test_a_bad_checkpoint_directory_is_explained(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match=r"policy\.pt"):
        checkpoint.load(tmp_path)


def test_resume_continues_from_the_saved_state(trained, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(trained, out)
    before = torch.load(out / "train_state.pt", weights_only=True)["updates"]
    code = train(out, 60000, "--resume", *SMALL)
    assert code == 0
    after = torch.load(out / "train_state.pt", weights_only=True)["updates"]
    assert before < after == int(np.ceil(60000 / (16 * 96)))


def raising_on_the_third_update(monkeypatch, error: BaseException) -> None:
    """Training stopped by ``error`` as its third update begins (a kill, a Ctrl-C)."""
    updates, update = 0, train_module.Trainer.update

    def update_until_the_third(self, batch):
        nonlocal updates
        updates += 1
        if updates == 3:
            raise error
        return update(self, batch)

    monkeypatch.setattr(train_module.Trainer, "update", update_until_the_third)


def test_ctrl_c_during_an_update_saves_the_update_whole(tmp_path, monkeypatch):
    """Ctrl-C arriving some minibatches into an update: the checkpoint used to hold weights
    and an optimiser part-way through it, and normalisers that had counted its rollout,
    under the number of the update before."""
    import os
    import signal

    steps = {"n": 0}
    clip = torch.nn.utils.clip_grad_norm_

    def ctrl_c_in_the_third_update(*args, **kwargs):
        steps["n"] += 1
        if steps["n"] == 2 * per_update + 3:  # the 3rd minibatch step of the third update
            os.kill(os.getpid(), signal.SIGINT)
        return clip(*args, **kwargs)

    config = train_module.PPOConfig()
    per_update = config.update_epochs * config.num_minibatches  # optimiser steps
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", ctrl_c_in_the_third_update)
    out = tmp_path / "run"
    try:
        code = train(out, 20_000, *TINY)
    except KeyboardInterrupt:  # not pytest's to catch: it would end the whole session
        pytest.fail("Ctrl-C escaped simulator.train instead of saving and exiting 130")
    assert code == 130  # interrupted
    state = torch.load(out / train_module.STATE_FILE, weights_only=True)
    assert state["updates"] == 3
    (step,) = {float(v["step"]) for v in state["optimiser"]["state"].values()}
    assert step == 3 * per_update
    # Both normalisers have counted the same three rollouts (not four, one of them half-used).
    counts = float(state["value_norm"]["count"]), float(state["model"]["obs_norm.count"])
    assert counts[0] == pytest.approx(counts[1])


def test_minibatches_are_as_many_as_asked_and_one_row_trains_without_nan(tmp_path):
    """One agent, one environment, three steps per rollout, two minibatches: slices of
    3 // 2 rows made three minibatches, and each one's single advantage had a NaN std, so
    the weights went NaN and the run ended in a traceback with no policy saved."""
    scenario = tmp_path / "one-node.yaml"
    scenario.write_text("extends: dfaas-2\nname: one-node\nnodes:\n  - {name: node_0}\n")
    out = tmp_path / "run"
    settings = ["num_envs=1", "rollout_steps=3", "num_minibatches=2", "update_epochs=2"]
    argv = ["--scenario", str(scenario), "--env-steps", "6", "--out", str(out), "--json"]
    assert (
        train_main([*argv, "--eval-episodes", "1", *(a for s in settings for a in ("--set", s))])
        == 0
    )
    state = torch.load(out / train_module.STATE_FILE, weights_only=True)
    (step,) = {float(v["step"]) for v in state["optimiser"]["state"].values()}
    assert step == state["updates"] * 2 * 2  # updates x epochs x minibatches
    weights = torch.load(out / "policy.pt", weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_progress_rows_are_on_disk_at_every_evaluation(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    raising_on_the_third_update(monkeypatch, RuntimeError("killed"))
    with pytest.raises(RuntimeError, match="killed"):
        train(out, 3000, *TINY, "--set", "eval_every=1")
    assert _progress_updates(out) == [1, 2]
    monkeypatch.undo()
    # A new run into a run's folder would replace its checkpoint at the first save: refused.
    capsys.readouterr()
    assert train(out, 3000, *TINY) == 2
    assert "holds a run already (policy.json, train_state.pt): --resume" in capsys.readouterr().err
    assert train(out, 3000, *TINY, "--overwrite") == 0  # asked for: a new run, a new curve
    assert _progress_updates(out) == [1, 2, 3, 4]
    assert len(list((out / "tb").iterdir())) == 1  # one run's TensorBoard log, not two
    # --resume with nothing to resume from starts afresh, so its curve starts afresh too,
    # and says so: a mistyped --out would otherwise throw hours of training away unseen.
    (out / train_module.STATE_FILE).unlink()
    capsys.readouterr()
    assert train(out, 3000, *TINY, "--resume") == 0
    assert _progress_updates(out) == [1, 2, 3, 4]
    assert f"--resume: no saved state in {out}; starting a new run" in capsys.readouterr().err


def test_a_state_that_does_not_fit_is_refused_by_resume_and_saves_are_whole(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, 3000, *TINY) == 0
    state = out / train_module.STATE_FILE
    assert state.is_file() and not (out / (train_module.STATE_FILE + ".tmp")).exists()
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a save cut short
    capsys.readouterr()
    assert train(out, 6000, *TINY, "--resume") == 2
    err = capsys.readouterr().err
    assert "error: --resume:" in err and "train into a new --out" in err


class NotATensor:
    """Anything torch's weights-only loader refuses to build."""


@pytest.mark.parametrize(
    ("saved", "said"),
    [
        (lambda: {"x": NotATensor()}, "holds objects other than tensors"),
        (lambda: [1, 2], "does not fit this run"),
        (None, "does not fit this run"),  # no policy.json beside the state
    ],
    ids=["foreign-object", "a-list", "no-policy-json"],
)
def test_a_foreign_training_state_is_refused_by_resume_without_a_traceback(
    tmp_path, capsys, saved, said
):
    """A state of other objects, or of another shape, escaped as UnpicklingError (whose own
    text suggests weights_only=False) or TypeError tracebacks; a state without its
    policy.json, as FileNotFoundError."""
    out = tmp_path / "run"
    assert train(out, 3000, *TINY) == 0
    if saved is None:
        (out / "policy.json").unlink()
        (out / train_module.STATE_FILE).write_bytes(b"")  # and the state damaged
    else:
        torch.save(saved(), out / train_module.STATE_FILE)
    capsys.readouterr()
    assert train(out, 6000, *TINY, "--resume") == 2
    err = capsys.readouterr().err
    assert "error: --resume:" in err and said in err and "train into a new --out" in err
    assert "weights_only=False" not in err


def test_resuming_on_another_scenario_is_refused_naming_the_option(tmp_path, capsys):
    """It used to go on silently and relabel the checkpoint as the other scenario's (the
    --help's resume example names no --scenario, so it falls back to the default)."""
    out = tmp_path / "run"
    assert train(out, 3000, *TINY) == 0  # dfaas-2
    args = ["--scenario", "dfaas-paise25", "--env-steps", "6000", "--out", str(out), "--resume"]
    capsys.readouterr()
    assert train_main([*args, *TINY]) == 2
    err = capsys.readouterr().err
    assert f"{out} was trained with --scenario dfaas-2, and this run asks for --scenario " in err
    assert "dfaas-paise25: resume with --scenario dfaas-2" in err
    assert json.loads((out / "policy.json").read_text())["scenario"] == "dfaas-2"


def test_without_a_terminal_each_evaluation_is_a_line_on_stderr(tmp_path, capsys):
    """A progress bar draws nothing into a pipe (make train | tee log): the run would say
    nothing for minutes; it says how far it is at each evaluation instead."""
    args = ["--scenario", "dfaas-2", "--env-steps", "3000", "--out", str(tmp_path / "run")]
    assert train_main([*args, *TINY, "--set", "eval_every=1"]) == 0
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if line.startswith("dfaas-2 mappo: ")]
    assert len(lines) >= 2 and "env steps, evaluated return per agent" in lines[0], lines


def _progress_updates(out) -> list[int]:
    with (out / "progress.csv").open() as f:
        return [int(row["update"]) for row in csv.DictReader(f)]


def test_same_seed_same_policy(tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        train(out, 3000, *TINY)
        outs.append(torch.load(out / "policy.pt", weights_only=True))
    for key in outs[0]:
        torch.testing.assert_close(outs[0][key], outs[1][key])


def test_two_processes_train_one_policy_with_torchrun(tmp_path):
    # torch.distributed.run is what the torchrun script runs; the module form guarantees the
    # same interpreter (and installed project) as the tests.
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    out = tmp_path / "ddp"
    command = [
        *torchrun,
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "simulator.train",
        "--scenario",
        "dfaas-2",
        "--env-steps",
        "6000",
        "--out",
        str(out),
        "--json",
        "--eval-episodes",
        "2",
        "--set",
        "num_envs=8",
        "--threads",
        "1",
    ]
    p = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    meta = json.loads((out / "policy.json").read_text())
    assert meta["processes"] == 2
    assert meta["trained_env_steps"] >= 6000
    # Again into the same folder: refused by every process, said once. Only the first
    # checked, and the second went on into the first exchange and died there in a traceback.
    p = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert p.stderr.count("holds a run already") == 1, p.stderr[-2000:]
    assert "[rank1]" not in p.stderr and "RuntimeError" not in p.stderr, p.stderr[-2000:]


def test_ippo_trains_with_local_critics(tmp_path):
    out = tmp_path / "ippo"
    code = train(out, 3000, "--algo", "ippo", *TINY)
    assert code == 0
    meta = json.loads((out / "policy.json").read_text())
    assert meta["network"]["critic"] == "ippo" and meta["algo"] == "ippo"
    model = checkpoint.load_module(out)
    assert model.critic[0].in_features == model.obs_dim  # local observation only


def test_resuming_with_other_hyperparameters_is_refused_naming_them(tmp_path, capsys):
    """--resume took whatever this invocation said (the defaults, when the --set or --config
    of the first run was not repeated, as in the --help's own resume example), went on with
    them, rewrote policy.json's hyperparameters and seed as if the whole run had used them,
    and counted the budget in updates of the new size: here it stopped at half of it."""
    out = tmp_path / "run"
    first = ["--set", "learning_rate=3e-4", "--set", "gamma=0.9", "--seed", "3"]
    assert train(out, 1536, *TINY, *first) == 0
    capsys.readouterr()
    assert train(out, 3072, "--eval-episodes", "2", "--resume") == 2
    err = capsys.readouterr().err
    assert "error: --resume:" in err and "Traceback" not in err, err
    for words in ("--set learning_rate=0.0003", "--set gamma=0.9", "--set num_envs=8", "--seed 3"):
        assert words in err, err
    meta = json.loads((out / "policy.json").read_text())
    assert meta["hyperparameters"]["learning_rate"] == 3e-4 and meta["seed"] == 3
    # The same settings resume, and train to the budget asked for.
    assert train(out, 3072, *TINY, *first, "--resume") == 0
    assert json.loads((out / "policy.json").read_text())["trained_env_steps"] == 3072


def test_the_summary_compares_with_the_baselines_on_the_final_evaluations_episodes(
    tmp_path, capsys
):
    """The trained policy's final figures and the baselines beside them in the summary were
    drawn from other episodes (seed 30000+s and --eval-episodes, against 10000+s and the
    hyperparameter eval_episodes): on dfaas-paise25 that alone moves fill-local-then-forward
    by up to a point of processed %, the size of the gaps a trained policy is judged by."""
    assert train(tmp_path / "run", 1536, *TINY, "--seed", "1") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    scenario = load_scenario("dfaas-2")
    for name in ("apl", "fill-local-then-forward"):
        same = summarise(run_episodes(scenario, name, 2, 30_000 + 1, num_envs=2))
        for key in ("return_per_agent", "processed_pct"):
            assert summary[f"baseline/{name}/{key}"] == same[key], (name, key)


def test_the_checkpoint_records_the_time_step_and_reject_price_the_operator_reads(tmp_path):
    """The operator reads a policy's time unit and the price of a lost request from the
    checkpoint's ``environment`` section (runtime.py: step_seconds 1 and reject_penalty 4
    where it is absent), and simulator.train never wrote one: a policy trained on 5-second
    steps would see its backlog feature five times too large, and rollout price rejects at
    another scenario's penalty."""
    scenario = tmp_path / "mesh-5s.yaml"
    scenario.write_text("extends: mesh-10x3\nstep_seconds: 5\nreject_penalty: 8\n")
    out = tmp_path / "run"
    args = ["--scenario", str(scenario), "--env-steps", "256", "--out", str(out), "--json"]
    assert train_main([*args, *TINY, "--set", "rollout_steps=32"]) == 0
    meta = checkpoint.load(out).meta
    assert meta["environment"] == {"step_seconds": 5.0, "reject_penalty": 8.0}


def test_a_mesh_whose_nodes_have_no_neighbours_trains_beside_the_baselines_it_can_run(
    tmp_path, capsys
):
    """least-request, the mesh's strongest baseline, chooses among neighbours: on nodes
    without any it raised, and training ended in its traceback before the first update."""
    scenario = tmp_path / "single.yaml"
    scenario.write_text(
        "name: single\nnodes: [{name: a}]\nreward: latency\nsteps: 50\nstep_seconds: 1\n"
        "services:\n  - name: f\n    latency_target_ms: 500\n    request_classes:\n"
        "      - cpu: {min: 1, mean: 5, max: 10, std: 2}\n"
        "        ram: {min: 1, mean: 10, max: 20, std: 2}\n"
        "workload: {default: {kind: poisson, rate: 20}}\n"
    )
    out = tmp_path / "run"
    args = ["--scenario", str(scenario), "--env-steps", "256", "--out", str(out), "--json"]
    assert train_main([*args, *TINY, "--set", "rollout_steps=32"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "baseline/apl/return_per_agent" in summary
    assert not any(key.startswith("baseline/least-request") for key in summary)


def test_ctrl_c_keeps_the_last_evaluations_metrics_in_the_checkpoint(tmp_path, monkeypatch):
    """After Ctrl-C, the checkpoint is the last update's and policy.json said so by its last
    periodic evaluation's metrics, until the save on the way out replaced them with timings
    alone: the interrupted run's checkpoint then carried no figure of how well it routes."""
    out = tmp_path / "run"
    raising_on_the_third_update(monkeypatch, KeyboardInterrupt())
    assert train(out, 3000, *TINY, "--set", "eval_every=1") == 130
    metrics = json.loads((out / "policy.json").read_text())["metrics"]
    assert metrics["trained_env_steps"] == 2 * 8 * 96
    for key in ("return_per_agent", "processed_pct"):
        assert key in metrics, sorted(metrics)


def test_a_resumed_run_goes_on_to_new_workloads_not_the_first_ones_again(tmp_path, monkeypatch):
    """--resume rebuilt the environments and the sampling from --seed alone: a resumed run
    trained again on the very arrivals (and the same sampling noise) its first updates had,
    instead of going on to new ones as the run it continues would have."""
    seen: list[np.ndarray] = []
    step = EdgeEnv.step

    def recording(self, actions):
        if self.num_envs == 8:  # the training environments (TINY), not the evaluations'
            seen.append(self.arrivals[:, self.t].copy())
        return step(self, actions)

    monkeypatch.setattr(EdgeEnv, "step", recording)
    out = tmp_path / "run"
    assert train(out, 1536, *TINY) == 0  # 2 updates of 96 steps: within the first episode
    first, seen[:] = list(seen), []
    assert train(out, 3072, *TINY, "--resume") == 0
    assert len(first) == len(seen) == 192
    replayed = sum(np.array_equal(a, b) for a, b in zip(first, seen, strict=True))
    assert replayed == 0, f"{replayed} of 192 steps replayed the first run's arrivals"


def test_the_checkpoint_records_the_torch_threads_its_seed_reproduces_on(tmp_path):
    """The same seed gives the same weights on the same number of torch threads only (CPU
    kernels sum in another order on another count): policy.json says how many it had."""
    assert train(tmp_path / "run", 1536, *TINY, "--threads", "1") == 0
    assert json.loads((tmp_path / "run" / "policy.json").read_text())["torch_threads"] == 1


def test_the_training_time_leaves_out_the_final_evaluation(tmp_path, monkeypatch, capsys):
    """wall_seconds and env_steps_per_s are the training loop's: they counted the final
    evaluation (and its episodes) as training time."""
    clock = [0.0]
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    real = train_module.evaluate_model

    def slow_final(trainer, scenario, episodes, seed):
        if seed == train_module.FINAL_SEED:
            clock[0] += 1000.0  # the final evaluation takes "1000 s"
        return real(trainer, scenario, episodes, seed)

    monkeypatch.setattr(train_module, "evaluate_model", slow_final)
    clock[0] = 5.0
    assert train(tmp_path / "run", 3000, *TINY) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["wall_seconds"] < 1000.0


def test_sigterm_stops_a_run_as_ctrl_c_does_and_the_checkpoint_says_it_is_unfinished(
    tmp_path, monkeypatch, capsys
):
    """SIGTERM (timeout, a scheduler) killed the run: nothing saved since the last periodic
    evaluation, no summary, and the checkpoint left looked like a finished run's."""
    import os
    import signal

    calls, step = {"n": 0}, EdgeEnv.step

    def terminated_while_collecting(self, actions):
        calls["n"] += self.num_envs == 8  # the training environments (TINY)
        if calls["n"] == 150:  # in the second rollout of 96 steps
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, actions)

    monkeypatch.setattr(EdgeEnv, "step", terminated_while_collecting)
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    args = ["--scenario", "dfaas-2", "--env-steps", "20000", "--out", str(out), *TINY]
    assert train_main(args) == 130
    assert signal.getsignal(signal.SIGTERM) is before
    meta = json.loads((out / "policy.json").read_text())
    assert meta["finished"] is False and meta["env_steps_budget"] == 20_000
    assert meta["trained_env_steps"] == 8 * 96
    assert "interrupted after 768 env steps" in capsys.readouterr().out


def test_ctrl_c_in_the_final_evaluation_still_saves_every_update(tmp_path, monkeypatch):
    """The final evaluation ran outside the interrupt's handling: Ctrl-C there ended in a
    traceback and the checkpoint missed every update since the last periodic one."""
    evaluate = train_module.evaluate_model

    def interrupted_at_the_end(trainer, scenario, episodes, seed):
        if seed >= train_module.FINAL_SEED:
            raise KeyboardInterrupt
        return evaluate(trainer, scenario, episodes, seed)

    monkeypatch.setattr(train_module, "evaluate_model", interrupted_at_the_end)
    out = tmp_path / "run"
    try:
        code = train(out, 3072, *TINY, "--set", "eval_every=3")
    except KeyboardInterrupt:  # not pytest's to catch: it would end the whole session
        pytest.fail("Ctrl-C in the final evaluation escaped simulator.train")
    assert code == 130
    meta = json.loads((out / "policy.json").read_text())
    assert meta["trained_env_steps"] == 4 * 8 * 96 and meta["finished"] is False
    assert meta["metrics"]["evaluated_at_env_steps"] == 3 * 8 * 96
    state = torch.load(out / train_module.STATE_FILE, weights_only=True)
    assert state["updates"] == 4


def test_a_resumed_run_keeps_its_curve_and_its_clock(tmp_path, monkeypatch, capsys):
    """A resumed run drew its learning curve from the resumed part alone (resuming a finished
    run drew an empty one), and counted its steps per second over the whole run's steps but
    this session's seconds (16 million steps a second)."""
    drawn: list[tuple[list, list]] = []
    monkeypatch.setattr(
        train_module, "plot_curve", lambda rows, evals, *_: drawn.append((rows, evals))
    )
    out = tmp_path / "run"
    assert train(out, 1536, *TINY, "--set", "eval_every=1") == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads((out / "policy.json").read_text())["finished"] is True
    assert train(out, 3072, *TINY, "--set", "eval_every=1", "--resume") == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows, evals = drawn[-1]
    assert [r["update"] for r in rows] == [1, 2, 3, 4]
    assert [e["env_steps"] for e in evals] == [768, 1536, 2304, 3072]
    with (out / "evaluations.csv").open() as f:
        assert [int(row["env_steps"]) for row in csv.DictReader(f)] == [768, 1536, 2304, 3072]
    seconds = [r["seconds"] for r in rows]
    assert seconds == sorted(seconds) and second["wall_seconds"] > first["wall_seconds"]
    assert second["env_steps_per_s"] < 2 * first["env_steps_per_s"]


def test_the_recorded_revision_says_when_the_code_differed_from_it(tmp_path):
    """A tree with local edits recorded the clean commit, whose retraining does not give
    the weights the README promises."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
            cwd=tmp_path, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return done.stdout.strip()

    git("init", "-q")
    (tmp_path / "ppo.py").write_text("lr = 1\n")
    git("add", "ppo.py")
    git("commit", "-qm", "first")
    head = git("rev-parse", "HEAD")
    assert train_module.git_revision(tmp_path) == head
    (tmp_path / "notes.txt").write_text("untracked files do not train\n")
    assert train_module.git_revision(tmp_path) == head
    (tmp_path / "ppo.py").write_text("lr = 2\n")
    assert train_module.git_revision(tmp_path) == f"{head}-dirty"
