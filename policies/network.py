"""The routing policy network: one actor shared by every agent, and its critic.

Parameter sharing: every (node, service) agent runs the same actor on its own observation,
so one policy serves meshes of any size, and a policy trained on one topology runs on
another of the same maximum degree. The critic is used only in training:

* ``mappo``: centralised, it sees the agent's observation and the mean of all agents'
  observations (the global state in a form that does not depend on how many agents exist);
* ``ippo``: the agent's own observation only (the reference paper's independent learners).

Observation normalisation lives inside the module (running mean and variance as buffers),
so the environment keeps the reference's raw numbers and a checkpoint carries its own
normalisation to the operator. The operator acts with :class:`policies.actor.NumpyActor`, the
same forward pass in numpy: keep the two in step (tests/test_inference.py compares them).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from policies.actor import CONSTANT_VAR, NORM_EPS, OBS_CLIP
from policies.distributions import MaskedDirichlet


class RunningNorm(nn.Module):
    """Running mean/variance (Chan's parallel update), applied as a clipped z-score.

    ``shape`` is one sample's shape: ``(features,)`` for observations, ``()`` for returns."""

    def __init__(self, shape: int | tuple[int, ...], clip: float = OBS_CLIP):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))
        self.clip = clip

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, *self.mean.shape).to(torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        mean, var = x.mean(0), x.var(0, unbiased=False)
        delta = mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        m2 = self.var * self.count + var * n + delta**2 * self.count * n / total
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = self.var.to(x.dtype)
        scale = torch.where(var < CONSTANT_VAR, 1.0, torch.sqrt(var + NORM_EPS))
        return ((x - self.mean.to(x.dtype)) / scale).clamp(-self.clip, self.clip)


def mlp(inputs: int, hidden: int, layers: int, outputs: int, out_gain: float) -> nn.Sequential:
    """Tanh MLP with orthogonal init (the PPO implementation-details convention)."""
    mods: list[nn.Module] = []
    width = inputs
    for _ in range(layers):
        lin = nn.Linear(width, hidden)
        nn.init.orthogonal_(lin.weight, math.sqrt(2))
        nn.init.zeros_(lin.bias)
        mods += [lin, nn.Tanh()]
        width = hidden
    head = nn.Linear(width, outputs)
    nn.init.orthogonal_(head.weight, out_gain)
    nn.init.zeros_(head.bias)
    return nn.Sequential(*mods, head)


class ActorCritic(nn.Module):
    """Shared Dirichlet actor over [local, neighbours..., reject] (or [local, forward, reject])
    and a centralised (``mappo``) or local (``ippo``) critic."""

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden: int = 64,
        layers: int = 2,
        critic: str = "mappo",
    ):
        super().__init__()
        if critic not in ("mappo", "ippo"):
            raise ValueError(f"critic must be 'mappo' or 'ippo', got {critic!r}")
        self.obs_dim, self.action_dim, self.critic_kind = obs_dim, action_dim, critic
        self.obs_norm = RunningNorm(obs_dim)
        self.actor = mlp(obs_dim, hidden, layers, action_dim, out_gain=0.01)
        critic_in = 2 * obs_dim if critic == "mappo" else obs_dim
        self.critic = mlp(critic_in, hidden, layers, 1, out_gain=1.0)

    def distribution(self, obs: torch.Tensor, mask: torch.Tensor) -> MaskedDirichlet:
        """``obs (..., A, D)``, ``mask (..., A, action_dim)``."""
        alpha = nn.functional.softplus(self.actor(self.obs_norm(obs))) + 1.0
        return MaskedDirichlet(alpha, mask)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """``(..., A)`` values in the normalised-return scale (see ValueNormaliser)."""
        z = self.obs_norm(obs)
        if self.critic_kind == "mappo":
            pooled = z.mean(dim=-2, keepdim=True).expand_as(z)
            z = torch.cat([z, pooled], dim=-1)
        return self.critic(z).squeeze(-1)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Deployed action: the Dirichlet mean (no exploration noise)."""
        return self.distribution(obs, mask).mean
