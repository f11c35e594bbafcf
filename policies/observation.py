"""The observation contract: what a policy sees, built the same way from the simulator's state
and from the operator's Prometheus readings.

Two schemas exist:

* ``dfaas``: the reference's 6 raw numbers per agent, in the reference's order, for the
  3-way (local, forward, reject) action. Kept unnormalised so results compare side by side;
  the policy normalises inside itself.
* ``mesh``: quantities a service mesh can actually report (offered load, utilisation, latency
  against target, reject ratio, backlog), for the agent's own node and for each neighbour
  slot, padded to the maximum degree and masked. This is what the operator reproduces, so
  it contains nothing that only a simulator could know.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.topology import Topology

DFAAS_FEATURES = (
    "input_requests",
    "prev_forward_rejects",
    "prev_forward_requests",
    "prev_local_rejects",
    "prev_local_requests",
    "queue_size",
)
MESH_LOCAL_FEATURES = (
    "offered_load",
    "utilisation",
    "latency_ratio",
    "reject_ratio",
    "backlog",
    "capacity_share",
)
MESH_NEIGHBOUR_FEATURES = (
    "present",
    "capacity_share",
    "utilisation",
    "latency_ratio",
    "backlog",
    "link_ratio",
)
LATENCY_RATIO_CAP = 10.0


@dataclass
class MeshTelemetry:
    """One control interval of per-node, per-service readings (leading batch axis B).

    Rates are requests per interval. ``latency_ms`` is the mean latency of the requests
    served at each node for each service (NaN where none were served).
    """

    offered: np.ndarray  # (B, N, S) arrivals at each node's ingress in the coming interval
    latency_ms: np.ndarray  # (B, N, S)
    rejected: np.ndarray  # (B, N, S) requests of agent (n, s) rejected, all causes
    arrived_prev: np.ndarray  # (B, N, S) arrivals in the previous interval
    utilisation: np.ndarray  # (B, N) busy fraction in the previous interval
    backlog: np.ndarray  # (B, N) waiting work over what one interval can serve
    capacity: np.ndarray  # (N,) requests per interval each node can serve
    active: np.ndarray  # (N,) bool
    target_ms: np.ndarray  # (S,)


def mesh_feature_dim(max_degree: int) -> int:
    return len(MESH_LOCAL_FEATURES) + max_degree * len(MESH_NEIGHBOUR_FEATURES)


def mesh_observation(topo: Topology, tel: MeshTelemetry) -> np.ndarray:
    """``(B, A, D)`` mesh observation, agents ordered (node, service)."""
    b = tel.offered.shape[0]
    n, s, k = topo.num_nodes, topo.num_services, topo.max_degree
    active = tel.active.astype(bool)
    mean_cap = tel.capacity[active].mean() if active.any() else 1.0
    cap_share = np.where(active, tel.capacity / max(mean_cap, 1e-9), 0.0)
    latency_ratio = np.nan_to_num(tel.latency_ms / tel.target_ms[None, None, :], nan=0.0)
    latency_ratio = np.clip(latency_ratio, 0.0, LATENCY_RATIO_CAP)
    node_util = np.clip(tel.utilisation, 0.0, 1.0)
    backlog = np.clip(tel.backlog, 0.0, LATENCY_RATIO_CAP)

    # A node up with no CPU (a capacity event of factor 0) put 1e10 here: capped as the
    # other ratios are, so it reads as overloaded without swamping the network's inputs.
    offered_share = tel.offered / np.maximum(tel.capacity, 1e-9)[None, :, None]
    local = np.stack(
        [
            np.clip(offered_share, 0.0, LATENCY_RATIO_CAP),
            np.broadcast_to(node_util[..., None], (b, n, s)),
            latency_ratio,
            tel.rejected / np.maximum(tel.arrived_prev, 1.0),
            np.broadcast_to(backlog[..., None], (b, n, s)),
            np.broadcast_to(cap_share[None, :, None], (b, n, s)),
        ],
        axis=-1,
    )

    present = topo.neighbour_mask & active[topo.neighbour_safe]
    per_node = np.stack(
        [
            np.broadcast_to(cap_share[None, :], (b, n)),
            node_util,
            backlog,
        ],
        axis=-1,
    )
    nb = topo.gather_from_neighbours(per_node)  # (B, N, K, 3)
    nb_latency = topo.gather_from_neighbours(latency_ratio)  # (B, N, K, S)
    link = (
        topo.link_matrix[np.arange(n)[:, None], topo.neighbour_safe][..., None]
        / tel.target_ms[None, None, :]
    )
    neighbour = (
        np.stack(
            [
                np.broadcast_to(present[None, :, :, None], (b, n, k, s)).astype(np.float64),
                np.broadcast_to(nb[..., 0:1], (b, n, k, s)),
                np.broadcast_to(nb[..., 1:2], (b, n, k, s)),
                nb_latency,
                np.broadcast_to(nb[..., 2:3], (b, n, k, s)),
                np.broadcast_to(np.where(present[..., None], link, 0.0)[None], (b, n, k, s)),
            ],
            axis=-1,
        )
        * present[None, :, :, None, None]
    )
    neighbour = neighbour.transpose(0, 1, 3, 2, 4).reshape(b, n, s, -1)
    obs = np.concatenate([local, neighbour], axis=-1)
    return obs.reshape(b, n * s, -1).astype(np.float32)


def neighbour_action_mask(topo: Topology, active: np.ndarray) -> np.ndarray:
    """``(A, K + 2)`` which entries of [local, neighbour_1..K, reject] an agent may use."""
    own = np.repeat(active.astype(bool), topo.num_services)
    nb = topo.neighbour_mask & active.astype(bool)[topo.neighbour_safe]
    nb = np.repeat(nb, topo.num_services, axis=0)
    mask = np.concatenate([own[:, None], nb, np.ones((topo.num_agents, 1), bool)], axis=1)
    return mask
