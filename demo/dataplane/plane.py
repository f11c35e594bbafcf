"""The simulator as a mesh: routes in, Istio metrics and ground truth out.

How routes are followed
    Envoy picks a destination per request at random with probability weight / total, so each
    step's per-destination counts are drawn from a multinomial with the current weights and
    handed to the simulator as exact fractions. The simulator only forwards to neighbours:
    a weight on any other destination is dropped with a warning and the rest renormalised;
    a row left with nothing routable, and a source without a rule and no catch-all, get
    static equal weights over the node and its neighbours, which is also what every node uses
    before any route is set (what a plain mesh does, the baseline of the tests). A source
    node without a rule follows the catch-all rule, as Istio's first-match-wins order does.

How the custom resources become the scenario is :mod:`demo.dataplane.scenario`'s docstring;
how the metrics approximate Istio's is :mod:`demo.dataplane.meter`'s.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from marl_operator.mesh.model import MeshService, node_from_edge_node
from prometheus_client import CollectorRegistry, generate_latest

from demo.dataplane.meter import Collector, Counters, Meter
from demo.dataplane.scenario import REQUEST_WORK, EdgeNodeSpec, load_table, scenario_data
from simulator.engine import hist_quantile
from simulator.env import EdgeEnv
from simulator.scenario import parse_scenario

logger = logging.getLogger("demo.dataplane")


@dataclass(frozen=True)
class _Second:
    """One simulated second of ground truth."""

    hist: np.ndarray  # (S, bins) client-perceived latency of served requests
    latency_sum_ms: np.ndarray  # (S,)
    served: np.ndarray  # (S,)
    lost: np.ndarray  # (S,) of this second's requests: refused, or routed to a node down
    lost_on_failure: np.ndarray  # (S,) queued earlier on a node that failed this second
    offered: np.ndarray  # (S,)
    busy: np.ndarray  # (N,) busy fraction


class DataPlane:
    """The simulator as a mesh: routes in, Istio metrics and ground truth out (see module
    docstring). Thread-safe: one thread steps while others set routes and read metrics."""

    def __init__(
        self,
        edge_nodes: Sequence[Mapping[str, Any]],
        edge_services: Sequence[Mapping[str, Any]],
        load: Mapping[str, Any],
        seed: int = 0,
        *,
        queue_seconds: float = 10.0,
        episode_steps: int = 3600,
        truth_seconds: int = 600,
        work: Mapping[str, float] | None = None,
    ):
        """``edge_nodes`` and ``edge_services`` are the custom resources as dicts; ``load``
        is requests/s as ``node -> rps`` for every service or ``service -> node -> rps``;
        ``work`` is the work of one request of a service (default 1: one request of a
        node's ``requestsPerSecond``)."""
        if not edge_nodes or not edge_services:
            raise ValueError("the data plane needs at least one EdgeNode and one EdgeService")
        self.nodes = [EdgeNodeSpec.from_object(obj) for obj in edge_nodes]
        self.mesh_nodes = tuple(node_from_edge_node(obj) for obj in edge_nodes)
        self.services: dict[str, MeshService] = {}
        self.namespaces: dict[str, str] = {}
        targets = []
        for obj in edge_services:
            svc = MeshService.from_edge_service(obj)
            if svc.name in self.services:
                raise ValueError(f"two EdgeServices are named {svc.name!r}: names must differ")
            self.services[svc.name] = svc
            self.namespaces[svc.name] = svc.namespace
            targets.append((svc.name, float(obj["spec"]["latencyTargetMs"])))
        self.node_names = [n.name for n in self.nodes]
        self.service_names = list(self.services)
        self.load = load_table(load, self.service_names, self.node_names)
        self.work = dict.fromkeys(self.service_names, 1.0)
        for svc, units in (work or {}).items():
            if svc not in self.services:
                names = self.service_names
                raise ValueError(f"work names service {svc!r}; the services are {names}")
            if not (math.isfinite(units) and units > 0):
                raise ValueError(f"work of {svc} must be a number > 0, got {units!r}")
            self.work[svc] = float(units)
        scenario = parse_scenario(
            scenario_data(
                self.nodes,
                targets,
                self.load,
                queue_seconds=queue_seconds,
                episode_steps=episode_steps,
                work=self.work,
            ),
            name="dataplane",
        )
        self.env = EdgeEnv(
            scenario, num_envs=1, action_mode="neighbours", seed=seed, track_servers=True
        )
        self.env.reset()
        topo = self.env.topology
        self.neighbours = {
            name: list(nb) for name, nb in zip(topo.nodes, topo.neighbours, strict=True)
        }
        self._rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(1,)))
        )
        self._lock = threading.RLock()
        self._factor = dict.fromkeys(self.node_names, 1.0)
        self._down: set[str] = set()  # nodes that failed (for the rest of the run)
        self._unready: set[tuple[str, str]] = set()  # (node, service): its pods not ready
        self._routes: dict[str, dict[str, dict[str, int]]] = {}
        self._origin: dict[str, str] = {}
        self._fractions = np.zeros((topo.num_nodes, topo.num_services, topo.max_degree + 1))
        for svc in self.service_names:
            self._set_equal(svc)
        self._meter = Meter(
            topo,
            rps=np.array([node.requests_per_second for node in self.nodes]),
            cores=np.array([node.cores for node in self.nodes]),
            step_seconds=scenario.step_seconds,
            work=np.array([self.work[svc] for svc in self.service_names]),
        )
        self._truth: deque[_Second] = deque(maxlen=truth_seconds)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(self))

    # ---------------------------------------------------------------------------------------
    @property
    def seconds(self) -> int:
        """Simulated seconds stepped so far."""
        return self._meter.counters.seconds

    def capacity(self) -> dict[str, float]:
        """Current requests per second of every node (after degradations; 0 once failed)."""
        with self._lock:
            return {
                n.name: 0.0
                if n.name in self._down
                else n.requests_per_second * self._factor[n.name]
                for n in self.nodes
            }

    def routes(self, service: str) -> dict[str, dict[str, int]]:
        """The weights applied to ``service``: source -> destination -> weight."""
        with self._lock:
            return {src: dict(row) for src, row in self._routes[self._service(service)].items()}

    def route_origin(self, service: str) -> str:
        """Where the applied weights came from: ``"equal"`` or ``"set"``."""
        with self._lock:
            return self._origin[self._service(service)]

    # ---------------------------------------------------------------------------------------
    def set_routes(
        self,
        service: str,
        by_source: Mapping[str, Mapping[str, int]],
        default: Mapping[str, int] | None = None,
    ) -> list[str]:
        """Apply weights ``by_source[source][destination]`` (as ``MeshRoutes.by_source``) to
        ``service`` from the next step on; sources without a row use ``default`` (Istio's
        catch-all), or equal weights without one. Returns the problems it worked around
        (also logged); refuses negative or non-finite weights with ValueError, changing
        nothing. See the module docstring for what cannot be represented."""
        svc = self._service(service)
        for row in [*by_source.values(), *([default] if default else [])]:
            for dest, weight in row.items():
                bad = isinstance(weight, bool) or not isinstance(weight, int | float | np.number)
                if bad or not math.isfinite(weight) or weight < 0:
                    raise ValueError(
                        f"{svc}: weight to {dest!r} must be a number >= 0, got {weight!r}"
                    )
        problems = [
            f"{svc}: source {src!r} is not an edge node; its rule is ignored"
            for src in by_source
            if src not in self.node_names
        ]
        table: dict[str, dict[str, int]] = {}
        for src in self.node_names:
            row = by_source.get(src, default)
            where = f"{svc}: source {src!r}" + ("" if src in by_source else " (catch-all rule)")
            table[src] = self._representable(src, row, where, problems) if row else {}
            if not table[src]:
                table[src] = self._equal_row(src)
                if row:
                    problems.append(f"{where}: no weight left on a reachable node; equal weights")
        with self._lock:
            for src, row in table.items():
                self._set_row(svc, src, row)
            self._routes[svc] = table
            self._origin[svc] = "set"
        for problem in problems:
            logger.warning(problem)
        logger.info("routes applied", extra={"fields": {"service": svc, "routes": table}})
        return problems

    def reset_routes(self, service: str) -> None:
        """Back to static equal weights over each node and its neighbours."""
        with self._lock:
            self._set_equal(self._service(service))

    def degrade(self, node: str, factor: float) -> None:
        """From the next step on, ``node`` serves ``factor`` times its EdgeNode's
        requestsPerSecond (0.5: it lost half; 1: restored). Not cumulative. Its cores stay:
        a degradation is a slowdown (throttling, a noisy neighbour), so the same cores are
        busy longer per request."""
        if node not in self.node_names:
            raise ValueError(f"unknown edge node {node!r}; the nodes are {self.node_names}")
        if isinstance(factor, bool) or not (math.isfinite(factor) and 0 < factor <= 100):
            raise ValueError(f"factor must be in (0, 100], got {factor!r}")
        with self._lock:
            self._factor[node] = float(factor)
            self._apply_capacity(node)
        logger.info("capacity changed", extra={"fields": {"node": node, "factor": factor}})

    def fail(self, node: str) -> None:
        """From the next step on, ``node`` is gone for the rest of the run, as a machine that
        left the cluster: its queue is lost, requests routed to it are refused (503), its
        clients send nothing and its pods' series stop."""
        if node not in self.node_names:
            raise ValueError(f"unknown edge node {node!r}; the nodes are {self.node_names}")
        with self._lock:
            self._down.add(node)
            self.env.set_node_down(node)
        logger.info("node failed", extra={"fields": {"node": node}})

    def unready(self, node: str, service: str) -> None:
        """From the next step on, ``service``'s pods on ``node`` are out of its endpoints (a
        failing readiness probe): requests of it routed there are refused (503, no upstream),
        while the node, its clients and its other services go on. What they hold is still
        answered, as a pod taken out of the endpoints finishes its requests."""
        if node not in self.node_names:
            raise ValueError(f"unknown edge node {node!r}; the nodes are {self.node_names}")
        svc = self._service(service)
        with self._lock:
            self._unready.add((node, svc))
        logger.info("pods not ready", extra={"fields": {"node": node, "service": svc}})

    def step(self) -> None:
        """Advance one simulated second with the current routes."""
        with self._lock:
            env = self.env
            if env.t >= env.steps:
                env.continue_episode()
                for node in self.node_names:
                    self._apply_capacity(node)
                for node in self._down:
                    env.set_node_down(node)
            t = env.t
            offered = env.arrivals[0, t]  # (N, S)
            counts = self._rng.multinomial(offered, self._fractions)  # (N, S, K+1)
            # A weight on a node that is down, or on one without a ready pod of the service,
            # is not shifted elsewhere, as the simulator's action mask would: Envoy answers
            # 503 (no healthy upstream). They go to the reject slot, so they count as lost,
            # and the meter puts them on their route.
            closed = np.array(
                [
                    [
                        node in self._down or (node, svc) in self._unready
                        for svc in self.service_names
                    ]
                    for node in self.node_names
                ]
            )  # (N, S)
            unroutable = np.where(closed[self._meter.dest].transpose(0, 2, 1), counts, 0)
            counts = counts - unroutable
            share = np.maximum(offered, 1)[..., None]
            action = np.zeros((1, *offered.shape, env.action_dim))
            action[0, ..., : counts.shape[-1]] = counts / share
            action[0, ..., -1] = unroutable.sum(axis=-1) / share[..., 0]
            _, _, _, info = env.step(action.reshape(1, env.num_agents, -1))
            out = env.last_outcome
            busy = self._meter.record(info, out, env.timeline.cpu[t], unroutable)
            n, s = offered.shape
            self._truth.append(
                _Second(
                    hist=out.server.service_hist[0].copy(),
                    latency_sum_ms=out.latency_sum_ms[0].reshape(n, s).sum(axis=0),
                    served=out.latency_count[0].reshape(n, s).sum(axis=0),
                    lost=(info["lost"] - info["lost_on_failure"])[0].sum(axis=0).astype(float),
                    lost_on_failure=info["lost_on_failure"][0].sum(axis=0).astype(float),
                    offered=offered.sum(axis=0).astype(float),
                    busy=busy,
                )
            )

    def run(self, seconds: int) -> None:
        """``seconds`` steps."""
        for _ in range(seconds):
            self.step()

    # ---------------------------------------------------------------------------------------
    def p95_ms(self, service: str, last_seconds: int = 10) -> float:
        """Client-perceived p95 latency (ms) of ``service``'s served requests over the last
        ``last_seconds`` simulated seconds (exact per request; NaN if none was served)."""
        i = self.service_names.index(self._service(service))
        hist = sum(sec.hist[i] for sec in self._window(last_seconds))
        return float(hist_quantile(np.asarray(hist, float), 0.95)) if np.any(hist) else math.nan

    def mean_ms(self, service: str, last_seconds: int = 10) -> float:
        """Client-perceived mean latency (ms) over the last ``last_seconds`` seconds."""
        i = self.service_names.index(self._service(service))
        window = self._window(last_seconds)
        served = sum(sec.served[i] for sec in window)
        return float(sum(sec.latency_sum_ms[i] for sec in window) / served) if served else math.nan

    def lost_fraction(self, service: str, last_seconds: int = 10) -> float:
        """Share of ``service``'s requests offered over the last seconds that were refused
        (503) or routed to a node that is down (the clients still there: those of a failed
        node offer nothing). What a failing node's queue held is :meth:`truth`'s
        ``lost_on_failure``."""
        i = self.service_names.index(self._service(service))
        window = self._window(last_seconds)
        offered = sum(sec.offered[i] for sec in window)
        return float(sum(sec.lost[i] for sec in window) / offered) if offered else 0.0

    def utilisation(self, node: str, last_seconds: int = 10) -> float:
        """Mean busy fraction of ``node`` over the last seconds."""
        j = self.node_names.index(node)
        window = self._window(last_seconds)
        return float(np.mean([sec.busy[j] for sec in window])) if window else math.nan

    def truth(self, last_seconds: int = 10) -> dict[str, Any]:
        """Ground truth for GET /truth (never read by the operator)."""
        with self._lock:
            services = {
                svc: {
                    "p95_ms": _finite(self.p95_ms(svc, last_seconds)),
                    "mean_ms": _finite(self.mean_ms(svc, last_seconds)),
                    "lost_fraction": self.lost_fraction(svc, last_seconds),
                    "lost_on_failure": float(
                        sum(sec.lost_on_failure[i] for sec in self._window(last_seconds))
                    ),
                    "latency_target_ms": self.env.scenario.services[i].latency_target_ms,
                }
                for i, svc in enumerate(self.service_names)
            }
            return {
                "seconds": self.seconds,
                "window_seconds": min(last_seconds, len(self._truth)),
                "services": services,
                "capacity_rps": self.capacity(),
                "degraded": {n: f for n, f in self._factor.items() if f != 1.0},
                "down": sorted(self._down),
                "unready": sorted(f"{svc}/{node}" for node, svc in self._unready),
                "routes": {
                    svc: {"origin": self._origin[svc], "by_source": self.routes(svc)}
                    for svc in self.service_names
                },
            }

    def metrics_text(self) -> bytes:
        """The Prometheus text exposition of the metrics."""
        return generate_latest(self.registry)

    # ---------------------------------------------------------------------------------------
    def _service(self, service: str) -> str:
        if service not in self.services:
            raise ValueError(f"unknown service {service!r}; the services are {self.service_names}")
        return service

    def _window(self, last_seconds: int) -> list[_Second]:
        if not 1 <= last_seconds <= (self._truth.maxlen or 0):
            raise ValueError(
                f"last_seconds must be in [1, {self._truth.maxlen}], got {last_seconds}"
            )
        with self._lock:
            return list(self._truth)[-last_seconds:]

    def _equal_row(self, src: str) -> dict[str, int]:
        return dict.fromkeys([src, *self.neighbours[src]], 1)

    def _set_equal(self, svc: str) -> None:
        table = {src: self._equal_row(src) for src in self.node_names}
        for src, row in table.items():
            self._set_row(svc, src, row)
        self._routes[svc] = table
        self._origin[svc] = "equal"

    def _representable(
        self, src: str, row: Mapping[str, int], where: str, problems: list[str]
    ) -> dict[str, int]:
        reachable = [src, *self.neighbours[src]]
        dropped = {d: w for d, w in row.items() if d not in reachable and w > 0}
        if dropped:
            problems.append(
                f"{where}: weights to {sorted(dropped)} dropped (neither the node nor one of its "
                f"neighbours {self.neighbours[src]}); the rest renormalised"
            )
        return {d: w for d, w in row.items() if d in reachable and w > 0}

    def _set_row(self, svc: str, src: str, row: Mapping[str, float]) -> None:
        i, s = self.node_names.index(src), self.service_names.index(svc)
        slots = [src, *self.neighbours[src]]
        weights = np.zeros(self._fractions.shape[-1])
        for dest, weight in row.items():
            weights[slots.index(dest)] = weight
        self._fractions[i, s] = weights / weights.sum()

    def _apply_capacity(self, node: str) -> None:
        spec = self.nodes[self.node_names.index(node)]
        cpu = spec.requests_per_second * REQUEST_WORK["mean"] * self._factor[node]
        self.env.set_node_cpu(node, cpu)

    def _snapshot(self) -> tuple[Counters, np.ndarray, np.ndarray]:
        """Counters, the destination of every (source, slot) and ``(N,)`` which nodes are
        down, copied under the lock."""
        with self._lock:
            down = np.array([n in self._down for n in self.node_names])
            return self._meter.counters.copy(), self._meter.dest, down


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
