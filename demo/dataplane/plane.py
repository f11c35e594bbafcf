"""A simulated service-mesh data plane: the simulator obeys live Istio routes and serves
Istio-style metrics, standing in for Istio and the edge functions.

The operator's closed-loop test and the embedded demo need a mesh whose latency responds to
the weights the operator writes, without a cluster full of real functions. This process
builds the simulator's mesh from the same EdgeNode and EdgeService objects a user applies,
steps it once per simulated second, routes every node's requests by the weights of the
services' VirtualServices (read from the API server) and serves the metrics Prometheus would
scrape from Istio's sidecars and cAdvisor.

Examples:

    python -m demo.dataplane --kubeconfig kind.kubeconfig --namespace edge --port 9464 \\
        --load edge-0=40,edge-1=40,edge-2=40
    python -m demo.dataplane --kubeconfig kind.kubeconfig --namespace edge --port 0 \\
        --load fn/edge-0=40,fn/edge-1=40,fn/edge-2=40 --speed 1 --seed 0
    curl -s localhost:9464/metrics | grep istio_requests_total
    curl -s -X POST 'localhost:9464/degrade?node=edge-2&factor=0.5'
    curl -s localhost:9464/truth

Endpoints: GET /metrics (Prometheus text format); GET /truth?seconds=10 (JSON: per-service
p95 and mean latency over the last 10 simulated seconds, the routes applied, the
capacities); POST /degrade?node=N&factor=F (N serves F times its EdgeNode's capacity from
now on; F=1 restores it); GET /healthz. It prints ``ready port=N`` on stdout once it serves,
logs one JSON object per line on stderr and stops cleanly on SIGTERM or SIGINT.

How the custom resources become a simulator scenario
    One request is one unit of work and a node's ``spec.capacity.requestsPerSecond`` is its
    work per second, so a node serves that many requests per second; steps are one second;
    arrivals are Poisson at the offered load; links carry the neighbours' ``latencyMs`` (a
    link one side declares is used both ways); every node queues ``queue_seconds`` of its
    nominal capacity before it answers 503, so queues, not drops, show an overload first.
    ``spec.capacity.cpu`` (cores, default 1) only scales the CPU metric.

How routes are followed
    Envoy picks a destination per request at random with probability weight / total, so each
    step's per-destination counts are drawn from a multinomial with the current weights and
    handed to the simulator as exact fractions. The simulator only forwards to neighbours:
    a weight on any other destination is dropped with a warning and the rest renormalised;
    a row left with nothing routable, and a source without a rule and no catch-all, get
    static equal weights over the node and its neighbours, which is also what every node uses
    before any route is set (what a plain mesh does, the baseline of the tests). A source
    node without a rule follows the catch-all rule, as Istio's first-match-wins order does.

How the metrics approximate Istio's
    ``istio_requests_total{reporter="source"}`` counts the requests node i sends to node j in
    a step, with code 200 for those j accepts and 503 for those its full queue refuses: the
    per-pair rates are exactly what the routing did. The simulator knows each request's
    latency by serving node, not by (source, serving node) pair, so a pair's latency
    histogram gets that step's latency distribution of requests served at j (queueing and
    service) shifted by the link i -> j, spread over the pair's accepted requests; a 503 takes
    the link latency. Requests from different sources share j's queue, so their latencies
    differ only by their place within the step. Counting a request in the step it is routed
    rather than the one it completes in differs from Istio by at most a queue's worth of
    requests. ``container_cpu_usage_seconds_total`` is busy fraction x cores x seconds, split
    among services by the work each had served. The exact client-perceived latencies are kept
    as ground truth (:meth:`DataPlane.p95_ms`, :meth:`DataPlane.mean_ms`, GET /truth) for
    tests and the demo; the operator never reads them.

Workload names: the server of service S on edge node N is ``S-L`` and its clients are
``loadgen-L``, with L the node's pod-label value (``spec.podLabelValue`` or its name), so
the operator maps a workload to its edge node by that suffix. Pods are named like Deployment
pods (``S-L-<hash>-<hash>``). Simulated time runs ``--speed`` times faster than wall time;
Prometheus measures rates in wall time, so a closed loop wants ``--speed 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import numpy as np
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from marl_operator.mesh.istio import IstioWriter
from marl_operator.mesh.model import (
    Manifest,
    MeshError,
    MeshNode,
    MeshRoutes,
    MeshService,
    node_from_edge_node,
)
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from policies.topology import Topology
from policies.weights import largest_remainder
from simulator.engine import LATENCY_BINS_MS, StepOutcome, hist_quantile
from simulator.env import EdgeEnv
from simulator.scenario import parse_scenario

logger = logging.getLogger("demo.dataplane")

ISTIO_BUCKETS_MS = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000,
    30000, 60000, 300000, 600000, 1800000, 3600000,
)  # fmt: skip
"""Upper bounds of Istio's default ``istio_request_duration_milliseconds`` buckets (+Inf after)."""

REQUEST_WORK = {"min": 0.4, "mean": 1.0, "max": 1.6, "std": 0.2}
"""Work of one request in units of one request's mean work (a clipped normal, mean exactly 1)."""

NODE_RAM = 1.0e9
"""RAM of every node: far more than any queue needs, so only CPU (requests/s) ever binds."""

DEFAULT_CORES = 1.0
"""Cores of an EdgeNode without ``spec.capacity.cpu`` (only the CPU metric uses them)."""

MARL_GROUP, MARL_VERSION = "marl.dev", "v1alpha1"
ISTIO_GROUP, ISTIO_VERSION, VIRTUAL_SERVICES = "networking.istio.io", "v1", "virtualservices"

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_POD_HASH_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what Kubernetes uses for name suffixes
_OK, _REFUSED = 0, 1  # response-code axis: 200, 503
_CODES = (("200", "-"), ("503", "UO"))  # response_code, response_flags (UO: upstream overflow)


# --------------------------------------------------------------------------------------------
# Custom resources -> scenario


def cpu_cores(quantity: str | int | float) -> float:
    """Cores of a Kubernetes CPU quantity (``"4"``, ``"2500m"``, ``2``, ``"0.5"``)."""
    text = str(quantity).strip()
    try:
        value = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        raise ValueError(
            f"CPU quantity {quantity!r} is not a number of cores or millicores"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"CPU quantity {quantity!r} must be positive")
    return value


@dataclass(frozen=True)
class EdgeNodeSpec:
    """What the data plane needs of one EdgeNode."""

    name: str
    label: str
    requests_per_second: float
    cores: float
    neighbours: tuple[tuple[str, float], ...]  # (name, one-way latency ms), declared order

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> EdgeNodeSpec:
        name = obj["metadata"]["name"]
        spec = obj.get("spec") or {}
        capacity = spec.get("capacity") or {}
        rps = capacity.get("requestsPerSecond")
        if rps is None or isinstance(rps, bool) or not float(rps) > 0:
            raise ValueError(
                f"EdgeNode {name!r}: the data plane needs spec.capacity.requestsPerSecond > 0 "
                f"(its service rate), got {rps!r}"
            )
        cores = cpu_cores(capacity["cpu"]) if "cpu" in capacity else DEFAULT_CORES
        neighbours = tuple(
            (n["name"], float(n.get("latencyMs", 0.0))) for n in spec.get("neighbours") or ()
        )
        return cls(name, node_from_edge_node(obj).label, float(rps), cores, neighbours)


def _links(nodes: Sequence[EdgeNodeSpec]) -> tuple[dict[str, list[str]], dict[frozenset, float]]:
    """Symmetric neighbour lists and link latencies. An EdgeNode may list a neighbour that
    does not list it back, but the simulator's links are symmetric: a link either side
    declares is used both ways (the mean latency if the two sides disagree)."""
    names = {n.name for n in nodes}
    declared: dict[frozenset, list[float]] = {}
    neighbours: dict[str, list[str]] = {n.name: [] for n in nodes}
    for node in nodes:
        for other, ms in node.neighbours:
            if other not in names or other == node.name:
                logger.warning(
                    "neighbour ignored", extra={"fields": {"node": node.name, "neighbour": other}}
                )
                continue
            declared.setdefault(frozenset((node.name, other)), []).append(ms)
    for pair, values in declared.items():
        a, b = sorted(pair)
        if len(values) == 1 or values[0] != values[1]:
            logger.warning(
                "link made symmetric",
                extra={"fields": {"between": [a, b], "declared_ms": values}},
            )
    for node in nodes:  # each node's own order first, then links only the other side declared
        for other, _ in node.neighbours:
            if frozenset((node.name, other)) in declared and other not in neighbours[node.name]:
                neighbours[node.name].append(other)
    for pair in declared:
        a, b = sorted(pair)
        for x, y in ((a, b), (b, a)):
            if y not in neighbours[x]:
                neighbours[x].append(y)
    return neighbours, {pair: float(np.mean(v)) for pair, v in declared.items()}


def scenario_data(
    nodes: Sequence[EdgeNodeSpec],
    services: Sequence[tuple[str, float]],
    load: Mapping[str, Mapping[str, float]],
    *,
    queue_seconds: float,
    episode_steps: int,
) -> dict[str, Any]:
    """The scenario, as the dict a scenario file would parse to, for ``(name, target ms)``
    services and ``load[service][node]`` requests per second."""
    neighbours, links = _links(nodes)
    peak = max((r for row in load.values() for r in row.values()), default=0.0)
    return {
        "name": "dataplane",
        "description": "a service mesh built from EdgeNode and EdgeService objects",
        "steps": episode_steps,
        "step_seconds": 1,
        "reward": "latency",
        # Never clip a Poisson draw: the mean plus 10 standard deviations plus a margin.
        "max_arrivals": int(peak + 10 * math.sqrt(peak) + 100),
        "nodes": [
            {
                "name": n.name,
                "cpu": n.requests_per_second * REQUEST_WORK["mean"],
                "ram": NODE_RAM,
                "queue_capacity": max(1, math.ceil(queue_seconds * n.requests_per_second)),
                "neighbours": neighbours[n.name],
            }
            for n in nodes
        ],
        "links": [{"between": sorted(pair), "latency_ms": ms} for pair, ms in links.items()],
        "services": [
            {
                "name": name,
                "latency_target_ms": target,
                "request_classes": [
                    {
                        "weight": 1,
                        "cpu": REQUEST_WORK,
                        "ram": {"min": 1, "mean": 1, "max": 1, "std": 0},
                    }
                ],
            }
            for name, target in services
        ],
        "workload": {
            "default": {"kind": "poisson", "rate": 0.0},
            "overrides": [
                {"node": node, "service": svc, "workload": {"kind": "poisson", "rate": float(rps)}}
                for svc, row in load.items()
                for node, rps in row.items()
            ],
        },
    }


def _load_table(
    load: Mapping[str, Any], services: Sequence[str], nodes: Sequence[str]
) -> dict[str, dict[str, float]]:
    """``load`` as service -> node -> requests/s. Plain ``node -> rps`` applies to every
    service; a node left out offers nothing."""
    if all(not isinstance(v, Mapping) for v in load.values()):
        load = {svc: load for svc in services}
    table: dict[str, dict[str, float]] = {}
    for svc, row in load.items():
        if svc not in services:
            raise ValueError(f"load names service {svc!r}; the services are {list(services)}")
        for node, rps in row.items():
            if node not in nodes:
                raise ValueError(f"load names edge node {node!r}; the nodes are {list(nodes)}")
            if isinstance(rps, bool) or not (isinstance(rps, int | float) and rps >= 0):
                raise ValueError(f"load of {svc}/{node} must be a number >= 0, got {rps!r}")
            if not math.isfinite(rps):
                raise ValueError(f"load of {svc}/{node} must be finite, got {rps!r}")
        table[svc] = {node: float(rps) for node, rps in row.items()}
    return table


def parse_load(text: str) -> dict[str, Any]:
    """``--load``: ``edge-0=40,edge-1=40`` (every service) or ``fn/edge-0=40,...``."""
    flat: dict[str, float] = {}
    nested: dict[str, dict[str, float]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        try:
            rps = float(value)
        except ValueError:
            rps = float("nan")
        if not sep or not key or not math.isfinite(rps) or rps < 0:
            raise ValueError(f"--load entry {item!r} is not [SERVICE/]NODE=REQUESTS_PER_SECOND")
        service, slash, node = key.rpartition("/")
        if slash:
            nested.setdefault(service, {})[node] = rps
        else:
            flat[node] = rps
    if flat and nested:
        raise ValueError("--load mixes NODE=RPS and SERVICE/NODE=RPS entries: use one form")
    return nested or flat


def _load_argument(text: str) -> dict[str, Any]:
    try:
        return parse_load(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def pod_name(namespace: str, workload: str) -> str:
    """A stable Deployment-style pod name, ``<workload>-<10 chars>-<5 chars>``."""
    digest = hashlib.sha256(f"{namespace}/{workload}".encode()).digest()
    chars = [_POD_HASH_ALPHABET[b % len(_POD_HASH_ALPHABET)] for b in digest[:15]]
    return f"{workload}-{''.join(chars[:10])}-{''.join(chars[10:])}"


# --------------------------------------------------------------------------------------------
# The data plane


@dataclass
class _Counters:
    """Monotone totals behind the metrics, by (source, destination slot, service, code)."""

    requests: np.ndarray  # (N, K+1, S, 2) int
    buckets: np.ndarray  # (N, K+1, S, 2, len(ISTIO_BUCKETS_MS) + 1) int, not cumulative
    sum_ms: np.ndarray  # (N, K+1, S, 2)
    cpu_seconds: np.ndarray  # (N, S)
    seconds: int = 0

    def copy(self) -> _Counters:
        return _Counters(
            self.requests.copy(),
            self.buckets.copy(),
            self.sum_ms.copy(),
            self.cpu_seconds.copy(),
            self.seconds,
        )


class _Meter:
    """What Istio's sidecars and cAdvisor would have counted, step by step (the
    approximations are the module docstring's). Pairs are (source node, slot): slot 0 is
    the node itself, slot m its m-th neighbour, as in the simulator's action layout."""

    def __init__(self, topo: Topology, rps: np.ndarray, cores: np.ndarray, step_seconds: float):
        n, s, k = topo.num_nodes, topo.num_services, topo.max_degree
        self.dest = np.concatenate([np.arange(n)[:, None], topo.neighbour_safe], axis=1)
        self.valid = np.concatenate([np.ones((n, 1), bool), topo.neighbour_mask], axis=1)
        self.link_ms = topo.link_matrix[np.arange(n)[:, None], self.dest]
        self.cores, self.step_seconds = cores, step_seconds
        # Simulator latency bin (read at its midpoint) plus the link -> Istio bucket, one-hot.
        edges = LATENCY_BINS_MS
        middle = np.concatenate([(edges[:-1] + edges[1:]) / 2, edges[-1:]])
        bucket = np.searchsorted(ISTIO_BUCKETS_MS, middle + self.link_ms[..., None], "left")
        self.bucket_map = np.eye(len(ISTIO_BUCKETS_MS) + 1, dtype=np.int64)[bucket]
        self.refused_bucket = np.searchsorted(ISTIO_BUCKETS_MS, self.link_ms, "left")
        # Each node's latest latency distribution, for a step in which it served nothing:
        # until it serves, one request's service time.
        first = np.clip(np.searchsorted(edges, 1000.0 / rps, "right") - 1, 0, None)
        self.last_hist = np.zeros((n, s, len(edges)))
        self.last_hist[np.arange(n), :, first] = 1.0
        self.last_mean = np.repeat((1000.0 / rps)[:, None], s, axis=1)
        self.counters = _Counters(
            requests=np.zeros((n, k + 1, s, 2), np.int64),
            buckets=np.zeros((n, k + 1, s, 2, len(ISTIO_BUCKETS_MS) + 1), np.int64),
            sum_ms=np.zeros((n, k + 1, s, 2)),
            cpu_seconds=np.zeros((n, s)),
        )

    def record(self, info: Mapping[str, Any], out: StepOutcome, cpu_cap: np.ndarray) -> np.ndarray:
        """Count one step of ``EdgeEnv.step``; returns each node's busy fraction."""
        server = info["server"]
        valid = self.valid[..., None]
        sent = np.concatenate([info["local"][0][:, None], info["forward"][0]], axis=1)
        refused = np.concatenate(
            [(out.local_rejects[0] + info["reject"][0])[:, None], out.forward_rejects[0]], axis=1
        )
        accepted = np.where(valid, sent - refused, 0)  # (N, K+1, S)
        refused = np.where(valid, refused, 0)

        count = server.count[0]  # (N, S) requests served at each node
        seen = count > 0
        self.last_hist[seen] = server.hist[0][seen]
        self.last_mean[seen] = server.sum_ms[0][seen] / count[seen]
        per_bin = largest_remainder(self.last_hist[self.dest], accepted)  # (N, K+1, S, bins)
        c = self.counters
        c.buckets[..., _OK, :] += np.einsum("nmsb,nmbk->nmsk", per_bin, self.bucket_map)
        rows, slots = np.indices(self.refused_bucket.shape)
        np.add.at(
            c.buckets[..., _REFUSED, :], (rows, slots, slice(None), self.refused_bucket), refused
        )
        c.requests[..., _OK] += accepted
        c.requests[..., _REFUSED] += refused
        link = self.link_ms[..., None]
        c.sum_ms[..., _OK] += accepted * (self.last_mean[self.dest] + link)
        c.sum_ms[..., _REFUSED] += refused * link

        busy = np.where(cpu_cap > 0, info["cpu_used"][0] / np.maximum(cpu_cap, 1e-12), 0.0)
        served = count.sum(axis=1, keepdims=True)
        share = np.where(served > 0, count / np.maximum(served, 1), 1.0 / count.shape[1])
        c.cpu_seconds += (busy * self.cores * self.step_seconds)[:, None] * share
        c.seconds += 1
        return busy


@dataclass(frozen=True)
class _Second:
    """One simulated second of ground truth."""

    hist: np.ndarray  # (S, bins) client-perceived latency of served requests
    latency_sum_ms: np.ndarray  # (S,)
    served: np.ndarray  # (S,)
    lost: np.ndarray  # (S,)
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
    ):
        """``edge_nodes`` and ``edge_services`` are the custom resources as dicts; ``load``
        is requests/s as ``node -> rps`` for every service or ``service -> node -> rps``."""
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
        self.load = _load_table(load, self.service_names, self.node_names)
        scenario = parse_scenario(
            scenario_data(
                self.nodes,
                targets,
                self.load,
                queue_seconds=queue_seconds,
                episode_steps=episode_steps,
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
        self._routes: dict[str, dict[str, dict[str, int]]] = {}
        self._origin: dict[str, str] = {}
        self._fractions = np.zeros((topo.num_nodes, topo.num_services, topo.max_degree + 1))
        for svc in self.service_names:
            self._set_equal(svc)
        self._meter = _Meter(
            topo,
            rps=np.array([node.requests_per_second for node in self.nodes]),
            cores=np.array([node.cores for node in self.nodes]),
            step_seconds=scenario.step_seconds,
        )
        self._truth: deque[_Second] = deque(maxlen=truth_seconds)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    # ---------------------------------------------------------------------------------------
    @property
    def seconds(self) -> int:
        """Simulated seconds stepped so far."""
        return self._meter.counters.seconds

    def capacity(self) -> dict[str, float]:
        """Current requests per second of every node (after degradations)."""
        with self._lock:
            return {n.name: n.requests_per_second * self._factor[n.name] for n in self.nodes}

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

    def step(self) -> None:
        """Advance one simulated second with the current routes."""
        with self._lock:
            env = self.env
            if env.t >= env.steps:
                env.continue_episode()
                for node in self.node_names:
                    self._apply_capacity(node)
            t = env.t
            offered = env.arrivals[0, t]  # (N, S)
            counts = self._rng.multinomial(offered, self._fractions)  # (N, S, K+1)
            action = np.zeros((1, *offered.shape, env.action_dim))
            action[0, ..., : counts.shape[-1]] = counts / np.maximum(offered, 1)[..., None]
            _, _, _, info = env.step(action.reshape(1, env.num_agents, -1))
            out = env.last_outcome
            busy = self._meter.record(info, out, env.timeline.cpu[t])
            n, s = offered.shape
            self._truth.append(
                _Second(
                    hist=out.server.service_hist[0].copy(),
                    latency_sum_ms=out.latency_sum_ms[0].reshape(n, s).sum(axis=0),
                    served=out.latency_count[0].reshape(n, s).sum(axis=0),
                    lost=info["lost"][0].sum(axis=0).astype(float),
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
        """Share of ``service``'s offered requests refused (503) over the last seconds."""
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

    def _snapshot(self) -> tuple[_Counters, np.ndarray]:
        """Counters and the destination of every (source, slot), copied under the lock."""
        with self._lock:
            return self._meter.counters.copy(), self._meter.dest


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class _Collector:
    """Turns a :class:`DataPlane`'s counters into metric families at scrape time."""

    PAIR_LABELS = (
        "reporter",
        "source_workload",
        "source_workload_namespace",
        "destination_workload",
        "destination_workload_namespace",
        "destination_service_name",
        "destination_service_namespace",
        "response_code",
        "response_flags",
    )

    def __init__(self, dataplane: DataPlane):
        self.dp = dataplane

    def collect(self) -> Iterator[Metric]:
        dp = self.dp
        c, dest = dp._snapshot()
        labels = [node.label for node in dp.nodes]
        requests = CounterMetricFamily(
            "istio_requests_total",
            "Requests by client and server workload (simulated mesh).",
            labels=self.PAIR_LABELS,
        )
        duration = HistogramMetricFamily(
            "istio_request_duration_milliseconds",
            "Client-perceived request duration (simulated mesh).",
            labels=self.PAIR_LABELS,
        )
        for i, m, s, code in zip(*np.nonzero(c.requests), strict=True):
            svc = dp.service_names[s]
            ns = dp.namespaces[svc]
            values = (
                "source",
                f"loadgen-{labels[i]}",
                ns,
                f"{svc}-{labels[dest[i, m]]}",
                ns,
                svc,
                ns,
                *_CODES[code],
            )
            requests.add_metric(values, float(c.requests[i, m, s, code]))
            cumulative = np.cumsum(c.buckets[i, m, s, code])
            les = [_le(b) for b in ISTIO_BUCKETS_MS] + ["+Inf"]
            duration.add_metric(
                values,
                list(zip(les, cumulative.astype(float), strict=True)),
                float(c.sum_ms[i, m, s, code]),
            )
        cpu = CounterMetricFamily(
            "container_cpu_usage_seconds_total",
            "CPU seconds used by the service containers (simulated cAdvisor).",
            labels=("namespace", "pod", "container"),
        )
        for j, s in np.ndindex(c.cpu_seconds.shape):
            svc = dp.service_names[s]
            ns = dp.namespaces[svc]
            cpu.add_metric(
                (ns, pod_name(ns, f"{svc}-{labels[j]}"), svc), float(c.cpu_seconds[j, s])
            )
        seconds = CounterMetricFamily(
            "marl_dataplane_simulated_seconds_total", "Simulated seconds stepped by the data plane."
        )
        seconds.add_metric((), float(c.seconds))
        yield from (requests, duration, cpu, seconds)


def _le(bound: float) -> str:
    """Bucket bound as Istio writes it (``0.5``, ``1800000``), never in exponent notation."""
    return f"{bound:f}".rstrip("0").rstrip(".")


# --------------------------------------------------------------------------------------------
# Following the operator's routes


def routes_from_virtual_service(
    service: MeshService, nodes: Sequence[MeshNode], obj: Manifest
) -> MeshRoutes:
    """The routes a live VirtualService carries, read the way the operator reads them."""
    return IstioWriter().read(service, nodes, [obj])


class CustomObjects(Protocol):
    """The part of ``kubernetes.client.CustomObjectsApi`` the data plane uses."""

    def get_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str
    ) -> Manifest: ...

    def list_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str
    ) -> Manifest: ...

    def list_cluster_custom_object(self, group: str, version: str, plural: str) -> Manifest: ...


class RouteFollower:
    """Reads each EdgeService's VirtualService and applies its weights to the data plane: a
    missing VirtualService means static equal weights, a malformed one is logged and the
    routes in force stay, as does an API server that cannot be reached."""

    def __init__(self, dataplane: DataPlane, api: CustomObjects):
        self.dp = dataplane
        self.api = api
        self._last: dict[str, Any] = {}

    def poll(self) -> None:
        """One read of every service's VirtualService."""
        for name, service in self.dp.services.items():
            if service.provider != "istio":
                self._once(
                    name,
                    ("provider",),
                    f"{name}: mesh provider {service.provider!r} "
                    "is not followed (only istio); equal weights stay",
                )
                continue
            self._follow(name, service)

    def run(self, stop: threading.Event, poll_seconds: float) -> None:
        """Poll every ``poll_seconds`` of wall time until ``stop`` is set."""
        while not stop.wait(poll_seconds):
            try:
                self.poll()
            except Exception:  # a bug here must not stop the data plane serving
                logger.exception("route poll failed")

    def _follow(self, name: str, service: MeshService) -> None:
        try:
            obj = self.api.get_namespaced_custom_object(
                ISTIO_GROUP,
                ISTIO_VERSION,
                service.namespace,
                VIRTUAL_SERVICES,
                service.virtual_service_name,
            )
        except ApiException as exc:
            if exc.status == 404:
                if self._last.get(name) != ("missing",):
                    self.dp.reset_routes(name)
                    logger.info(
                        "no VirtualService: equal weights", extra={"fields": {"service": name}}
                    )
                    self._last[name] = ("missing",)
                return
            self._once(
                name,
                ("api", exc.status),
                f"{name}: reading the VirtualService failed "
                f"({exc.status} {exc.reason}); routes in force stay",
            )
            return
        except Exception as exc:  # the API server unreachable, a timeout
            self._once(
                name,
                ("api", type(exc).__name__),
                f"{name}: the API server did not answer ({exc}); routes in force stay",
            )
            return
        try:
            routes = routes_from_virtual_service(service, self.dp.mesh_nodes, obj)
            key = ("routes", _frozen(routes.by_source), _frozen(routes.default))
            if self._last.get(name) != key:
                self.dp.set_routes(name, routes.by_source, default=routes.default)
                self._last[name] = key
        except (MeshError, KeyError, TypeError, ValueError, AttributeError) as exc:
            self._once(
                name,
                ("malformed", str(exc)),
                f"{name}: VirtualService ignored ({exc}); routes in force stay",
            )

    def _once(self, name: str, key: tuple, message: str) -> None:
        """Log a problem when it starts, not at every poll."""
        key = ("problem", *key)
        if self._last.get(name) != key:
            logger.warning(message)
            self._last[name] = key


def _frozen(table: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, _frozen(v) if isinstance(v, Mapping) else v) for k, v in table.items()))


# --------------------------------------------------------------------------------------------
# HTTP


def _handler(dp: DataPlane) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "marl-dataplane"

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path == "/metrics":
                self._send(HTTPStatus.OK, dp.metrics_text(), CONTENT_TYPE_LATEST)
            elif path == "/truth":
                try:
                    seconds = int(parse_qs(urlsplit(self.path).query).get("seconds", ["10"])[0])
                    self._json(HTTPStatus.OK, dp.truth(seconds))
                except ValueError as exc:
                    self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            elif path == "/healthz":
                self._send(HTTPStatus.OK, b"ok\n", "text/plain")
            elif path == "/degrade":
                self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use POST"})
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no {path}"})

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            if url.path != "/degrade":
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no POST {url.path}"})
                return
            query = parse_qs(url.query)
            try:
                node = query["node"][0]
                factor = float(query["factor"][0])
                dp.degrade(node, factor)
            except (KeyError, ValueError) as exc:
                message = f"{exc}; use POST /degrade?node=NODE&factor=F with 0 < F <= 100"
                self._json(HTTPStatus.BAD_REQUEST, {"error": message})
                return
            self._json(
                HTTPStatus.OK, {"node": node, "factor": factor, "capacity_rps": dp.capacity()}
            )

        def _json(self, status: HTTPStatus, body: Any) -> None:
            self._send(status, (json.dumps(body) + "\n").encode(), "application/json")

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("http " + format % args)

    return Handler


def start_http_server(dp: DataPlane, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """Serve ``dp`` on a daemon thread; ``port`` 0 picks a free port (``server.server_port``).
    Threads, not asyncio: the stepping loop and the route follower block (numpy, the
    kubernetes client), and a scrape must not wait for either."""
    server = ThreadingHTTPServer((host, port), _handler(dp))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server


# --------------------------------------------------------------------------------------------
# The real-time runner


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _parser() -> argparse.ArgumentParser:
    """Description: the docstring's first paragraph; epilog: its examples and endpoints."""
    head, _, rest = (__doc__ or "").partition("\n\n")
    usage = "Examples:" + rest.partition("Examples:")[2].partition("How the custom")[0]
    parser = argparse.ArgumentParser(
        prog="python -m demo.dataplane",
        description=head,
        epilog=usage.rstrip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kubeconfig", required=True, help="kubeconfig file of the API server")
    parser.add_argument("--namespace", required=True, help="namespace of the EdgeServices")
    parser.add_argument("--port", type=int, default=9464, help="HTTP port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--load",
        required=True,
        type=_load_argument,
        help="offered requests/s: NODE=RPS,... for every service, or SERVICE/NODE=RPS,...",
    )
    parser.add_argument("--speed", type=float, default=1.0, help="simulated seconds per second")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument("--poll-seconds", type=float, default=2.0, help="route poll period")
    parser.add_argument("--queue-seconds", type=float, default=10.0, help="queue, in seconds")
    parser.add_argument(
        "--startup-timeout", type=float, default=60.0, help="wait this long for the resources"
    )
    parser.add_argument(
        "--log-every", type=int, default=10, help="log the truth every N simulated seconds"
    )
    return parser


def read_resources(
    api: CustomObjects, namespace: str, timeout: float, stop: threading.Event
) -> tuple[list[Manifest], list[Manifest]]:
    """EdgeNodes and the namespace's EdgeServices, waiting until both exist."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            nodes = api.list_cluster_custom_object(MARL_GROUP, MARL_VERSION, "edgenodes")["items"]
            services = api.list_namespaced_custom_object(
                MARL_GROUP, MARL_VERSION, namespace, "edgeservices"
            )["items"]
            if nodes and services:
                return nodes, services
            problem = (
                f"found {len(nodes)} EdgeNodes and {len(services)} EdgeServices in {namespace}"
            )
        except Exception as exc:  # not reachable yet, CRDs not installed yet
            problem = f"reading the resources failed: {exc}"
        if time.monotonic() > deadline or stop.is_set():
            raise RuntimeError(f"{problem} (waited {timeout:g} s)")
        logger.info("waiting for resources", extra={"fields": {"problem": problem}})
        stop.wait(1.0)


def run(args: argparse.Namespace, api: CustomObjects, stop: threading.Event) -> int:
    """Build the data plane from the API server's resources, serve it and step it in real
    time until ``stop`` is set."""
    if not (math.isfinite(args.speed) and args.speed > 0):
        raise ValueError(f"--speed must be > 0, got {args.speed}")
    nodes, services = read_resources(api, args.namespace, args.startup_timeout, stop)
    dp = DataPlane(nodes, services, args.load, seed=args.seed, queue_seconds=args.queue_seconds)
    follower = RouteFollower(dp, api)
    follower.poll()
    server = start_http_server(dp, args.host, args.port)
    poller = threading.Thread(
        target=follower.run, args=(stop, args.poll_seconds), name="routes", daemon=True
    )
    poller.start()
    logger.info(
        "serving",
        extra={
            "fields": {
                "port": server.server_port,
                "nodes": dp.node_names,
                "services": dp.service_names,
            }
        },
    )
    print(f"ready port={server.server_port}", flush=True)
    try:
        _step_in_real_time(dp, stop, 1.0 / args.speed, args.log_every)
    finally:
        server.shutdown()
        server.server_close()
        poller.join(timeout=5)
        logger.info("stopped", extra={"fields": {"seconds": dp.seconds}})
    return 0


def _step_in_real_time(dp: DataPlane, stop: threading.Event, period: float, log_every: int) -> None:
    """One step per ``period`` wall seconds. Falling behind by more than a few periods
    (a paused process) skips ahead rather than replaying the missed seconds in a burst."""
    deadline = time.monotonic()
    while not stop.is_set():
        dp.step()
        if log_every > 0 and dp.seconds % log_every == 0:
            truth = dp.truth(min(log_every, 600))
            fields = {k: truth[k] for k in ("seconds", "services", "degraded")}
            logger.info("truth", extra={"fields": fields})
        deadline += period
        delay = deadline - time.monotonic()
        if delay < -max(1.0, 5 * period):
            logger.warning(
                "behind real time; skipping ahead", extra={"fields": {"behind_s": -delay}}
            )
            deadline = time.monotonic()
        stop.wait(max(delay, 0.0))


def main(
    argv: Sequence[str] | None = None, api_factory: Callable[[str], CustomObjects] | None = None
) -> int:
    """``python -m demo.dataplane``; ``api_factory`` (kubeconfig path -> client) lets a test
    stand in for the API server. SIGTERM and SIGINT stop it; their handlers are restored."""
    args = _parser().parse_args(argv)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in STOP_SIGNALS}
    try:
        with _json_logging():
            try:
                api = (api_factory or _custom_objects_api)(args.kubeconfig)
                return run(args, api, stop)
            except (RuntimeError, ValueError, OSError, config.ConfigException) as exc:
                logger.error(str(exc))
                return 1
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _json_logging() -> Iterator[None]:
    """This module's records as JSON lines on stderr, for as long as ``main`` runs (the
    root logger is left alone, so an embedding process keeps its own logging)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _custom_objects_api(kubeconfig: str) -> CustomObjects:
    """A client configured from this kubeconfig file only, never from $KUBECONFIG."""
    return client.CustomObjectsApi(config.new_client_from_config(config_file=kubeconfig))


if __name__ == "__main__":
    sys.exit(main())
