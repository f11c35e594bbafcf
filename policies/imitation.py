"""Warm-starting the actor from a heuristic teacher before PPO (behaviour cloning).

Why: on a mesh the strongest heuristics (least-request) already react to the queues every
agent observes, and PPO from a random actor spends most of a small budget rediscovering
that. Cloning the teacher first gives PPO a starting point as good as the best heuristic,
so its updates are spent improving on it. The critic then learns the teacher's values for a
few updates with the actor frozen (``PPOConfig.critic_warmup``): advantages from an
untrained critic would otherwise push the cloned actor around at random.

The clone is fitted on states the teacher visits with exploration noise around its action
(a Dirichlet centred on it), so the actor also knows what the teacher does just off its own
path, where PPO's sampled actions will take it. The loss is the squared Hellinger distance
between the teacher's weights and the Dirichlet's mean, the deployed action: unlike the
squared error it still pulls hard on a share that should be zero but is 1% (a reject share
of 1% costs a mesh far more than 1% of its latency). The concentration, hence how widely
PPO explores, grows as far as the teacher's sharpness needs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from policies.network import ActorCritic

Teacher = Callable[[np.ndarray, np.ndarray], np.ndarray]


def teacher_data(
    env, teacher: Teacher, steps: int, spread: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``steps`` batched environment steps played by ``teacher`` with Dirichlet noise of
    concentration ``spread`` around its weights; returns observations ``(R, D)``, masks
    ``(R, K)`` and the teacher's weights ``(R, K)`` at every visited agent state."""
    obs_rows, mask_rows, target_rows = [], [], []
    obs = env.reset()
    for _ in range(steps):
        mask = env.action_mask()
        target = np.asarray(teacher(obs, mask), dtype=np.float64)
        b, a, k = target.shape
        obs_rows.append(obs.reshape(b * a, -1))
        mask_rows.append(np.broadcast_to(mask, target.shape).reshape(b * a, k))
        target_rows.append(target.reshape(b * a, k))
        noisy = rng.gamma(spread * target + 0.05) * mask
        noisy /= np.maximum(noisy.sum(-1, keepdims=True), 1e-12)
        obs, _, done, _ = env.step(noisy)
        if done:
            obs = env.reset()
    return (
        np.concatenate(obs_rows).astype(np.float32),
        np.concatenate(mask_rows),
        np.concatenate(target_rows).astype(np.float32),
    )


def clone(
    model: ActorCritic,
    obs: np.ndarray,
    mask: np.ndarray,
    target: np.ndarray,
    updates: int = 2000,
    batch: int = 1024,
    lr: float = 1e-3,
    seed: int = 0,
) -> float:
    """Fit ``model``'s observation normaliser and actor to the teacher's weights; returns
    the final mean squared Hellinger distance of the deployed action (the Dirichlet mean)."""
    generator = torch.Generator().manual_seed(seed)
    x, m, y = (torch.as_tensor(v) for v in (obs, mask, target))
    model.obs_norm.update(x)
    optimiser = torch.optim.Adam(model.actor.parameters(), lr=lr)
    for _ in range(updates):
        idx = torch.randint(len(x), (min(batch, len(x)),), generator=generator)
        loss = _hellinger(model.distribution(x[idx], m[idx]).mean, y[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        return float(_hellinger(model.distribution(x, m).mean, y))


def _hellinger(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((_root(p) - _root(q)) ** 2).sum(-1).mean()


def _root(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp_min(0) + 1e-8).sqrt()  # a finite slope where a share is 0
