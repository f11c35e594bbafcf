"""Prometheus readings -> the interval telemetry the simulator produces for the same mesh.

This is the operator's side of the shared observation contract. Istio reports per pair of
workloads what the clients saw; the policy and the system model want per node what the
simulator reports. The translation:

- a workload belongs to the edge node whose pod-label value ends its name after a dash
  (``fn-edge-1``, ``loadgen-edge-1``: per-node Deployments, as DESIGN.md assumes); the longest
  matching suffix wins, so ``edge-11`` is not mistaken for ``edge-1``;
- offered load of node *i* is what its clients sent, wherever it went; incoming load of node
  *j* is what reached it;
- the serving node's latency is the client's minus the link's one-way latency (declared on
  the EdgeNodes), averaged over the senders by request rate; the same for the p95, which is an
  approximation (a quantile of a mixture is not the mean of the quantiles);
- services differ in what a request costs: each service's CPU seconds per request served
  (cAdvisor CPU of its workloads over their requests, pooled over the nodes, smoothed across
  intervals) sets its work per request, relative to the services' mean; until every service
  has been measured, every request counts as one unit. Loads, capacities and service times
  are then in requests of the mean work, which is what the simulator's are in;
- capacity is measured where it can be: work served over the busy fraction of the node's
  CPU (cAdvisor), smoothed across intervals; the EdgeNode's hint serves until then. A node that
  slows down thus shows a lower capacity, which is what the policy was trained to react to;
- queued work follows from Little's law: the wait beyond the service time, times utilisation,
  is the seconds of work queued (what the simulator calls backlog).
- the CPU busy fraction (cAdvisor CPU seconds over the node's cores) is passed on as well:
  the system model averages it with the rate-based utilisation, two independent
  measurements of the same load;
- a node that is down (:mod:`marl_operator.liveness`) is what the simulator makes of a failed
  one: no capacity, no load, no queue, inactive. What its last series still say is not
  learned from, and its capacity estimate is kept for when it is back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from marl_operator.problem import MeshProblem
from marl_operator.prometheus import ServiceReadings
from marl_operator.report import NodeInputs
from policies.adaptation import IntervalTelemetry
from policies.observation import MeshTelemetry

MIN_BUSY = 0.05
"""Below this CPU busy fraction, requests over busy time is too noisy to estimate capacity."""

NO_UPSTREAM = "unknown"
"""The destination workload Istio reports for a request its proxy could send nowhere (503,
flag UH: the chosen subset has no ready endpoint)."""

MIN_WORK_RPS = 1.0
"""Below this many requests per second served (over all nodes), a service's CPU per request
is mostly its workloads' idle CPU, not its requests' cost; below it on one node, so is the
node's busy CPU, which then says nothing of its capacity."""


class InsufficientData(Exception):
    """The readings cannot describe the interval (no traffic reported for a service)."""


def node_of(workload: str, labels: Mapping[str, int]) -> int | None:
    """Index of the edge node a workload runs on (longest ``-<label>`` suffix), or None."""
    best, length = None, -1
    for label, index in labels.items():
        if (workload == label or workload.endswith("-" + label)) and len(label) > length:
            best, length = index, len(label)
    return best


@dataclass
class PairMatrices:
    """One service's readings as ``(N, N)`` source x destination matrices (NaN = no data)."""

    rate: np.ndarray
    success: np.ndarray
    mean_ms: np.ndarray
    p95_ms: np.ndarray
    cpu_cores: np.ndarray  # (N,) by destination node, NaN where not reported
    # (N,) by destination node: requests/s from clients on no edge node (an ingress gateway,
    # which the catch-all rule routes), and how many of them were served
    external: np.ndarray
    external_served: np.ndarray


def pair_matrices(readings: ServiceReadings, labels: Mapping[str, int], n: int) -> PairMatrices:
    out = PairMatrices(
        *(np.full((n, n), np.nan) for _ in range(4)), np.full(n, np.nan), np.zeros(n), np.zeros(n)
    )
    nodes: dict[str, int | None] = {}  # each workload recurs in every pair and metric

    def node_of_workload(workload: str) -> int | None:
        if workload not in nodes:
            nodes[workload] = node_of(workload, labels)
        return nodes[workload]

    for (src, dst), value in readings.rate.items():
        i, j = node_of_workload(src), node_of_workload(dst)
        if i is not None and j is not None:  # several workloads per node add up
            out.rate[i, j] = np.nan_to_num(out.rate[i, j]) + value
        elif j is not None:
            # A client on no edge node: not one of the policy's agents, but the node serves
            # its requests and spends CPU on them, which the CPU below counts.
            ok = readings.success.get((src, dst), 1.0)
            out.external[j] += value
            out.external_served[j] += value * min(max(ok, 0.0), 1.0)
    # Their ratios and latencies are averaged by their requests: a node's two client
    # workloads (a load generator and a frontend, say) each see their own.
    for name, source in (
        ("success", readings.success),
        ("mean_ms", readings.mean_ms),
        ("p95_ms", readings.p95_ms),
    ):
        matrix, weight = getattr(out, name), np.zeros((n, n))
        for (src, dst), value in source.items():
            i, j = node_of_workload(src), node_of_workload(dst)
            if i is None or j is None:
                continue
            w = max(readings.rate.get((src, dst), 0.0), 0.0)
            if weight[i, j] == 0:  # the first, or one of pairs without a rate: as it is
                matrix[i, j] = value
            if w > 0:
                matrix[i, j] = (matrix[i, j] * weight[i, j] + value * w) / (weight[i, j] + w)
                weight[i, j] += w
    # Only the CPU of workloads that served this service counts: the CPU query matches pods
    # by name prefix, so service fn would also take in the pods of a service fn-heavy.
    servers = {dst for _, dst in readings.rate}
    for workload, cores in readings.cpu_cores.items():
        j = node_of_workload(workload) if workload in servers else None
        if j is not None:
            out.cpu_cores[j] = np.nan_to_num(out.cpu_cores[j]) + cores
    return out


def _weighted(values: np.ndarray, weights: np.ndarray, axis) -> np.ndarray:
    """Rate-weighted mean over ``axis`` ignoring NaN values; NaN where nothing is known."""
    ok = np.isfinite(values) & (weights > 0)
    total = np.where(ok, weights, 0.0).sum(axis=axis)
    num = np.where(ok, values * weights, 0.0).sum(axis=axis)
    return np.where(total > 0, num / np.where(total > 0, total, 1.0), np.nan)


class Observer:
    """Turns each interval's readings into :class:`IntervalTelemetry` for one problem.

    Args:
        problem: the mesh.
        step_seconds: the policy's time unit (its training step); its observation counts
            requests per step.
        capacity_alpha: weight of the newest capacity measurement in the running estimate
            (smoothing keeps measurement noise out of the decision and the model's table cache).
    """

    def __init__(self, problem: MeshProblem, step_seconds: float = 1.0, capacity_alpha=0.5):
        self.problem = problem
        self.step_seconds = step_seconds
        self.capacity_alpha = capacity_alpha
        self.capacity = problem.capacity_rps.astype(float).copy()
        services = problem.topology.num_services
        self.cpu_per_request = np.full(services, np.nan)  # (S,) CPU seconds, smoothed
        self.work = np.ones(services)  # (S,) relative to the services' mean
        self.backlog = np.zeros(problem.topology.num_nodes)
        self.labels = {node.label: i for i, node in enumerate(problem.nodes)}
        self.inputs: dict[str, dict[str, NodeInputs]] = {}
        self.observed_p95_ms: dict[str, float] = {}  # client-perceived, per service
        # service -> nodes whose clients reported no request at all this interval: counted as
        # offering none, which the status says (a node without clients is idle, but one whose
        # proxies are not scraped looks the same)
        self.silent: dict[str, tuple[str, ...]] = {}
        # service -> nodes that served requests no latency was reported for: their rows are
        # left out of the model's data, and the status says so
        self.unmeasured: dict[str, tuple[str, ...]] = {}
        # service -> node -> requests/s its clients sent that found no endpoint: a subset
        # without ready pods, on a node that may well be up (the status says so)
        self.no_upstream: dict[str, dict[str, float]] = {}
        # service -> server workload -> requests/s it served that no edge node's label ends
        # its name: requests, latency and CPU left out, so a node may read idle while busy
        self.unplaced: dict[str, dict[str, float]] = {}
        # "source/server" -> the mean ms its clients saw, below the link's declared latency
        self.links_over: dict[str, float] = {}
        # service -> query -> what its answer did wrong, so that series were ignored (a
        # success rate without its labels counted every request as served)
        self.query_problems: dict[str, dict[str, str]] = {}

    def telemetry(
        self, readings: Mapping[str, ServiceReadings], down: np.ndarray | None = None
    ) -> IntervalTelemetry:
        """The interval's telemetry, or :class:`InsufficientData` saying which service lacks
        it; ``down`` ``(N,)`` marks the nodes that are down."""
        problem = self.problem
        topo = problem.topology
        n, _s = topo.num_nodes, topo.num_services
        down = np.zeros(n, dtype=bool) if down is None else np.asarray(down, dtype=bool)
        mats, uncalled = [], []
        for service in topo.services:
            got = readings.get(service)
            if got is None or got.empty:
                # Istio has no series of a pair before its first request: a service no client
                # has called yet offers nothing from every node (named in the status as such),
                # unless no service of the policy has a series at all.
                uncalled.append(service)
                mats.append(pair_matrices(ServiceReadings(service), self.labels, n))
                continue
            m = pair_matrices(got, self.labels, n)
            # Clients on no edge node alone (an ingress gateway): no agent routes the service,
            # but its nodes serve it and spend CPU on it, which the work below counts.
            if not np.isfinite(m.rate).any() and not (m.external > 0).any():
                raise InsufficientData(
                    f"no series of service {service} names an edge node's workload "
                    f"(expected names ending in -{'/-'.join(self.labels)})"
                )
            mats.append(m)
        if len(uncalled) == len(topo.services):
            why = [
                readings[service].problems["requestRate"]
                for service in uncalled
                if service in readings and "requestRate" in readings[service].problems
            ]
            raise InsufficientData(
                f"no request rate reported for service {', '.join(uncalled)}"
                + "".join(f": {problem}" for problem in why[:1])
            )

        # (a node that is down is expected to be silent: NodesReady says why)
        quiet = np.stack([~np.isfinite(m.rate).any(axis=1) for m in mats], -1)
        self.silent = self._named(quiet & ~down[:, None])
        self.no_upstream = self._no_upstream(readings)
        self.unplaced = self._unplaced(readings)
        self.query_problems = {s: dict(r.problems) for s, r in readings.items() if r.problems}
        rate = np.stack([np.nan_to_num(m.rate) for m in mats], axis=-1)  # (N, N, S)
        overall = _weighted(np.stack([m.p95_ms for m in mats], -1), rate, axis=(0, 1))
        self.observed_p95_ms = {
            service: float(value)
            for service, value in zip(topo.services, overall, strict=True)
            if np.isfinite(value)
        }
        success = np.stack([np.where(np.isnan(m.success), 1.0, m.success) for m in mats], -1)
        link = topo.link_matrix[..., None]
        client_ms = np.stack([m.mean_ms for m in mats], axis=-1)
        client_p95 = np.stack([m.p95_ms for m in mats], axis=-1)

        offered = rate.sum(axis=1)  # (N, S) by source
        incoming = rate.sum(axis=0)  # by destination
        failed_pairs = rate * (1.0 - np.clip(success, 0.0, 1.0))
        rejected = failed_pairs.sum(axis=0)
        # A link declared slower than what its clients see (a round trip declared, say)
        # would give a negative latency to the node: none is taken off below zero, and the
        # status names the link.
        over = (rate > 0) & (client_ms < link)
        self.links_over = {
            f"{topo.nodes[i]}/{topo.nodes[j]}": float(np.nanmin(client_ms[i, j][over[i, j]]))
            for i, j in zip(*np.nonzero(over.any(axis=-1)), strict=True)
        }
        server_mean = _weighted(np.maximum(client_ms - link, 0.0), rate, axis=0)  # (N, S)
        server_p95 = _weighted(np.maximum(client_p95 - link, 0.0), rate, axis=0)
        agent_ms = _weighted(client_ms, rate, axis=1)  # what each source's clients saw
        self.unmeasured = self._named((incoming > 0) & ~np.isfinite(server_mean) & ~down[:, None])

        # What each node served, for its CPU: its clients on no edge node included
        external = np.stack([m.external for m in mats], axis=-1)  # (N, S)
        external_served = np.stack([m.external_served for m in mats], axis=-1)
        served_requests = np.maximum(incoming - rejected, 0.0) + external_served
        cpu_by_service = np.stack([m.cpu_cores for m in mats], axis=-1)  # NaN unless reported
        work = self._update_work(cpu_by_service, served_requests)
        served = served_requests @ work  # (N,) work/s completed
        cpu = cpu_by_service.sum(axis=1)  # NaN unless every service reported
        busy = cpu / problem.cpu_cores
        busy = np.where(down, np.nan, busy)
        # A node that served (almost) nothing says nothing of its capacity, however busy its
        # CPU: taken at its word, an idle pod's CPU would drive it to zero and no request
        # would be routed there again to correct it.
        cpu_read = np.isfinite(busy) & (busy >= MIN_BUSY)
        measured = cpu_read & (served_requests.sum(axis=1) >= MIN_WORK_RPS)
        estimate = np.where(measured, served / np.where(measured, busy, 1.0), self.capacity)
        a = self.capacity_alpha
        self.capacity = np.where(measured, a * estimate + (1 - a) * self.capacity, self.capacity)
        capacity = np.where(down, 0.0, self.capacity)
        load = (incoming + external) @ work
        # Busy is busy, whatever it was spent on: the model's utilisation reads it too.
        utilisation = np.where(cpu_read, np.clip(busy, 0.0, 1.0), load / self.capacity)
        utilisation = np.where(down, 0.0, utilisation)

        wait_ms = np.clip(server_mean - 1000.0 * work[None, :] / self.capacity[:, None], 0.0, None)
        wait_s = _weighted(wait_ms, incoming, axis=1) / 1000.0
        backlog_end = np.where(down, 0.0, np.nan_to_num(np.minimum(utilisation, 1.0) * wait_s))
        backlog_start, self.backlog = self.backlog, backlog_end

        step = self.step_seconds
        mesh = MeshTelemetry(
            offered=(offered * step)[None],
            latency_ms=agent_ms[None],
            rejected=(failed_pairs.sum(axis=1) * step)[None],
            arrived_prev=(offered * step)[None],
            utilisation=np.minimum(utilisation, 1.0)[None],
            backlog=(backlog_end / step)[None],
            capacity=capacity * step,
            active=~down & (capacity > 0),
            target_ms=problem.target_ms,
        )
        self.inputs = {
            service: {
                node.name: NodeInputs(
                    offered_rps=float(offered[i, k]),
                    incoming_rps=float(incoming[i, k]),
                    success=_finite(1.0 - rejected[i, k] / incoming[i, k])
                    if incoming[i, k] > 0
                    else None,
                    mean_ms=_finite(server_mean[i, k]),
                    p95_ms=_finite(server_p95[i, k]),
                    capacity_rps=float(capacity[i]),
                    cpu_ms_per_request=_finite(
                        1000.0 * cpu_by_service[i, k] / served_requests[i, k]
                    )
                    if served_requests[i, k] > 0
                    else None,
                )
                for i, node in enumerate(problem.nodes)
            }
            for k, service in enumerate(topo.services)
        }
        return IntervalTelemetry(
            offered=offered,
            incoming=incoming,
            rejected=rejected,
            mean_ms=server_mean,
            p95_ms=server_p95,
            capacity=capacity,
            backlog_start=backlog_start,
            backlog_end=backlog_end,
            mesh=mesh,
            busy=busy,
            work=work.copy(),
        )

    def _named(self, where: np.ndarray) -> dict[str, tuple[str, ...]]:
        """``service -> nodes`` where the ``(N, S)`` mask holds, for services with any."""
        names = [node.name for node in self.problem.nodes]
        out = {
            service: tuple(names[i] for i in np.flatnonzero(where[:, k]))
            for k, service in enumerate(self.problem.topology.services)
        }
        return {service: nodes for service, nodes in out.items() if nodes}

    def _no_upstream(self, readings: Mapping[str, ServiceReadings]) -> dict[str, dict[str, float]]:
        """``service -> node -> requests/s`` of the node's clients answered with no upstream."""
        names = [node.name for node in self.problem.nodes]

        def client_node(src: str, dst: str) -> str | None:
            i = node_of(src, self.labels)
            return names[i] if dst == NO_UPSTREAM and i is not None else None

        return self._rates_by(readings, client_node)

    def _unplaced(self, readings: Mapping[str, ServiceReadings]) -> dict[str, dict[str, float]]:
        """``service -> workload -> requests/s`` served by workloads on no edge node."""

        def unplaced_server(_: str, dst: str) -> str | None:
            return dst if dst != NO_UPSTREAM and node_of(dst, self.labels) is None else None

        return self._rates_by(readings, unplaced_server)

    def _rates_by(
        self, readings: Mapping[str, ServiceReadings], key: Callable[[str, str], str | None]
    ) -> dict[str, dict[str, float]]:
        """``service -> key -> requests/s`` summed over the (client, server) workload pairs
        with traffic that ``key`` names (None: left out)."""
        out: dict[str, dict[str, float]] = {}
        for service in self.problem.topology.services:
            for (src, dst), rps in readings.get(service, ServiceReadings(service)).rate.items():
                if rps > 0 and (name := key(src, dst)) is not None:
                    row = out.setdefault(service, {})
                    row[name] = row.get(name, 0.0) + float(rps)
        return out

    def _update_work(self, cpu: np.ndarray, served: np.ndarray) -> np.ndarray:
        """``(S,)`` work of one request of each service relative to the services' mean:
        CPU seconds over requests served, pooled over the nodes that report both (a node's
        own figure mixes in how fast its cores are, which its capacity already measures)."""
        known = np.isfinite(cpu) & (served > 0)
        seconds = np.where(known, cpu, 0.0).sum(axis=0)
        requests = np.where(known, served, 0.0).sum(axis=0)
        fresh = (requests >= MIN_WORK_RPS) & (seconds > 0)
        per_request = np.where(fresh, seconds / np.where(fresh, requests, 1.0), np.nan)
        a, then = self.capacity_alpha, self.cpu_per_request
        smoothed = np.where(np.isfinite(then), a * per_request + (1 - a) * then, per_request)
        self.cpu_per_request = np.where(fresh, smoothed, then)
        if np.isfinite(self.cpu_per_request).all():
            self.work = self.cpu_per_request / self.cpu_per_request.mean()
        return self.work


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
