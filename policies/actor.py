"""The deployed actor in numpy: what the operator and evaluation run, without torch.

Why: acting needs only the actor's forward pass and the Dirichlet mean, a few small matrix
products; torch would add about 190 MB to every operator process and per-call overhead on
inputs this small. The arithmetic mirrors :class:`policies.network.ActorCritic` step by step
in float32, as torch runs it, so both agree to float32 rounding (tests/test_inference.py):

* ``obs_norm``: ``clip((obs - mean) / norm_scale(var), -OBS_CLIP, OBS_CLIP)``;
* ``actor``: ``Linear`` + ``tanh`` layers, then a ``Linear`` head;
* ``alpha = softplus(h) + 1``, action = ``where(mask, alpha, 0) / sum(where(mask, alpha, 0))``
  (:attr:`policies.distributions.MaskedDirichlet.mean`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

OBS_CLIP = 10.0
"""Normalised observations are clipped to +-OBS_CLIP (``RunningNorm``'s clip)."""
NORM_EPS = 1e-8
"""Added to the running variance before its square root (``RunningNorm.forward``)."""
CONSTANT_VAR = 1e-8
"""A feature whose running variance is below this never varied in training (the statistics'
prior, a variance of 1 weighted 1e-4 samples, thins to it after 10^4 constant ones), and is
centred but not scaled. Scaled by its vanishing spread, a value it never took in training
reached the clip, +-OBS_CLIP, through weights that never learned from it: on mesh-10x3 a
neighbour slot that is always present, until a neighbour fails or a smaller mesh pads it."""


def norm_scale(var: np.ndarray) -> np.ndarray:
    """What observations are divided by after centring: ``sqrt(var + NORM_EPS)``, and 1 for
    a feature whose variance is below :data:`CONSTANT_VAR`."""
    var = np.asarray(var)
    return np.where(var < CONSTANT_VAR, var.dtype.type(1), np.sqrt(var + var.dtype.type(NORM_EPS)))


def state_layout(
    obs_dim: int, action_dim: int, hidden: int, layers: int, critic: str
) -> dict[str, tuple[int, ...]]:
    """Every entry of ``ActorCritic(...).state_dict()`` and its shape, without building one
    (so that a weights file is checked as strictly as ``load_state_dict`` would)."""
    layout: dict[str, tuple[int, ...]] = {
        "obs_norm.mean": (obs_dim,),
        "obs_norm.var": (obs_dim,),
        "obs_norm.count": (),
    }
    critic_in = 2 * obs_dim if critic == "mappo" else obs_dim
    for name, inputs, outputs in (("actor", obs_dim, action_dim), ("critic", critic_in, 1)):
        width = inputs
        for i in range(layers):
            layout[f"{name}.{2 * i}.weight"] = (hidden, width)
            layout[f"{name}.{2 * i}.bias"] = (hidden,)
            width = hidden
        layout[f"{name}.{2 * layers}.weight"] = (outputs, width)
        layout[f"{name}.{2 * layers}.bias"] = (outputs,)
    return layout


@dataclass(frozen=True)
class NumpyActor:
    """The actor's parameters as float32 arrays, weights stored ``(in, out)`` for ``x @ w``."""

    mean: np.ndarray
    scale: np.ndarray
    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]

    @classmethod
    def from_state_dict(cls, state: Mapping[str, np.ndarray], layers: int) -> NumpyActor:
        """From a state_dict already checked against :func:`state_layout`."""
        f32 = np.float32
        var = np.asarray(state["obs_norm.var"]).astype(f32)
        return cls(
            mean=np.asarray(state["obs_norm.mean"]).astype(f32),
            scale=norm_scale(var),
            weights=tuple(
                np.ascontiguousarray(np.asarray(state[f"actor.{2 * i}.weight"]).T, dtype=f32)
                for i in range(layers + 1)
            ),
            biases=tuple(
                np.asarray(state[f"actor.{2 * i}.bias"]).astype(f32) for i in range(layers + 1)
            ),
        )

    def concentrations(self, obs: np.ndarray) -> np.ndarray:
        """``alpha = softplus(actor(obs_norm(obs))) + 1``, float32 ``(..., A, action_dim)``."""
        obs = np.asarray(obs, dtype=np.float32)
        # One 2-D product per layer: numpy would loop over the leading axes of a stack.
        x = (obs.reshape(-1, obs.shape[-1]) - self.mean) / self.scale
        np.clip(x, -OBS_CLIP, OBS_CLIP, out=x)
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            x = x @ w
            x += b
            np.tanh(x, out=x)
        h = x @ self.weights[-1]
        h += self.biases[-1]
        # softplus as torch computes it: log(1 + e^h), and h itself above 20 (no overflow).
        alpha = np.where(h > 20, h, np.log1p(np.exp(np.minimum(h, 20)))) + np.float32(1)
        return alpha.reshape(*obs.shape[:-1], alpha.shape[-1])

    def __call__(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``obs (..., A, D)``, ``mask (..., A, action_dim)`` or broadcastable: the Dirichlet
        mean as float64 weights; masked entries get exactly 0."""
        alpha = np.where(np.asarray(mask, dtype=bool), self.concentrations(obs), np.float32(0))
        # A row with every entry masked has no distribution: NaN, as torch gives.
        with np.errstate(invalid="ignore", divide="ignore"):
            return (alpha / alpha.sum(-1, keepdims=True)).astype(np.float64)
