"""Warm-starting PPO from a heuristic: the clone acts like its teacher, the critic warm-up
leaves the clone alone, and a teacher that does not exist is refused by name."""

import json

import numpy as np
import pytest
import torch

from policies.checkpoint import LoadedPolicy
from policies.imitation import clone, teacher_data
from policies.mappo import Trainer
from policies.network import ActorCritic
from policies.ppo import PPOConfig
from simulator.env import EdgeEnv
from simulator.episodes import build_policy, run_episodes, summarise
from simulator.scenario import load_scenario
from simulator.train import main as train_main


def test_clone_fits_a_teacher_that_depends_on_the_state():
    """A teacher that keeps most requests local on quiet input and forwards most on busy
    input; the clone's Hellinger distance falls far below an untrained actor's."""
    rng = np.random.default_rng(0)
    obs = rng.uniform(0, 150, size=(4000, 6)).astype(np.float32)
    busy = obs[:, :1] > 75
    target = np.where(busy, [0.3, 0.6, 0.1], [0.8, 0.15, 0.05]).astype(np.float32)
    mask = np.ones((4000, 3), bool)
    torch.manual_seed(0)
    model = ActorCritic(6, 3, hidden=32)
    before = clone(model, obs, mask, target, updates=0)
    after = clone(model, obs, mask, target, updates=400, batch=500)
    assert before > 0.05
    assert after < 0.01
    weights = LoadedPolicy.from_module(model)(obs[None], mask)[0]
    clear = np.abs(obs[:, 0] - 75) > 15  # away from the teacher's jump
    assert np.median(weights[clear & ~busy[:, 0], 0]) == pytest.approx(0.8, abs=0.04)
    assert np.median(weights[clear & busy[:, 0], 1]) == pytest.approx(0.6, abs=0.04)


def test_teacher_data_labels_every_agent_state_with_the_teachers_weights():
    env = EdgeEnv(load_scenario("dfaas-2"), num_envs=3, seed=0)
    teacher = build_policy("fill-local-then-forward", env, seed=0)
    obs, mask, target = teacher_data(env, teacher, 5, 50.0, np.random.default_rng(0))
    assert obs.shape == (5 * 3 * 2, 6) and target.shape == mask.shape == (30, 3)
    np.testing.assert_allclose(target.sum(-1), 1.0, atol=1e-6)
    again = teacher(obs.reshape(5 * 3, 2, 6), mask[:2])  # the env's layout: 2 agents a row
    np.testing.assert_allclose(again.reshape(-1, 3), target, atol=1e-6)


def test_critic_warmup_leaves_the_cloned_actor_alone():
    env = EdgeEnv(load_scenario("dfaas-2"), num_envs=4, seed=0)
    cfg = PPOConfig(
        num_envs=4,
        rollout_steps=8,
        imitate="fill-local-then-forward",
        imitate_steps=20,
        critic_warmup=1,
    )
    torch.manual_seed(0)
    trainer = Trainer(env, cfg, total_updates=3)
    trainer.imitate(build_policy(cfg.imitate, env, seed=0), seed=0)
    assert trainer.env_steps == 20 * 4
    actor, critic = trainer.model.actor, trainer.model.critic
    cloned, untrained = _copy(actor), _copy(critic)
    trainer.update(trainer.collect())
    assert _same(cloned, actor) and not _same(untrained, critic)
    trainer.update(trainer.collect())  # past the warm-up the actor learns
    assert not _same(cloned, actor)


def _copy(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _same(saved: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return all(torch.equal(a, b) for a, b in zip(saved, module.parameters(), strict=True))


def test_training_from_a_clone_starts_where_the_teacher_is(tmp_path, capsys):
    """With a budget that ends inside the critic warm-up, the checkpoint is the clone: it
    scores like its teacher, far above the random actor PPO would start from."""
    out = tmp_path / "clone"
    args = ["--scenario", "dfaas-2", "--env-steps", "4000", "--out", str(out), "--seed", "0"]
    code = train_main([*args, "--eval-episodes", "2", "--set", "imitate=fill-local-then-forward"])
    assert code == 0
    assert "cloned fill-local-then-forward" in capsys.readouterr().out
    scenario = load_scenario("dfaas-2")
    cloned = summarise(run_episodes(scenario, str(out), 16, seed=3))
    teacher = summarise(run_episodes(scenario, "fill-local-then-forward", 16, seed=3))
    random = summarise(run_episodes(scenario, "random", 16, seed=3))
    assert cloned["processed_pct"] == pytest.approx(teacher["processed_pct"], abs=1.5)
    assert cloned["return_per_agent"] > random["return_per_agent"] + 20


def test_the_teachers_steps_count_towards_the_budget(tmp_path):
    """--env-steps is the run's whole budget, the teacher's data included, not on top of it."""
    out = tmp_path / "budget"
    args = ["--scenario", "dfaas-2", "--env-steps", "64", "--out", str(out), "--json"]
    teacher = ["--set", "imitate=apl", "--set", "imitate_steps=16", "--set", "num_envs=4"]
    assert train_main([*args, "--eval-episodes", "1", *teacher]) == 0
    meta = json.loads((out / "policy.json").read_text())
    assert meta["trained_env_steps"] == 64  # 16 x 4 of the teacher's, no PPO update on top


def test_an_unknown_teacher_is_refused_by_name_before_the_output_is_touched(tmp_path, capsys):
    """The refusal came once the run was set up: it left an empty --out behind, and under
    --overwrite the old run was already gone."""
    args = ["--scenario", "dfaas-2", "--env-steps", "100", "--set", "imitate=fastest-node"]
    assert train_main([*args, "--out", str(tmp_path / "x")]) == 2
    assert "imitate" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    old = tmp_path / "old"
    keep = ["--scenario", "dfaas-2", "--env-steps", "64", "--eval-episodes", "1", "--json"]
    assert train_main([*keep, "--set", "num_envs=4", "--out", str(old)]) == 0
    before = (old / "policy.pt").read_bytes()
    assert train_main([*args, "--out", str(old), "--overwrite"]) == 2
    assert (old / "policy.pt").read_bytes() == before


def test_a_resumed_run_does_not_need_its_teacher_any_more(tmp_path, capsys):
    """A resumed run imitates no more, so a teacher checkpoint moved away since must not
    stop it (the teacher's check before --out refused it)."""
    import shutil

    from policies.checkpoint import BUNDLED

    teacher = tmp_path / "teacher"
    shutil.copytree(BUNDLED / "dfaas-paise25", teacher)
    out = tmp_path / "run"
    args = ["--scenario", "dfaas-2", "--out", str(out), "--eval-episodes", "1", "--json"]
    args += ["--set", f"imitate={teacher}", "--set", "imitate_steps=8", "--set", "num_envs=4"]
    args += ["--set", "rollout_steps=16"]
    assert train_main([*args, "--env-steps", "96"]) == 0
    shutil.rmtree(teacher)
    assert train_main([*args, "--env-steps", "160", "--resume"]) == 0, capsys.readouterr().err
    assert json.loads((out / "policy.json").read_text())["trained_env_steps"] >= 160
