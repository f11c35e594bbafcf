"""Custom resources -> the simulator's scenario: what the data plane needs of each EdgeNode,
the scenario a mesh of them makes, and the offered load (``--load``).

How the custom resources become a simulator scenario
    One request is one unit of work, unless ``--work`` makes a service's requests costlier
    or cheaper, and a node's ``spec.capacity.requestsPerSecond`` is its work per second, so
    a node serves that many requests of one unit per second; steps are one second;
    arrivals are Poisson at the offered load; links carry the neighbours' ``latencyMs`` (a
    link one side declares is used both ways); every node queues ``queue_seconds`` of its
    nominal capacity before it answers 503, so queues, not drops, show an overload first.
    ``spec.capacity.cpu`` (cores, default 1) only scales the CPU metric.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from marl_operator.mesh.model import node_from_edge_node
from marl_operator.problem import cpu_quantity

logger = logging.getLogger("demo.dataplane")

REQUEST_WORK = {"min": 0.4, "mean": 1.0, "max": 1.6, "std": 0.2}
"""Work of one request in units of one request's mean work (a clipped normal, mean exactly 1)."""

NODE_RAM = 1.0e9
"""RAM of every node: far more than any queue needs, so only CPU (requests/s) ever binds."""

DEFAULT_CORES = 1.0
"""Cores of an EdgeNode without ``spec.capacity.cpu`` (only the CPU metric uses them)."""


def cpu_cores(quantity: str | int | float) -> float:
    """Cores of a Kubernetes CPU quantity, read exactly as the operator reads it."""
    return cpu_quantity(quantity, "spec.capacity.cpu")


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
    work: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The scenario, as the dict a scenario file would parse to, for ``(name, target ms)``
    services, ``load[service][node]`` requests per second and ``work[service]`` units of
    work per request (1 for a service left out)."""
    work = work or {}
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
                        "cpu": {k: v * work.get(name, 1.0) for k, v in REQUEST_WORK.items()},
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


def load_table(
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


def _assignments(text: str, flag: str, form: str, positive: bool = False):
    """``(key, number)`` of each ``KEY=NUMBER`` entry of a comma-separated flag value; a
    ValueError quoting the entry and ``form`` for anything else (a number below zero, or at
    zero when ``positive``)."""
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        too_small = number <= 0 if positive else number < 0
        if not sep or not key or not math.isfinite(number) or too_small:
            raise ValueError(f"{flag} entry {item!r} is not {form}")
        yield key, number


def parse_work(text: str) -> dict[str, float]:
    """``--work``: ``fn=1,heavy=5``, the work of one request of each service named, in units
    of one request of a node's ``requestsPerSecond``."""
    return dict(_assignments(text, "--work", "SERVICE=UNITS with UNITS > 0", positive=True))


def parse_load(text: str) -> dict[str, Any]:
    """``--load``: ``edge-0=40,edge-1=40`` (every service) or ``fn/edge-0=40,...``."""
    flat: dict[str, float] = {}
    nested: dict[str, dict[str, float]] = {}
    for key, rps in _assignments(text, "--load", "[SERVICE/]NODE=REQUESTS_PER_SECOND"):
        service, slash, node = key.rpartition("/")
        if slash:
            nested.setdefault(service, {})[node] = rps
        else:
            flat[node] = rps
    if flat and nested:
        raise ValueError("--load mixes NODE=RPS and SERVICE/NODE=RPS entries: use one form")
    return nested or flat
