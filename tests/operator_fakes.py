"""In-memory stand-ins for the cluster and Prometheus, for the operator's unit tests.

:class:`QueueingMesh` answers like a small real mesh would: requests follow the routes the
operator wrote, each node is an M/M/1 queue with a capacity the test can change, and the
readings come back in Istio's per-workload-pair shape. It is deliberately not the simulator
(the operator never imports it), so the operator's translation is checked against an
independent model of the same physics.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from marl_operator.kube import PodsUnreadable
from marl_operator.mesh.factory import writer_for
from marl_operator.mesh.model import MeshNode, MeshRoutes, MeshService
from marl_operator.problem import cpu_quantity
from marl_operator.prometheus import MetricsUnavailable, ServiceReadings

from demo.cluster import kind_nodes, workload_objects

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


def example_policy_body(**spec_changes) -> dict:
    body = example("policy.yaml")[0]
    body["metadata"].setdefault("generation", 1)
    body["spec"].update(spec_changes)
    return body


def renamed(name: str, **mesh: str) -> dict[str, Any]:
    """The example EdgeService as ``name``, its routes in objects of that name (or ``mesh``'s),
    for a host of that name (two services of one host are refused)."""
    fn = example("edgeservice.yaml")[0]
    own = {"virtualService": name, "destinationRule": name, **mesh}
    host = f"{name}.edge.svc.cluster.local"
    return {
        **fn,
        "metadata": {**fn["metadata"], "name": name},
        "spec": {**fn["spec"], "host": host, "mesh": {**fn["spec"]["mesh"], **own}},
    }


class QueueingMesh:
    """Routes in memory plus M/M/1 nodes that produce Istio-style readings."""

    def __init__(
        self,
        offered_rps: Mapping[str, float],
        capacity_rps: Mapping[str, float],
        cores: Mapping[str, float],
        link_ms: Mapping[frozenset[str], float],
    ):
        self.offered = dict(offered_rps)
        self.capacity = dict(capacity_rps)
        self.cores = dict(cores)
        self.link_ms = dict(link_ms)
        self.routes: dict[str, MeshRoutes] = {}
        self.writes = 0
        self.down = False  # Prometheus unreachable
        self.sample_age_s: float | None = 0.0  # of every series; None: marked stale
        self.stale_sources: set[str] = set()  # nodes whose clients' series are an hour old
        # (service, node): the series of its pods there are an hour old (they stopped)
        self.stale_servers: set[tuple[str, str]] = set()

    # -- MeshClient ------------------------------------------------------------------------

    def read(self, service: MeshService, nodes: tuple[MeshNode, ...]) -> MeshRoutes | None:
        """The routes written, read back through the provider's objects as the operator
        reads them (routes to edge nodes not among ``nodes`` read as gone)."""
        routes = self.routes.get(service.name)
        if routes is None:
            return None
        writer = writer_for(service.provider)
        return writer.read(service, nodes, writer.desired(service, routes))

    def write(self, service: MeshService, routes: MeshRoutes) -> bool:
        old = self.routes.get(service.name)
        if old is not None and old.by_source == routes.by_source:
            return False
        self.routes[service.name] = routes
        self.writes += 1
        return True

    # -- physics ---------------------------------------------------------------------------

    def split(self, service: str) -> dict[str, dict[str, float]]:
        """Fractions per source; without routes every node gets an equal share."""
        names = list(self.offered)
        routes = self.routes.get(service)
        if routes is None:
            return {i: {j: 1 / len(names) for j in names} for i in names}
        return {
            i: {j: w / 100 for j, w in routes.by_source.get(i, routes.default).items()}
            for i in names
        }

    def node_latency_ms(self, service: str) -> dict[str, tuple[float, float]]:
        """(arrival rate, mean latency) at every node."""
        split = self.split(service)
        out = {}
        for j, mu in self.capacity.items():
            lam = sum(self.offered[i] * split[i].get(j, 0.0) for i in self.offered)
            mean = 1000.0 / (mu - lam) if lam < 0.98 * mu else 1000.0 / (0.02 * mu)
            out[j] = (lam, mean)
        return out

    def p95_ms(self, service: str) -> float:
        """Client-perceived p95 over all requests (M/M/1 sojourn is exponential)."""
        split, nodes = self.split(service), self.node_latency_ms(service)
        rate = [self.offered[i] * f for i in self.offered for f in split[i].values()]
        p95 = [
            3.0 * nodes[j][1] + self.link_ms.get(frozenset((i, j)), 0.0)
            for i in self.offered
            for j in split[i]
        ]
        return float(np.average(p95, weights=rate))

    # -- MetricsSource -----------------------------------------------------------------------

    def read_metrics(self, *, namespace, service, host, window, overrides=None, destinations=""):
        if self.down:
            raise MetricsUnavailable("Prometheus at http://prometheus:9090 is unreachable")
        split, nodes = self.split(service), self.node_latency_ms(service)
        rate, success, mean, p95 = {}, {}, {}, {}
        for i in self.offered:
            for j, f in split[i].items():
                if f <= 0:
                    continue
                key = (f"loadgen-{i}", f"{service}-{j}")
                link = self.link_ms.get(frozenset((i, j)), 0.0)
                rate[key] = self.offered[i] * f
                success[key] = 1.0
                mean[key] = nodes[j][1] + link
                p95[key] = 3.0 * nodes[j][1] + link
        cpu = {
            f"{service}-{j}": min(nodes[j][0] / mu, 1.0) * self.cores[j]
            for j, mu in self.capacity.items()
        }
        age = {} if self.sample_age_s is None else dict.fromkeys(rate, self.sample_age_s)
        age |= {
            pair: 3600.0 for pair in rate if pair[0].removeprefix("loadgen-") in self.stale_sources
        }
        age |= {
            pair: 3600.0
            for pair in rate
            if (service, pair[1].removeprefix(f"{service}-")) in self.stale_servers
        }
        return ServiceReadings(service, rate, success, mean, p95, cpu, age)


class Reader:
    """Adapts :meth:`QueueingMesh.read_metrics` to the reader interface."""

    def __init__(self, mesh: QueueingMesh):
        self.mesh = mesh

    def read(self, **kwargs) -> ServiceReadings:
        return self.mesh.read_metrics(**kwargs)


class FakeKube:
    """The few Kube calls the runtime makes, over example objects."""

    def __init__(self, edge_nodes: list[dict], edge_services: list[dict]):
        self.nodes = edge_nodes
        self.services = {s["metadata"]["name"]: s for s in edge_services}
        self.status: dict[str, dict] = {}
        self.edge_status: dict[str, dict] = {}
        self.edge_status_writes = 0
        # kind's workers, which the example EdgeNodes name and select, all Ready
        self.cluster_nodes = kind_nodes()
        # the demo workload's Service fn and its pods, one per edge node, all ready
        self.workload = workload_objects()

    def edge_nodes(self):
        return self.nodes

    def kubernetes_nodes(self):
        return self.cluster_nodes

    def edge_services(self, namespace, names):
        return {n: self.services[n] for n in names if n in self.services}

    def service_pods(self, namespace, name):
        def named(kind):
            return [
                o
                for o in self.workload
                if o["kind"] == kind and o["metadata"]["namespace"] == namespace
            ]

        found = [s for s in named("Service") if s["metadata"]["name"] == name]
        if not found:
            raise PodsUnreadable(f"the Service {namespace}/{name} does not exist")
        selector = found[0]["spec"]["selector"].items()
        return [p for p in named("Pod") if selector <= p["metadata"]["labels"].items()]

    def patch_policy_status(self, namespace, name, status):
        self.status[f"{namespace}/{name}"] = status

    def patch_edge_node_status(self, name, status):
        self.edge_status[name] = status
        self.edge_status_writes += 1


def example_mesh(
    load: tuple[float, ...] = (60.0, 40.0, 20.0), capacity: tuple[float, ...] | None = None
) -> QueueingMesh:
    """The example EdgeNodes as a queueing mesh, nodes in their order: each node's clients
    offer ``load``; capacity (``capacity`` unless given), cores and link latencies are what
    the EdgeNodes declare, so the CPU the mesh reports means what the operator reads."""
    nodes = example("edgenodes.yaml")
    names = [n["metadata"]["name"] for n in nodes]
    declared = [n["spec"]["capacity"] for n in nodes]
    capacity = capacity or tuple(float(c["requestsPerSecond"]) for c in declared)
    links = {
        frozenset((n["metadata"]["name"], nb["name"])): float(nb["latencyMs"])
        for n in nodes
        for nb in n["spec"]["neighbours"]
    }
    return QueueingMesh(
        dict(zip(names, load, strict=True)),
        dict(zip(names, capacity, strict=True)),
        {name: cpu_quantity(c["cpu"], name) for name, c in zip(names, declared, strict=True)},
        links,
    )
