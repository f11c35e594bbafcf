"""The pieces of PPO that deserve unit tests: advantages, the clipped objective, value
normalisation, and every hyperparameter in one place.

Defaults follow the MAPPO paper's practice for easy cooperative tasks (few large
minibatches, clip 0.2, Huber value loss, gradient-norm limit) adapted to this environment:
the DFaaS reward is almost immediate, so a short horizon (gamma 0.7, lambda 0.3, as the
reference's later work used) learns faster without losing anything real.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from policies.network import RunningNorm

_POSITIVE = (
    "num_envs",
    "rollout_steps",
    "update_epochs",
    "num_minibatches",
    "hidden",
    "layers",
    "eval_every",
    "eval_episodes",
    "learning_rate",
    "huber_delta",
    "max_grad_norm",
)
_NON_NEGATIVE = (
    "imitate_steps",
    "critic_warmup",
    "clip_coef",
    "value_clip",
    "ent_coef_start",
    "ent_coef_end",
    "vf_coef",
)


ALGOS = ("mappo", "ippo")
"""A centralised critic (MAPPO), or one local critic per agent (IPPO)."""


@dataclass
class PPOConfig:
    """Every hyperparameter of training; the CLI and a YAML/JSON config file override them."""

    algo: str = "mappo"  # one of ALGOS
    num_envs: int = 32
    rollout_steps: int = 96  # steps per environment between updates
    accept_bonus: float = 3.0
    """Training-only reward term: this much times the share of the agent's arrivals that were
    not rejected or lost. The reference reward stops counting a reject as a mistake once any
    forward was refused, so PPO on it alone learns to reject: on dfaas-paise25 (1.296 M steps,
    50 evaluation episodes) bonus 0 gave return 274.7 and 73.4% processed; 0.5: 273.7, 74.1%;
    3: 265.8, 76.5%; 5: 262.0, 76.5%. Evaluation always reports the reference reward.

    Added to the latency reward too, where a lost request is priced at the scenario's
    reject_penalty already: there it trains for a dearer loss than costs are counted at,
    which buys headroom. Trained without it (mesh-10x3, 300,000 steps, seed 0), the policy
    alone cost less (0.98 of the oracle's cost against 1.07-1.08 on mesh-10x3, 1.25 against
    6.4-6.6 on mesh-6x3), but rollout on it missed latency targets more often after the
    changes (``benchmarks/slo_chance.py --policy RUN``, 8 seeds per change scenario: in 25
    intervals where the oracle met them, against 19 and 13 for two runs with it, whose
    weights differ by the code and thread count they were trained on), and meeting them is
    what the operator is for."""
    imitate: str = ""
    """A heuristic to clone before PPO (``policies.imitation``; empty: start from a random
    actor). Its data counts towards the environment-step budget."""
    imitate_steps: int = 200  # batched environment steps of teacher data
    critic_warmup: int = 5  # first updates train the critic only (when imitating)
    gamma: float = 0.7
    gae_lambda: float = 0.3
    bootstrap_time_limit: bool = True
    """Value an episode's end, a time limit, by the critic's value of its final observation
    (see :func:`gae`); false values it at nothing, as a true terminal."""
    learning_rate: float = 1e-3
    anneal_lr: bool = True
    update_epochs: int = 5
    num_minibatches: int = 2
    clip_coef: float = 0.2
    value_clip: float = 0.2
    huber_delta: float = 10.0
    ent_coef_start: float = 0.01
    ent_coef_end: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 10.0
    hidden: int = 128  # 64: 265.4 / 76.3%; 128: 265.8 / 76.5%; 256: 265.3 / 76.6% (2x slower)
    layers: int = 2
    eval_every: int = 20  # updates between evaluations
    eval_episodes: int = 16

    def __post_init__(self) -> None:
        """Refuse values that would fail deep inside training (a division by zero after
        the first rollout, say), naming the hyperparameter."""
        checks = (
            (_POSITIVE, lambda v: v > 0, "must be > 0"),
            (_NON_NEGATIVE, lambda v: v >= 0, "must be >= 0"),
            (("gamma", "gae_lambda"), lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
        )
        for names, holds, rule in checks:
            for name in names:
                if not holds(value := getattr(self, name)):
                    raise ValueError(f"hyperparameter {name}: {rule}, got {value!r}")
        if self.algo not in ALGOS:
            raise ValueError(
                f"hyperparameter algo: must be one of {list(ALGOS)}, got {self.algo!r}"
            )

    def entropy_coef(self, progress: float) -> float:
        """Linear schedule from start to end over training (``progress`` in [0, 1])."""
        return self.ent_coef_start + (self.ent_coef_end - self.ent_coef_start) * progress

    def replace(self, **changes) -> PPOConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(
                f"unknown hyperparameter(s) {sorted(unknown)}; known: "
                f"{sorted(f.name for f in dataclasses.fields(self))}"
            )
        return dataclasses.replace(
            self, **{k: _typed(k, v, type(getattr(self, k))) for k, v in changes.items()}
        )


def _typed(name: str, value, kind: type):
    """``value`` as the hyperparameter's type. YAML reads ``3e-4`` as a string (its 1.1
    floats need a dot), and an int is a fine float; anything else is refused by name."""
    if kind is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise ValueError(f"hyperparameter {name}: expected {kind.__name__}, got {value!r}")


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_value: torch.Tensor,
    dones: torch.Tensor,
    gamma: float,
    lam: float,
    final_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over a ``(T, ...)`` rollout.

    ``dones[t]`` is 1 when the episode ended *after* step ``t``; the trace is cut there (the
    next observation belongs to a new episode). ``final_values[t]`` is then the value of the
    observation the episode ended on, bootstrapped as the future the time limit cut off;
    without it an ended episode is worth nothing after its end (a true terminal).

    Episodes here end by their length alone, which no observation shows: valued at nothing
    after it, the last step's target was a single reward where the critic predicts about
    ``1 / (1 - gamma)`` of them, so its advantage was several standard deviations negative
    whatever the action, and normalising the advantages with it shrank every other one of
    the update. (An earlier trial of the bootstrap valued a final observation that showed no
    arrivals, a state the critic never met, and one mesh-10x3 run of it did worse in the
    closed-loop test than two without; the final observation now shows the last step's
    arrivals.) Returns advantages and returns (advantages + values)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        following = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        alive = 1.0 - dones[t]
        after = following * alive
        if final_values is not None:
            after = after + final_values[t] * dones[t]
        delta = rewards[t] + gamma * after - values[t]
        last = delta + gamma * lam * alive * last
        advantages[t] = last
    return advantages, advantages + values


class ValueNormaliser(RunningNorm):
    """Running statistics of the returns; the critic learns the z-scored target (as in the
    MAPPO code), so reward scale never needs hand tuning."""

    def __init__(self):
        super().__init__(())

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / torch.sqrt(self.var + 1e-8)).to(x.dtype)

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x * torch.sqrt(self.var + 1e-8) + self.mean).to(x.dtype)


def policy_loss(
    new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clipped surrogate (to minimise), approximate KL and the clipped fraction."""
    log_ratio = new_logp - old_logp
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    loss = -torch.min(unclipped, clipped).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clip_frac = ((ratio - 1).abs() > clip).float().mean()
    return loss, approx_kl, clip_frac


def value_loss(
    new_value: torch.Tensor,
    old_value: torch.Tensor,
    target: torch.Tensor,
    clip: float,
    huber_delta: float,
) -> torch.Tensor:
    """Huber loss, pessimistic over the clipped and unclipped value (all normalised)."""
    clipped = old_value + (new_value - old_value).clamp(-clip, clip)
    huber = nn.functional.huber_loss
    a = huber(new_value, target, reduction="none", delta=huber_delta)
    b = huber(clipped, target, reduction="none", delta=huber_delta)
    return torch.max(a, b).mean()
