"""Safety between a decision and the mesh: bounded steps, and what to write when deciding fails.

A learned policy and a learned model can both be wrong; the guard keeps their mistakes small
and visible. Every decided route moves at most ``maxWeightChange`` points per interval, so a
bad decision is corrected before it has moved much traffic (the catch-all rule, the mean of
the source nodes' rows, follows them and so may differ from that by a point of rounding; a
fallback, written when deciding has failed for intervals, is written as it is), and a route
whose weights would all move by less than ``minWeightChange`` points stays as it is: such a
move is rounding and measurement noise, and every write is a configuration push to every
sidecar of the mesh. When no decision can be made (metrics missing or stale, inputs
inconsistent), the weights in place are held; after ``failureThreshold`` such intervals in a
row the configured fallback is written, because a routing chosen for conditions that no
longer hold gets worse the longer it stays.

A node that is down (:mod:`marl_operator.liveness`) is the exception to the bounded step: every
request routed to it fails or waits, so its share leaves at once, whatever else happens to the
cycle, and no fallback routes to it. So does a node's share of a service it has no ready pod
of, for that service alone.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from marl_operator.liveness import Liveness
from marl_operator.mesh.routing import TOTAL, integer_weights
from marl_operator.problem import MeshProblem
from marl_operator.report import RouteTable
from marl_operator.spec import SafetySpec
from policies.weights import largest_remainder


def limit_step(
    previous: Mapping[str, int] | None,
    proposed: Mapping[str, int],
    max_change: int,
    min_change: int = 1,
) -> dict[str, int]:
    """``proposed``, moved from ``previous`` by at most ``max_change`` points per route, or
    ``previous`` itself when no route would move by ``min_change`` points.

    The whole move is scaled down (not each route clipped), so the weights still sum to 100
    and the direction of the decision is kept; rounding picks the floor or ceiling of values
    that lie within the bound, so integers stay within it too.
    """
    if not previous:
        return dict(proposed)
    names = list(dict.fromkeys([*proposed, *previous]))
    old = np.array([previous.get(n, 0) for n in names], dtype=float)
    new = np.array([proposed.get(n, 0) for n in names], dtype=float)
    if old.sum() != TOTAL:  # a hand-edited object: start from its proportions
        old = TOTAL * old / old.sum() if old.sum() > 0 else new
    elif np.abs(new - old).max() < min_change:
        return dict(previous)
    delta = new - old
    biggest = np.abs(delta).max()
    scale = min(1.0, max_change / biggest) if biggest > 0 else 1.0
    weights = largest_remainder(old + scale * delta, TOTAL)
    return {n: int(w) for n, w in zip(names, weights, strict=True) if w > 0 or n in proposed}


def up_routes(
    problem: MeshProblem, source: str, down: Collection[str], strict: bool = False
) -> list[str]:
    """The routes of ``source`` (itself first, then its neighbours) to nodes that are up; when
    none is, all of them (a row needs a route, and no other could serve) or, ``strict``, none.
    """
    routes = [source, *problem.neighbours_of(source)]
    return [n for n in routes if n not in down] or ([] if strict else routes)


def evacuate(table: RouteTable, problem: MeshProblem, alive: Liveness) -> RouteTable:
    """``table`` without weight on nodes that cannot serve (down, or without a ready pod of
    the row's service; :meth:`Liveness.cannot_serve`): a source's share to them goes to the
    nodes that can it routes to, in proportion to their weights, or evenly over its routes
    that can when those carry none. A source that can reach no such node keeps its row, and
    so does one the problem does not know (a row of a node removed since, which the next
    write drops).
    """
    nodes = problem.topology.nodes
    out: RouteTable = {}
    for service, rows in table.items():
        down = alive.cannot_serve(service)
        out[service] = {}
        for source, row in rows.items():
            if source not in nodes or not any(row.get(n, 0) > 0 for n in down):
                out[service][source] = dict(row)
                continue
            routes = up_routes(problem, source, down, strict=True)
            # beyond its routes, an even split also reaches nodes that are no neighbours
            routes += [n for n, w in row.items() if w > 0 and n not in down and n not in routes]
            kept = {n: float(row.get(n, 0)) for n in routes}
            if routes and sum(kept.values()) <= 0:
                kept = dict.fromkeys(routes, 1.0)
            out[service][source] = integer_weights(kept) if routes else dict(row)
    return out


def limit_table(
    previous: RouteTable, proposed: RouteTable, max_change: int, min_change: int = 1
) -> RouteTable:
    """:func:`limit_step` for every service and source node."""
    return {
        service: {
            source: limit_step(previous.get(service, {}).get(source), row, max_change, min_change)
            for source, row in rows.items()
        }
        for service, rows in proposed.items()
    }


def fallback_table(
    kind: str, problem: MeshProblem, min_weight: int, alive: Liveness | None = None
) -> RouteTable | None:
    """The fallback routing: None for ``hold`` (keep what is there); ``local`` keeps each
    node's traffic on the node; ``static`` splits it over the node and its neighbours in
    proportion to their capacity hints (what a capacity-aware static mesh would do). Neither
    routes a service to a node that cannot serve it (``alive``): ``local`` sends those clients
    to the first neighbour that can."""
    if kind == "hold":
        return None
    alive = alive or Liveness()
    names = problem.topology.nodes
    capacity = dict(zip(names, problem.capacity_rps, strict=True))
    table: RouteTable = {}
    for service in problem.topology.services:
        down, rows = alive.cannot_serve(service), {}
        for source in names:
            routes = up_routes(problem, source, down)
            if kind == "local":
                fractions = {n: float(n == source) for n in routes}
                rows[source] = integer_weights(fractions, min_weight=0)
            else:
                fractions = {n: float(capacity[n]) for n in routes}
                rows[source] = integer_weights(fractions, min_weight=min_weight)
        table[service] = rows
    return table


class FailureCounter:
    """Counts intervals in a row without a usable decision, against the threshold."""

    def __init__(self, safety: SafetySpec):
        self.safety = safety
        self.count = 0

    def failed(self) -> bool:
        """Record a failed interval; True when the fallback is due."""
        self.count += 1
        return self.count >= self.safety.failure_threshold

    def succeeded(self) -> None:
        self.count = 0
