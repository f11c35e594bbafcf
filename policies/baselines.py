"""Heuristic routing policies, selectable by name.

They read only the observation contract (:mod:`policies.observation`), never simulator
internals, so the operator can run the very same code as a fallback. Each returns routing
fractions ``(B, A, action_dim)``: ``[local, forward, reject]`` in the ``split3`` mode, or
``[local, neighbour_1..K, reject]`` in the ``neighbours`` mode (masked entries get zero).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from policies.observation import DFAAS_FEATURES, MESH_LOCAL_FEATURES, MESH_NEIGHBOUR_FEATURES


@dataclass(frozen=True)
class PolicyContext:
    """What a heuristic needs to know about the action layout."""

    action_mode: str  # "split3" or "neighbours"
    max_degree: int
    local_capacity: float | np.ndarray = 64.0
    """split3 mode: requests one node serves per step (the reference's fill-local uses 64);
    one number for every agent, or one per agent ``(A,)``."""
    queue_capacity: float | np.ndarray = 100.0
    services: int = 1
    """Agents per node (node-major): a node's services share its capacity."""


Policy = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``policy(obs (B, A, D), mask (A, action_dim)) -> fractions (B, A, action_dim)``."""


class PolicyError(ValueError):
    """A policy name or its arguments are wrong, or it does not fit the action mode."""


def _dfaas(obs: np.ndarray, name: str) -> np.ndarray:
    return obs[..., DFAAS_FEATURES.index(name)]


def _local(obs: np.ndarray, name: str) -> np.ndarray:
    return obs[..., MESH_LOCAL_FEATURES.index(name)]


def _neighbours(obs: np.ndarray, ctx: PolicyContext, name: str) -> np.ndarray:
    """``(B, A, K)`` one neighbour feature across slots."""
    base = len(MESH_LOCAL_FEATURES)
    width = len(MESH_NEIGHBOUR_FEATURES)
    idx = base + np.arange(ctx.max_degree) * width + MESH_NEIGHBOUR_FEATURES.index(name)
    return obs[..., idx]


def _normalise(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    x = np.where(mask, np.maximum(x, 0.0), 0.0)
    total = x.sum(axis=-1, keepdims=True)
    fallback = np.zeros_like(x)
    fallback[..., 0] = 1.0
    fallback = np.where(mask[..., :1], fallback, np.eye(x.shape[-1])[-1])
    return np.where(total > 0, x / np.where(total > 0, total, 1.0), fallback)


def _spread(
    local: np.ndarray,
    to_neighbours: np.ndarray,
    nb_weights: np.ndarray,
    reject: np.ndarray,
    mask: np.ndarray,
) -> np.ndarray:
    """Assemble [local, neighbours..., reject] from a local share, a forwarded share split by
    ``nb_weights`` over present neighbours, and a reject share."""
    w = np.where(mask[..., 1:-1], np.maximum(nb_weights, 0.0), 0.0)
    total = w.sum(axis=-1, keepdims=True)
    has = total[..., 0] > 0
    w = np.where(total > 0, w / np.where(total > 0, total, 1.0), 0.0)
    forward = np.where(has, to_neighbours, 0.0)
    local = local + np.where(has, 0.0, to_neighbours)
    out = np.concatenate([local[..., None], forward[..., None] * w, reject[..., None]], axis=-1)
    return _normalise(out, np.broadcast_to(mask, out.shape))


# ------------------------------------------------------------------------------------------
# The heuristics


def always_local(ctx: PolicyContext) -> Policy:
    def act(obs, mask):
        out = np.zeros((*obs.shape[:-1], mask.shape[-1]))
        out[..., 0] = 1.0
        return out

    return act


def random_dirichlet(ctx: PolicyContext, seed: int = 0) -> Policy:
    rng = np.random.default_rng(seed)

    def act(obs, mask):
        g = rng.gamma(1.0, size=(*obs.shape[:-1], mask.shape[-1]))
        return _normalise(g, np.broadcast_to(mask, g.shape))

    return act


def fixed_split(ctx: PolicyContext, local: float, forward: float, reject: float) -> Policy:
    total = local + forward + reject
    if min(local, forward, reject) < 0 or total <= 0:
        raise PolicyError(
            "fixed:L,F,R needs non-negative shares with a positive sum, "
            f"got {local},{forward},{reject}"
        )
    split = np.array([local, forward, reject]) / total

    def act(obs, mask):
        shape = obs.shape[:-1]
        if ctx.action_mode == "split3":
            return np.broadcast_to(split, (*shape, 3)).copy()
        ones = np.ones((*shape, ctx.max_degree))
        return _spread(
            np.full(shape, split[0]), np.full(shape, split[1]), ones, np.full(shape, split[2]), mask
        )

    return act


def fill_local_then_forward(ctx: PolicyContext) -> Policy:
    """Keep what the node can serve this step plus what fits in its queue; forward the rest
    (evenly). The reference's strongest heuristic. With several services, each keeps the
    same share of its load: the node's spare capacity over all its services' load (each
    keeping as much as the whole node could serve overfilled it S times)."""

    def act(obs, mask):
        if ctx.action_mode == "split3":
            n = _node_total(_dfaas(obs, "input_requests"), ctx.services)
            free = ctx.queue_capacity - _dfaas(obs, "queue_size")
            keep = np.minimum(n, ctx.local_capacity + free)
            local = np.where(n > 0, keep / np.maximum(n, 1), 1.0)
            return np.stack([local, 1 - local, np.zeros_like(local)], axis=-1)
        load = _node_total(_local(obs, "offered_load"), ctx.services)
        spare = np.maximum(1.0 - _local(obs, "backlog"), 0.0)
        local = np.where(load > 0, np.minimum(1.0, spare / np.maximum(load, 1e-9)), 1.0)
        present = _neighbours(obs, ctx, "present")
        return _spread(local, 1 - local, present, np.zeros_like(local), mask)

    return act


def _node_total(values: np.ndarray, services: int) -> np.ndarray:
    """``values`` (..., A) of node-major agents summed over each node's services, given
    back to every agent of the node."""
    per_node = values.reshape(*values.shape[:-1], -1, services).sum(axis=-1)
    return np.repeat(per_node, services, axis=-1)


def _spare(obs: np.ndarray, ctx: PolicyContext) -> tuple[np.ndarray, np.ndarray]:
    """Spare capacity (in units of the mean node) of the agent's node and of each neighbour."""
    own = _local(obs, "capacity_share") * (1 - _local(obs, "utilisation")) - _local(obs, "backlog")
    nb = _neighbours(obs, ctx, "capacity_share") * (
        1 - _neighbours(obs, ctx, "utilisation")
    ) - _neighbours(obs, ctx, "backlog")
    return own, np.where(_neighbours(obs, ctx, "present") > 0, nb, -np.inf)


def least_loaded(ctx: PolicyContext) -> Policy:
    """Serve locally what fits; send the excess to the neighbour with the most spare capacity."""
    _need_neighbours(ctx, "least-loaded")
    fill = fill_local_then_forward(ctx)

    def act(obs, mask):
        local = fill(obs, mask)[..., 0]
        _, nb = _spare(obs, ctx)
        best = np.argmax(np.where(mask[..., 1:-1], nb, -np.inf), axis=-1)
        one_hot = np.eye(ctx.max_degree)[best]
        return _spread(local, 1 - local, one_hot, np.zeros_like(local), mask)

    return act


def capacity_proportional(ctx: PolicyContext) -> Policy:
    """Static weights proportional to capacity over the node and its neighbours (weighted RR)."""
    _need_neighbours(ctx, "capacity-proportional")

    def act(obs, mask):
        weights = np.concatenate(
            [
                _local(obs, "capacity_share")[..., None],
                _neighbours(obs, ctx, "capacity_share") * _neighbours(obs, ctx, "present"),
                np.zeros((*obs.shape[:-1], 1)),
            ],
            axis=-1,
        )
        return _normalise(weights, np.broadcast_to(mask, weights.shape))

    return act


def least_request(ctx: PolicyContext, bias: float = 1.0) -> Policy:
    """Envoy's weighted least-request rule as weights: ``weight / (active + 1) ** bias``, with
    capacity as the weight and outstanding work (backlog + utilisation) as ``active``."""
    _need_neighbours(ctx, "least-request")

    def act(obs, mask):
        own_active = _local(obs, "backlog") + _local(obs, "utilisation")
        nb_active = _neighbours(obs, ctx, "backlog") + _neighbours(obs, ctx, "utilisation")
        own = _local(obs, "capacity_share") / (own_active + 1) ** bias
        nb = _neighbours(obs, ctx, "capacity_share") / (nb_active + 1) ** bias
        weights = np.concatenate(
            [own[..., None], nb * _neighbours(obs, ctx, "present"), np.zeros((*own.shape, 1))],
            axis=-1,
        )
        return _normalise(weights, np.broadcast_to(mask, weights.shape))

    return act


def peak_ewma(ctx: PolicyContext, decay: float = 0.7) -> Policy:
    """Finagle/Linkerd peak-EWMA: cost = latency estimate x (pending + 1), where the estimate
    jumps to any new peak and decays toward lower readings; weights are inverse costs."""
    _need_neighbours(ctx, "peak-ewma")
    state: dict[str, np.ndarray] = {}

    def act(obs, mask):
        latency = (
            np.concatenate(
                [
                    _local(obs, "latency_ratio")[..., None],
                    _neighbours(obs, ctx, "latency_ratio") + _neighbours(obs, ctx, "link_ratio"),
                ],
                axis=-1,
            )
            + 1e-3
        )
        pending = np.concatenate(
            [_local(obs, "backlog")[..., None], _neighbours(obs, ctx, "backlog")], axis=-1
        )
        prev = state.get("ewma")
        if prev is None or prev.shape != latency.shape:
            prev = latency
        ewma = np.where(latency > prev, latency, decay * prev + (1 - decay) * latency)
        state["ewma"] = ewma
        cost = ewma * (pending + 1)
        weights = np.concatenate([1.0 / cost, np.zeros((*cost.shape[:-1], 1))], axis=-1)
        return _normalise(weights, np.broadcast_to(mask, weights.shape))

    return act


def _need_neighbours(ctx: PolicyContext, name: str) -> None:
    if ctx.action_mode != "neighbours":
        raise PolicyError(
            f"policy {name!r} chooses among neighbours and needs the 'neighbours' action mode; "
            "the reference 3-way split cannot express it (use --action-mode neighbours)"
        )
    if ctx.max_degree == 0:
        raise PolicyError(
            f"policy {name!r} chooses among neighbours, and no node of this scenario has a "
            "neighbour; use apl or the oracle"
        )


HEURISTICS = {
    "apl": always_local,
    "random": random_dirichlet,
    "fill-local-then-forward": fill_local_then_forward,
    "least-loaded": least_loaded,
    "capacity-proportional": capacity_proportional,
    "least-request": least_request,
    "peak-ewma": peak_ewma,
}


def make_heuristic(name: str, ctx: PolicyContext, seed: int = 0, others: str = "") -> Policy:
    """Build a heuristic by name: one of :data:`HEURISTICS` or ``fixed:L,F,R``. An unknown
    name is refused listing them, and ``others``, what else the caller accepts."""
    if name.startswith("fixed:"):
        try:
            local, forward, reject = (float(x) for x in name[len("fixed:") :].split(","))
        except ValueError as exc:
            raise PolicyError(f"fixed split must look like fixed:0.6,0.4,0, got {name!r}") from exc
        return fixed_split(ctx, local, forward, reject)
    if name not in HEURISTICS:
        raise PolicyError(
            f"unknown policy {name!r}; heuristics: {sorted(HEURISTICS)} or fixed:L,F,R{others}"
        )
    if name == "random":
        return random_dirichlet(ctx, seed)
    return HEURISTICS[name](ctx)
