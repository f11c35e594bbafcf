"""The problem topology shared by the simulator and the operator.

Both halves of the project describe the mesh the same way: node and service names, each
node's neighbours in a fixed order (the order is part of the contract: it decides which
output of a policy's action head means which neighbour), and link latencies. The simulator
builds a :class:`Topology` from a scenario file; the operator builds it from EdgeNode
resources. Everything a vectorised computation needs is precomputed here once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)
class Topology:
    """Nodes, services and ordered neighbour lists, with padded index tables.

    An *agent* is one (node, service) pair; agent ``a`` is node ``a // S``, service ``a % S``.
    Neighbour slots are padded to ``max_degree`` (``K``) and masked.
    """

    nodes: tuple[str, ...]
    services: tuple[str, ...]
    neighbours: tuple[tuple[str, ...], ...]
    link_ms: Mapping[frozenset[str], float] = field(default_factory=dict)
    max_degree: int | None = None

    def __post_init__(self) -> None:
        index = {name: i for i, name in enumerate(self.nodes)}
        k = max([len(n) for n in self.neighbours] + [self.max_degree or 0])
        object.__setattr__(self, "max_degree", k)
        n = len(self.nodes)
        nbr = np.full((n, k), -1, dtype=np.int64)
        for i, names in enumerate(self.neighbours):
            nbr[i, : len(names)] = [index[x] for x in names]
        mask = nbr >= 0
        safe = np.where(mask, nbr, 0)
        rev = np.zeros((n, k), dtype=np.int64)
        for i in range(n):
            for m in range(k):
                if mask[i, m]:
                    rev[i, m] = int(np.flatnonzero(nbr[safe[i, m]] == i)[0])
        links = np.zeros((n, n))
        for pair, ms in self.link_ms.items():
            a, b = (index[x] for x in pair)
            links[a, b] = links[b, a] = ms
        object.__setattr__(self, "neighbour_index", nbr)
        object.__setattr__(self, "neighbour_mask", mask)
        object.__setattr__(self, "neighbour_safe", safe)
        object.__setattr__(self, "reverse_slot", np.where(mask, rev, 0))
        object.__setattr__(self, "link_matrix", links)
        object.__setattr__(self, "degree", mask.sum(axis=1))

    # Attributes set in __post_init__ (declared for type checkers and readers).
    neighbour_index: np.ndarray = field(init=False, repr=False)
    """(N, K) neighbour node index per slot, -1 where the slot is empty."""
    neighbour_mask: np.ndarray = field(init=False, repr=False)
    """(N, K) True where the slot holds a real neighbour."""
    neighbour_safe: np.ndarray = field(init=False, repr=False)
    """(N, K) neighbour index with empty slots pointing at node 0 (for gathers; mask after)."""
    reverse_slot: np.ndarray = field(init=False, repr=False)
    """(N, K) for node i's slot m: the slot in which neighbour ``nbr[i, m]`` lists ``i``."""
    link_matrix: np.ndarray = field(init=False, repr=False)
    """(N, N) one-way link latency in milliseconds."""
    degree: np.ndarray = field(init=False, repr=False)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def num_services(self) -> int:
        return len(self.services)

    @property
    def num_agents(self) -> int:
        return self.num_nodes * self.num_services

    def agent_names(self) -> list[str]:
        if self.num_services == 1:
            return list(self.nodes)
        return [f"{n}/{s}" for n in self.nodes for s in self.services]

    def gather_from_neighbours(self, per_node: np.ndarray) -> np.ndarray:
        """``(..., N, X) -> (..., N, K, X)``: each node's view of its neighbours (0 if empty)."""
        out = per_node[..., self.neighbour_safe, :]
        return np.where(self.neighbour_mask[..., None], out, 0)

    def other_end(self, per_slot: np.ndarray) -> np.ndarray:
        """``(..., N, K, X) -> (..., N, K, X)``: each link's value as seen from its other end.

        Slot ``m`` of node ``i`` and the slot of ``j = nbr[i, m]`` that lists ``i`` are the two
        ends of one link. Sender-side forward counts become receiver-side arrivals, and
        receiver-side rejects go back to the sender, with the same gather."""
        out = per_slot[..., self.neighbour_safe, self.reverse_slot, :]
        return np.where(self.neighbour_mask[..., None], out, 0)

    @classmethod
    def build(
        cls,
        nodes: Sequence[str],
        services: Sequence[str],
        neighbours: Mapping[str, Sequence[str]],
        link_ms: Mapping[frozenset[str], float] | None = None,
        max_degree: int | None = None,
    ) -> Topology:
        return cls(
            nodes=tuple(nodes),
            services=tuple(services),
            neighbours=tuple(tuple(neighbours.get(n, ())) for n in nodes),
            link_ms=dict(link_ms or {}),
            max_degree=max_degree,
        )
