"""From a policy's routing fractions to the integer weights a mesh accepts, and the checks
every route table passes before any writer sees it.

Rounding uses :func:`policies.weights.largest_remainder`, the rule the simulator uses for
request counts, so that what was trained is what is applied.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

from marl_operator.mesh.model import MeshError, MeshNode, MeshRoutes
from policies.weights import largest_remainder, mesh_weights

TOTAL = 100
"""Every rule's weights sum to this (Istio's convention; Gateway API weights are relative)."""


def as_percentages(row: Mapping[str, int]) -> dict[str, int]:
    """One source's routes as read from the mesh, in percent of its traffic. Gateway API
    weights are relative (a user's 500/500 is an even split), and the guard, the status and
    the metrics count in percent: the status's schema caps a weight at 100. A row carrying
    nothing stays as it is: there is no split to tell."""
    total = sum(row.values())
    if total in (0, TOTAL):
        return dict(row)
    shares = largest_remainder(np.array(list(row.values()), dtype=float), TOTAL)
    return {name: int(w) for name, w in zip(row, shares, strict=True)}


def integer_weights(
    fractions: Mapping[str, float], *, min_weight: int = 0, total: int = TOTAL
) -> dict[str, int]:
    """Integer weights summing to ``total`` for one source node's routes.

    ``fractions`` maps destination node to share, in the order of the policy's action layout
    (the node itself first, then its neighbours): ties and an all-zero row go to the first
    entry, as in the simulator. Every listed route gets at least ``min_weight`` (so each keeps
    being measured); the rest is shared in proportion to the fractions.
    """
    names = list(fractions)
    if not names:
        raise MeshError("a source node needs at least one route")
    values = np.array([float(fractions[n]) for n in names])
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise MeshError(f"routing fractions must be finite and non-negative, got {fractions}")
    if min_weight < 0 or min_weight * len(names) > total:
        raise MeshError(
            f"minWeight {min_weight} on {len(names)} routes exceeds {total}: lower minWeight "
            f"to at most {total // len(names)}"
        )
    if min_weight == 0:
        shares = mesh_weights(values, total)
    else:
        shares = min_weight + largest_remainder(values, total - min_weight * len(names))
    return {name: int(w) for name, w in zip(names, shares, strict=True)}


def weights_from_fractions(
    fractions: Mapping[str, Mapping[str, float]], *, min_weight: int = 0
) -> dict[str, dict[str, int]]:
    """:func:`integer_weights` for every source node (``source -> destination -> share``)."""
    return {
        source: integer_weights(row, min_weight=min_weight) for source, row in fractions.items()
    }


def catch_all(
    table: Mapping[str, Mapping[str, int]],
    nodes: Sequence[MeshNode],
    down: Collection[str] = (),
) -> dict[str, int]:
    """Weights for clients on no edge node: the unweighted mean of the rows of the source
    nodes that are up (no per-source traffic is known here), without the nodes that are
    ``down``; an even split over the nodes that are up when that leaves nothing."""
    names = [n.name for n in nodes]
    up = np.array([n not in down for n in names], dtype=bool)
    if not up.any():  # nothing can serve: as if every node could
        up[:] = True
    rows = [row for source, row in table.items() if source not in down]
    mean = np.array([sum(row.get(n, 0) for row in rows) for n in names], float) * up
    if mean.sum() <= 0:
        mean = up.astype(float)
    weights = mesh_weights(mean, TOTAL)
    return {n: int(w) for n, w in zip(names, weights, strict=True) if w > 0}


def check_weights(row: Mapping[str, int], known: set[str], where: str) -> None:
    """Refuse a rule the mesh would refuse or misread: unknown destinations, non-integer or
    negative weights, and totals other than 100 (which also rules out all zeros)."""
    for dest, weight in row.items():
        if dest not in known:
            raise MeshError(f"{where} routes to {dest!r}, which is not one of {sorted(known)}")
        if isinstance(weight, bool) or not isinstance(weight, int | np.integer):
            raise MeshError(f"{where}: weight of {dest!r} must be an integer, got {weight!r}")
        if weight < 0:
            raise MeshError(f"{where}: weight of {dest!r} is negative ({weight})")
    if sum(row.values()) != TOTAL:
        raise MeshError(f"{where}: weights must sum to {TOTAL}, got {sum(row.values())} ({row})")


def build_routes(
    table: Mapping[str, Mapping[str, int]],
    nodes: Sequence[MeshNode | str],
    *,
    default: Mapping[str, int] | None = None,
    down: Collection[str] = (),
) -> MeshRoutes:
    """Check a route table and freeze it, dropping zero weights.

    ``nodes`` is every edge node of the service in a stable order (it orders rules, routes and
    subsets, so generated objects do not churn). Sources without a row get no rule of their
    own; their clients fall to the catch-all, ``default`` (by default :func:`catch_all`, which
    leaves out the nodes that are ``down``).
    """
    mesh_nodes = tuple(n if isinstance(n, MeshNode) else MeshNode(n) for n in nodes)
    names = [n.name for n in mesh_nodes]
    if not names:
        raise MeshError("a service needs at least one edge node")
    if len(set(names)) != len(names):
        raise MeshError(f"edge node names repeat: {names}")
    labels = [n.label for n in mesh_nodes]
    if len(set(labels)) != len(labels):
        raise MeshError(f"two edge nodes share a pod label value: {labels}")
    known = set(names)
    for source, row in table.items():
        if source not in known:
            raise MeshError(f"source node {source!r} is not one of {names}")
        check_weights(row, known, f"source node {source!r}")
    if default is None:
        default = catch_all(table, mesh_nodes, down)
    check_weights(default, known, "the catch-all rule")
    ordered = {
        source: {n: int(table[source][n]) for n in names if table[source].get(n, 0) > 0}
        for source in names
        if source in table
    }
    return MeshRoutes(
        nodes=mesh_nodes,
        by_source=ordered,
        default={n: int(default[n]) for n in names if default.get(n, 0) > 0},
    )
