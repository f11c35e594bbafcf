"""The best static routing of the fluid model: the yardstick every policy is measured against.

The fluid model replaces requests by flows. Agent ``a`` (a node and a service) receives
``arrivals[a]`` requests per second and splits them over its routes (serve locally, or send one
hop to a neighbour, which serves them) and rejection. Node ``j`` is an M/M/1 server of work:
with load ``w_j`` (work per second) out of capacity ``mu_j`` its requests spend in total
``w_j / (mu_j - w_j)`` seconds per second inside it. The cost per second is

    sum_j w_j / (mu_j - w_j)  +  sum_routes flow * link delay  +  sum_a reject_cost_a * rejected_a

subject to flow conservation and ``w_j <= max_utilisation * mu_j``. Every term is convex, so
the optimum is global; SLSQP with exact gradients finds it in milliseconds for tens of agents.
At the optimum every used route has the same marginal cost ``mu/(mu - w)^2 + delay`` and an
agent rejects only when that reaches its reject cost.

The same module scores any static weights on the same model (:func:`fluid_cost`), so claims
like "no heuristic beats the oracle" are checked on identical arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import LinearConstraint, minimize

from policies.topology import Topology


class OracleError(RuntimeError):
    """The solver did not converge; the message carries SciPy's reason."""


@dataclass(frozen=True, eq=False)
class FluidModel:
    """One steady state of the mesh, in seconds, requests and work units.

    Attributes:
        topology: nodes, services and neighbour slots (the action layout).
        capacity: ``(N,)`` work per second each node serves; 0 for a node that is down.
        arrivals: ``(A,)`` requests per second entering at each agent.
        work: ``(S,)`` mean work of one request of each service.
        reject_cost: ``(S,)`` cost of rejecting one request, in seconds of latency.
        max_utilisation: highest load a node may carry (bounded queues overflow above it).
    """

    topology: Topology
    capacity: np.ndarray
    arrivals: np.ndarray
    work: np.ndarray
    reject_cost: np.ndarray
    max_utilisation: float = 0.95
    routes: np.ndarray = field(init=False, repr=False)
    """``(A, K+1)`` serving node of each route slot (local first), -1 where there is none."""
    delay: np.ndarray = field(init=False, repr=False)
    """``(A, K+1)`` one-way link delay of each route slot, seconds."""
    incidence: np.ndarray = field(init=False, repr=False)
    """``(A*(K+1), N)`` 1 where a route slot is served by a node: flows times it are loads,
    one matrix product instead of a scatter (a model step does this for hundreds of rows)."""

    def __post_init__(self) -> None:
        topo = self.topology
        s = topo.num_services
        nodes = np.arange(topo.num_nodes)
        per_node = np.concatenate([nodes[:, None], topo.neighbour_index], axis=1)  # (N, K+1)
        up = np.asarray(self.capacity) > 0
        usable = (per_node >= 0) & up[np.where(per_node >= 0, per_node, 0)] & up[:, None]
        routes = np.repeat(np.where(usable, per_node, -1), s, axis=0)
        safe = np.where(per_node >= 0, per_node, 0)
        delay = np.where(per_node >= 0, topo.link_matrix[nodes[:, None], safe] / 1000.0, 0.0)
        incidence = routes.reshape(-1)[:, None] == np.arange(topo.num_nodes)
        object.__setattr__(self, "routes", routes)
        object.__setattr__(self, "delay", np.repeat(delay, s, axis=0))
        object.__setattr__(self, "incidence", incidence.astype(float))

    @property
    def action_dim(self) -> int:
        return self.topology.max_degree + 2

    def service_of_agent(self) -> np.ndarray:
        return np.arange(self.topology.num_agents) % self.topology.num_services


@dataclass(frozen=True)
class Routing:
    """An optimal routing: weights per agent over [local, neighbours..., reject]."""

    weights: np.ndarray  # (A, K+2) fractions summing to 1
    cost: float  # cost per second of the fluid model
    cost_per_request: float  # cost divided by the offered requests per second
    node_utilisation: np.ndarray  # (N,)


def _delay_cost(load: np.ndarray, capacity: np.ndarray, rho_max: float) -> tuple:
    """``sum w/(mu - w)`` and its derivative, extended as a quadratic past ``rho_max * mu`` so a
    solver probing beyond the constraint sees large finite numbers, not a pole."""
    mu = np.maximum(capacity, 1e-12)
    knee = rho_max * mu
    w = np.minimum(load, knee)
    f = w / (mu - w)
    d1 = mu / (mu - w) ** 2
    d2 = 2 * mu / (mu - w) ** 3
    over = np.maximum(load - knee, 0.0)
    value = f + d1 * over + 0.5 * d2 * over**2
    grad = d1 + d2 * over
    up = capacity > 0
    return np.where(up, value, 0.0), np.where(up, grad, 0.0)


def route_flows(
    model: FluidModel, weights: np.ndarray, arrivals: np.ndarray | None = None
) -> tuple:
    """Requests per second on every route ``(..., A, K+1)`` and work per second arriving at
    every node ``(..., N)``. ``arrivals`` ``(..., A)`` replaces the model's own, e.g. sampled
    forecasts in a batch."""
    w = np.asarray(weights, dtype=float)
    w = w / np.maximum(w.sum(axis=-1, keepdims=True), 1e-12)
    rates = model.arrivals if arrivals is None else np.asarray(arrivals, dtype=float)
    flow = np.where(model.routes >= 0, w[..., :-1], 0.0) * rates[..., :, None]
    work = model.work[model.service_of_agent()][:, None]
    by_route = (flow * work).reshape(*flow.shape[:-2], -1)
    return flow, by_route @ model.incidence


def fluid_cost(model: FluidModel, weights: np.ndarray) -> np.ndarray:
    """Cost per second of static ``weights`` ``(..., A, K+2)`` on the fluid model.

    Weights on absent or failed routes are treated as rejects. A node pushed past its maximum
    utilisation serves up to that level and rejects the excess of every incoming flow in
    proportion (what a bounded queue does), so overloaded weights get a finite, fair cost.
    """
    flow, load = route_flows(model, weights)
    cap = model.max_utilisation * model.capacity
    served_share = np.where(load > cap, cap / np.maximum(load, 1e-12), 1.0)  # (..., N)
    served = flow * (served_share @ model.incidence.T).reshape(flow.shape)
    delay, _ = _delay_cost(np.minimum(load, cap), model.capacity, model.max_utilisation)
    rc = model.reject_cost[model.service_of_agent()]
    rejected = model.arrivals - served.sum(axis=-1)
    return delay.sum(-1) + (served * model.delay).sum((-2, -1)) + (rejected * rc).sum(-1)


def solve(model: FluidModel, tol: float = 1e-12, max_iter: int = 500) -> Routing:
    """The optimal static routing of ``model`` (see the module docstring)."""
    a_count, k1 = model.routes.shape
    arrivals = np.asarray(model.arrivals, dtype=float)
    live = (model.routes >= 0) & (arrivals[:, None] > 0)
    agent, slot = np.nonzero(live)
    node = model.routes[agent, slot]
    svc = model.service_of_agent()[agent]
    n = model.topology.num_nodes
    rc = model.reject_cost[model.service_of_agent()]

    # Variables y_v: the fraction of agent(v)'s arrivals on route v. Flow x_v = arrivals * y_v.
    scale = arrivals[agent]
    work_v = model.work[svc] * scale  # d load[node] / d y_v
    linear = scale * (model.delay[agent, slot] - rc[agent])  # link delay minus the saved reject
    to_node = np.zeros((n, agent.size))
    to_node[node, np.arange(agent.size)] = work_v
    per_agent = np.zeros((a_count, agent.size))
    per_agent[agent, np.arange(agent.size)] = 1.0
    constant = float((arrivals * rc).sum())

    # SLSQP's line search wants gradients of order one: measure cost relative to rejecting
    # everything (the objective is 1 at the start, y = 0).
    norm = max(constant, 1e-12)

    def objective(y: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = _delay_cost(to_node @ y, model.capacity, model.max_utilisation)
        cost = float(value.sum() + linear @ y) + constant
        return cost / norm, (to_node.T @ grad + linear) / norm

    weights = np.zeros((a_count, k1 + 1))
    if agent.size:
        cap = model.max_utilisation * np.asarray(model.capacity, dtype=float)
        constraints = [
            LinearConstraint(per_agent[per_agent.any(1)], -np.inf, 1.0),
            LinearConstraint(to_node[to_node.any(1)], -np.inf, cap[to_node.any(1)]),
        ]
        result = minimize(
            objective,
            np.zeros(agent.size),
            jac=True,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * agent.size,
            constraints=constraints,
            options={"ftol": tol, "maxiter": max_iter},
        )
        if not result.success:
            raise OracleError(f"fluid-model oracle did not converge: {result.message}")
        weights[agent, slot] = np.clip(result.x, 0.0, 1.0)
    leftover = 1.0 - weights[:, :-1].sum(axis=1)
    idle = arrivals <= 0
    weights[:, -1] = np.where(idle, 0.0, np.clip(leftover, 0.0, 1.0))
    weights[idle, 0] = np.where(model.routes[idle, 0] >= 0, 1.0, 0.0)
    weights[idle, -1] = np.where(model.routes[idle, 0] >= 0, 0.0, 1.0)
    weights /= weights.sum(axis=1, keepdims=True)
    load = route_flows(model, weights)[1]
    util = np.where(model.capacity > 0, load / np.maximum(model.capacity, 1e-12), 0.0)
    cost = float(fluid_cost(model, weights))
    return Routing(
        weights=weights,
        cost=cost,
        cost_per_request=cost / max(float(arrivals.sum()), 1e-12),
        node_utilisation=util,
    )
