"""The default policies shipped in the package: small, safe to load, fitting their scenario
family, and useful on a topology they were not trained on."""

import pytest
import torch

from policies import checkpoint
from simulator.env import EdgeEnv
from simulator.episodes import build_policy, run_episodes, summarise
from simulator.scenario import load_scenario


@pytest.mark.parametrize("name", ["dfaas-paise25", "mesh-10x3"])
def test_bundled_checkpoint_is_small_safe_and_fits(name):
    directory = checkpoint.BUNDLED / name
    assert (directory / "policy.pt").stat().st_size < 200_000
    state = torch.load(directory / "policy.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    env = EdgeEnv(load_scenario(name), num_envs=2, seed=0)
    policy = build_policy("default", env, seed=0)
    actions = policy(env.reset(), env.action_mask())
    assert actions.shape == (2, env.num_agents, env.action_dim)
    assert actions.sum(-1) == pytest.approx(1.0, abs=1e-5)
    assert (actions[:, ~env.action_mask()] == 0).all()


def test_bundled_dfaas_policy_beats_always_local():
    scenario = load_scenario("dfaas-paise25")
    learned = summarise(run_episodes(scenario, "default", 20, seed=3))
    apl = summarise(run_episodes(scenario, "apl", 20, seed=3))
    assert learned["return_per_agent"] > apl["return_per_agent"] + 15
    assert learned["processed_pct"] > apl["processed_pct"] + 8


def test_mesh_policy_runs_unchanged_on_another_topology_and_beats_always_local():
    other = load_scenario("mesh-6x3")  # 6 nodes instead of 10, same maximum degree
    learned = summarise(run_episodes(other, "default", 4, seed=1))
    apl = summarise(run_episodes(other, "apl", 4, seed=1))
    assert learned["cost_per_request_s"] < 0.5 * apl["cost_per_request_s"]


def test_no_bundled_policy_for_an_unseen_layout_is_explained():
    with pytest.raises(checkpoint.CheckpointError, match="max degree 7"):
        checkpoint.bundled_for("neighbours", 7)
