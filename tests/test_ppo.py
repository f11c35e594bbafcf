"""PPO's loss pieces on cases small enough to compute by hand, and the action head."""

import dataclasses

import numpy as np
import pytest
import torch

from policies.distributions import MaskedDirichlet
from policies.mappo import Trainer
from policies.network import RunningNorm
from policies.ppo import PPOConfig, ValueNormaliser, gae, policy_loss, value_loss
from simulator.env import EdgeEnv
from simulator.scenario import load_scenario


def test_gae_by_hand():
    # Two steps, one environment; the episode ends after step 1.
    rewards = torch.tensor([[1.0], [2.0]])
    values = torch.tensor([[0.5], [1.0]])
    dones = torch.tensor([[0.0], [1.0]])
    next_value = torch.tensor([9.0])  # belongs to the next episode: must be ignored
    gamma, lam = 0.9, 0.5
    adv, ret = gae(rewards, values, next_value, dones, gamma, lam)
    delta1 = 2.0 - 1.0  # no bootstrap after the end
    delta0 = 1.0 + gamma * 1.0 - 0.5
    assert adv[1, 0] == pytest.approx(delta1)
    assert adv[0, 0] == pytest.approx(delta0 + gamma * lam * delta1)
    assert ret[:, 0].tolist() == pytest.approx((adv[:, 0] + values[:, 0]).tolist())


def test_gae_bootstraps_a_time_limit_from_the_final_observations_value_and_cuts_the_trace():
    """Three steps, the episode cut by its length after step 1: step 1's future is the final
    observation's value, not nothing, and step 2 (the next episode) is not in step 1's trace."""
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[0.5], [1.0], [4.0]])
    dones = torch.tensor([[0.0], [1.0], [0.0]])
    final_values = torch.tensor([[0.0], [6.0], [0.0]])
    next_value = torch.tensor([5.0])
    gamma, lam = 0.9, 0.5
    adv, _ = gae(rewards, values, next_value, dones, gamma, lam, final_values)
    delta2 = 3.0 + gamma * 5.0 - 4.0
    delta1 = 2.0 + gamma * 6.0 - 1.0
    delta0 = 1.0 + gamma * 1.0 - 0.5
    assert adv[:, 0].tolist() == pytest.approx([delta0 + gamma * lam * delta1, delta1, delta2])
    terminal, _ = gae(rewards, values, next_value, dones, gamma, lam)
    assert terminal[1, 0] == pytest.approx(2.0 - 1.0)


def test_gae_bootstraps_when_the_episode_goes_on():
    adv, _ = gae(
        torch.tensor([[0.0]]),
        torch.tensor([[0.0]]),
        torch.tensor([2.0]),
        torch.tensor([[0.0]]),
        0.5,
        1.0,
    )
    assert adv[0, 0] == pytest.approx(1.0)


def test_policy_loss_clips_the_ratio():
    old = torch.zeros(2)
    new = torch.log(torch.tensor([1.5, 0.5]))  # ratios 1.5 and 0.5
    adv = torch.tensor([1.0, -1.0])
    loss, _, clip_frac = policy_loss(new, old, adv, clip=0.2)
    # min(1.5*1, 1.2*1) = 1.2 ; min(0.5*-1, 0.8*-1) = -0.8 ; loss = -(1.2 - 0.8)/2
    assert loss.item() == pytest.approx(-0.2)
    assert clip_frac.item() == 1.0


def test_value_loss_is_pessimistic_over_the_clipped_value():
    new, old, target = torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([2.0])
    # Unclipped error 0, clipped value 0.2 has error 1.8: the max is taken.
    assert value_loss(new, old, target, clip=0.2, huber_delta=10.0).item() == pytest.approx(
        0.5 * 1.8**2
    )


def test_value_normaliser_matches_numpy_and_round_trips():
    rng = np.random.default_rng(0)
    a, b = rng.normal(5, 3, 1000), rng.normal(-2, 1, 500)
    norm = ValueNormaliser()
    norm.update(torch.tensor(a))
    norm.update(torch.tensor(b))
    both = np.concatenate([a, b])
    assert norm.mean.item() == pytest.approx(both.mean(), rel=1e-4)
    assert norm.var.item() == pytest.approx(both.var(), rel=1e-4)
    x = torch.tensor([1.0, 7.0])
    assert norm.denormalise(norm.normalise(x)).tolist() == pytest.approx(x.tolist())


def test_running_norm_matches_numpy():
    rng = np.random.default_rng(1)
    data = rng.normal([1.0, 100.0], [2.0, 50.0], (3, 200, 2))
    norm = RunningNorm(2)
    for chunk in data:
        norm.update(torch.tensor(chunk))
    flat = data.reshape(-1, 2)
    assert norm.mean.numpy() == pytest.approx(flat.mean(0), rel=1e-3)
    assert norm.var.numpy() == pytest.approx(flat.var(0), rel=1e-3)


def test_masked_dirichlet_is_the_dirichlet_of_the_valid_entries():
    torch.manual_seed(0)
    alpha = torch.tensor([[2.0, 9.0, 1.5, 3.0]])
    mask = torch.tensor([[True, False, True, True]])
    d = MaskedDirichlet(alpha, mask)
    ref = torch.distributions.Dirichlet(alpha[0, [0, 2, 3]])
    x = d.sample()
    assert x[0, 1] == 0 and x.sum().item() == pytest.approx(1.0)
    assert d.log_prob(x).item() == pytest.approx(ref.log_prob(x[0, [0, 2, 3]]).item(), abs=1e-4)
    assert d.entropy().item() == pytest.approx(ref.entropy().item(), abs=1e-5)
    assert d.mean[0].tolist() == pytest.approx([2 / 6.5, 0.0, 1.5 / 6.5, 3 / 6.5])


def test_config_rejects_unknown_hyperparameters():
    with pytest.raises(ValueError, match="learning_rat"):
        PPOConfig().replace(learning_rat=1e-3)
    assert PPOConfig().entropy_coef(1.0) == PPOConfig().ent_coef_end


def test_config_reads_numbers_as_the_field_type_and_names_a_wrong_one():
    cfg = PPOConfig().replace(learning_rate="3e-4", gamma=1)
    assert cfg.learning_rate == 3e-4 and isinstance(cfg.gamma, float)
    with pytest.raises(ValueError, match="num_envs: expected int"):
        PPOConfig().replace(num_envs="many")
    with pytest.raises(ValueError, match="anneal_lr"):
        PPOConfig().replace(anneal_lr=1)


def test_the_accepted_share_is_never_negative():
    """Requests lost with a failing node's queue arrived in earlier steps and can outnumber
    this step's arrivals: a share of -0.03 was fed to the acceptance bonus."""
    from policies.mappo import _accepted_share

    info = {"arrivals": np.array([[[10, 0, 4]]]), "lost": np.array([[[13, 2, 1]]])}
    assert _accepted_share(info, 1).tolist() == [[0.0, 1.0, 0.75]]


@pytest.mark.parametrize("scenario", ["mesh-10x3", "dfaas-2"])
@pytest.mark.parametrize("bonus", [0.0, 3.0])
def test_the_acceptance_bonus_is_what_the_trainer_adds_to_either_reward(scenario, bonus):
    """The bonus makes up for the DFaaS reward's blind spot (a reject stops counting once a
    forward was refused), and on the latency reward prices a loss dearer in training than
    costs count it (PPOConfig.accept_bonus says what that bought): added to both, and
    nothing added without it."""
    from policies.mappo import Trainer
    from simulator.env import EdgeEnv
    from simulator.scenario import load_scenario

    torch.manual_seed(0)
    env = EdgeEnv(load_scenario(scenario), num_envs=2, seed=0)
    seen, step = [], env.step

    def recording(actions):
        out = step(actions)
        seen.append(out[1])
        return out

    env.step = recording
    cfg = PPOConfig(num_envs=2, rollout_steps=3, accept_bonus=bonus)
    batch = Trainer(env, cfg, total_updates=1).collect()
    added = batch.rewards.numpy() - np.stack(seen)
    assert np.all(added >= -1e-5) and np.all(added <= bonus + 1e-5)
    assert np.any(added > 1e-3) == (bonus > 0)


def test_a_rollout_values_the_observation_each_episode_ended_on():
    """What gae bootstraps a time limit from: the critic's value of the observation the
    episode ended on (before the reset), and nothing where no episode ended."""
    env = EdgeEnv(dataclasses.replace(load_scenario("dfaas-2"), steps=3), num_envs=2, seed=0)
    step, finals = env.step, []

    def recording(actions):
        obs, rewards, done, info = step(actions)
        if done:
            finals.append(torch.as_tensor(obs, dtype=torch.float32))
        return obs, rewards, done, info

    env.step = recording
    trainer = Trainer(env, PPOConfig(rollout_steps=7), total_updates=1)
    batch = trainer.collect()
    assert batch.dones[:, 0, 0].nonzero().flatten().tolist() == [2, 5]
    assert not batch.final_values[batch.dones == 0].any()
    for t, final in zip((2, 5), finals, strict=True):
        assert torch.equal(batch.final_values[t], trainer.model.value(final))
