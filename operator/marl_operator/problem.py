"""The routing problem a RoutingPolicy governs, read from EdgeNode and EdgeService objects.

The simulator builds a :class:`policies.topology.Topology` from a scenario file; here the same
value comes from the cluster's custom resources, so the trained policy sees the same layout:
nodes in a stable (sorted) order, each node's neighbours in the order its EdgeNode lists them
(that order decides which output of the policy means which neighbour), padded to the
checkpoint's maximum degree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from marl_operator.mesh.factory import managed_objects
from marl_operator.mesh.model import MeshError, MeshNode, MeshService, node_from_edge_node
from marl_operator.spec import PolicySpec, SpecError
from policies.topology import Topology


@dataclass(frozen=True, eq=False)
class MeshProblem:
    """Everything about the mesh a decision needs that does not change every interval."""

    topology: Topology
    nodes: tuple[MeshNode, ...]
    services: tuple[MeshService, ...]
    capacity_rps: np.ndarray  # (N,) the EdgeNodes' capacity hints, requests per second
    cpu_cores: np.ndarray  # (N,) CPU the services may use on each node, NaN if not given
    target_ms: np.ndarray  # (S,) latency targets
    # What each service's routes live in, by service name: (kind, name) of every object its
    # writer manages (what a cycle reads and writes, and the policy's deletion gives back).
    mesh_objects: Mapping[str, tuple[tuple[str, str], ...]]
    missing: tuple[str, ...] = ()
    """Nodes ``spec.nodes.names`` lists without an EdgeNode: governed by no one, reported as
    down (routes to them read as gone, so their share leaves at once)."""

    def neighbours_of(self, node: str) -> tuple[str, ...]:
        return self.topology.neighbours[self.topology.nodes.index(node)]


_WORKLOAD_SUFFIX = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
"""What can end a Deployment's name (a DNS subdomain's characters), where the metrics name a
node's workload ``<service>-<pod label value>``."""

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(m?)$")


def cpu_quantity(value: Any, where: str) -> float:
    """Cores from a Kubernetes CPU quantity (``4``, ``2.5``, ``3500m``); the operator and
    the demo data plane read EdgeNodes through this one parser, so they agree on every node."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        cores = float(value)
    else:
        match = _QUANTITY.match(str(value).strip())
        if not match:
            raise SpecError(where, f"is not a CPU quantity such as 4 or 3500m: {value!r}")
        cores = float(match.group(1)) / (1000.0 if match.group(2) else 1.0)
    if not cores > 0 or not np.isfinite(cores):  # CPU use is divided by it
        raise SpecError(where, f"must be a positive number of cores, got {value!r}")
    return cores


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or ():
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        present = key in labels
        if (
            (op == "In" and labels.get(key) not in values)
            or (op == "NotIn" and present and labels[key] in values)
            or (op == "Exists" and not present)
            or (op == "DoesNotExist" and present)
        ):
            return False
    return True


def select_nodes(spec: PolicySpec, edge_nodes: Sequence[Mapping[str, Any]]) -> list[Mapping]:
    """The EdgeNodes the policy governs, sorted by name: of those ``spec.nodes.names`` lists,
    the ones that exist (:func:`missing_nodes` names the others). Deleting one EdgeNode
    must not stop a policy from routing between the rest, nor away from the deleted one."""
    by_name = {obj["metadata"]["name"]: obj for obj in edge_nodes}
    if spec.node_names is not None:
        chosen = [by_name[n] for n in spec.node_names if n in by_name]
        if not chosen:
            raise SpecError(
                "spec.nodes.names",
                f"no EdgeNode named {', '.join(spec.node_names)}; create them or name others",
            )
    elif spec.node_selector is not None:
        chosen = [
            obj
            for obj in edge_nodes
            if selector_matches(spec.node_selector, obj["metadata"].get("labels") or {})
        ]
    else:
        chosen = list(edge_nodes)
    if not chosen:
        raise SpecError("spec.nodes", "selects no EdgeNode; create EdgeNodes or widen the selector")
    return sorted(chosen, key=lambda obj: obj["metadata"]["name"])


def missing_nodes(spec: PolicySpec, edge_nodes: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """The names ``spec.nodes.names`` lists that no EdgeNode has."""
    names = {obj["metadata"]["name"] for obj in edge_nodes}
    return tuple(n for n in spec.node_names or () if n not in names)


def mesh_objects(
    services: Sequence[MeshService], nodes: Sequence[MeshNode]
) -> dict[str, tuple[tuple[str, str], ...]]:
    """Each service's mesh objects, or SpecError for routes no cycle could ever write: two
    nodes the mesh cannot tell apart, objects the provider refuses, or two services whose
    routes would overwrite each other in one object."""
    by_label: dict[str, str] = {}
    for node in nodes:
        if not _WORKLOAD_SUFFIX.match(node.label):
            raise SpecError(
                f"EdgeNode {node.name} spec.podLabelValue",
                f"{node.label!r} cannot end a workload's name (lowercase letters, digits, "
                "'-' and '.'), and the node's metrics are found by that ending: the node "
                "would read as idle however busy; use such a value",
            )
        if (first := by_label.setdefault(node.label, node.name)) != node.name:
            raise SpecError(
                f"EdgeNode {node.name} spec.podLabelValue",
                f"{node.label!r} is EdgeNode {first}'s pod label value too: the mesh tells "
                "nodes apart by it, so give each node its own",
            )
    by_host: dict[str, str] = {}
    for service in services:
        if (first := by_host.setdefault(service.host, service.name)) != service.name:
            raise SpecError(
                "spec.services",
                f"EdgeServices {first!r} and {service.name!r} both route host "
                f"{service.host!r}: the mesh applies one set of routes to a host, so one "
                "service's weights would do nothing, and both read its requests; keep one",
            )
    objects: dict[str, tuple[tuple[str, str], ...]] = {}
    owner: dict[tuple[str, str], str] = {}
    for service in services:
        try:
            objects[service.name] = tuple(managed_objects(service, tuple(nodes)))
        except MeshError as error:
            raise SpecError(
                "spec.services", f"EdgeService {service.name!r} cannot be routed: {error}"
            ) from None
        for kind, name in objects[service.name]:
            if (first := owner.setdefault((kind, name), service.name)) != service.name:
                raise SpecError(
                    "spec.services",
                    f"EdgeServices {first!r} and {service.name!r} both route through "
                    f"{kind}/{name}: each would overwrite the other's routes; give each "
                    "EdgeService its own spec.mesh object names",
                )
    return objects


def _hints_in_one_unit(
    names: Sequence[str], capacity: list[float], cores: list[float], in_rps: list[bool]
) -> list[float]:
    """The capacity hints in one unit. A node that gives only ``capacity.cpu`` beside nodes
    that give requests per second is given the requests per second per core of those that
    give both: taken as its cores alone (0.2 for 200m), it read as a node of almost no
    capacity, which the static fallback and the policy sent nothing."""
    if all(in_rps) or not any(in_rps):
        return capacity
    both = [i for i, given in enumerate(in_rps) if given and np.isfinite(cores[i])]
    if not both:
        name = names[in_rps.index(False)]
        raise SpecError(
            f"EdgeNode {name} spec.capacity.requestsPerSecond",
            "is needed: other EdgeNodes give their capacity in requests per second, and none "
            "gives its cpu as well, so this node's cpu alone cannot be compared with them",
        )
    per_core = sum(capacity[i] for i in both) / sum(cores[i] for i in both)
    return [
        c if given else cores[i] * per_core
        for i, (c, given) in enumerate(zip(capacity, in_rps, strict=True))
    ]


def build_problem(
    spec: PolicySpec,
    edge_nodes: Sequence[Mapping[str, Any]],
    edge_services: Mapping[str, Mapping[str, Any]],
    max_degree: int,
) -> MeshProblem:
    """The problem of ``spec`` over the given objects; ``max_degree`` is the checkpoint's.

    Neighbours outside the governed set are left out (traffic is only routed between the
    policy's nodes). A node with more neighbours than the checkpoint has slots is an error:
    cutting links silently would route differently from what the user declared.
    """
    chosen = select_nodes(spec, edge_nodes)
    names = [obj["metadata"]["name"] for obj in chosen]
    governed = set(names)
    neighbours: dict[str, list[str]] = {}
    links: dict[frozenset[str], float] = {}
    capacity, cores, in_rps, undeclared = [], [], [], []
    for obj in chosen:
        name = obj["metadata"]["name"]
        body = obj.get("spec") or {}
        listed = [nb for nb in body.get("neighbours") or () if nb.get("name") in governed]
        listed = [nb for nb in listed if nb["name"] != name]
        if len(listed) > max_degree:
            raise SpecError(
                "spec.checkpoint",
                f"EdgeNode {name} has {len(listed)} neighbours but the checkpoint handles at "
                f"most {max_degree}: use a checkpoint trained with a larger maximum degree",
            )
        neighbours[name] = [nb["name"] for nb in listed]
        for nb in listed:
            latency = float(nb.get("latencyMs", 0.0))
            declared = links.setdefault(frozenset((name, nb["name"])), latency)
            if declared != latency:  # the first node by name won, silently
                raise SpecError(
                    f"EdgeNode {name} spec.neighbours",
                    f"gives the link to {nb['name']} latencyMs {latency:g}, and "
                    f"{nb['name']} gives it {declared:g}: a link has one latency both ways "
                    "here; declare the same on both nodes",
                )
        cap = body.get("capacity") or {}
        if not cap:
            undeclared.append(name)
        cpu = cap.get("cpu")  # 0 is given, and refused: not absent
        given = cpu is not None
        cores.append(cpu_quantity(cpu, f"EdgeNode {name} spec.capacity.cpu") if given else np.nan)
        rps = cap.get("requestsPerSecond")
        # Without a request rate, cores give the relative capacity until measurements take
        # over (converted below where other nodes give requests per second).
        capacity.append(float(rps) if rps else (cores[-1] if given else 1.0))
        in_rps.append(bool(rps))

    if undeclared and len(undeclared) < len(names):
        # Nodes that all leave it out are taken as equal; one beside nodes that give it was
        # NaN in the hints (every cycle failed) or a whole core among millicores.
        raise SpecError(
            f"EdgeNode {undeclared[0]} spec.capacity",
            "is needed: other EdgeNodes of this policy give their capacity, and this node's "
            "cannot be compared with them; give requestsPerSecond, cpu or both",
        )
    capacity = _hints_in_one_unit(names, capacity, cores, in_rps)

    for name, listed in neighbours.items():
        for other in listed:
            if name not in neighbours[other]:
                raise SpecError(
                    f"EdgeNode {other} spec.neighbours",
                    f"EdgeNode {name} lists {other} as a neighbour but {other} does not list "
                    f"{name}: links carry traffic both ways, so list each on both nodes",
                )

    most_routes = max((1 + len(listed) for listed in neighbours.values()), default=1)
    if spec.safety.min_weight * most_routes > 100:
        busiest = max(neighbours, key=lambda name: len(neighbours[name]))
        raise SpecError(
            "spec.safety.minWeight",
            f"{spec.safety.min_weight} points on each of EdgeNode {busiest}'s {most_routes} "
            f"routes (itself and its neighbours) add up to more than 100; use at most "
            f"{100 // most_routes}",
        )

    services = []
    for name in spec.services:
        obj = edge_services.get(name)
        if obj is None:
            raise SpecError(
                "spec.services", f"no EdgeService {name!r} in this namespace; create it first"
            )
        try:
            services.append(MeshService.from_edge_service(obj))
        except (KeyError, TypeError, ValueError, MeshError) as error:
            raise SpecError("spec.services", f"EdgeService {name!r} is unusable: {error}") from None
    targets = [
        float(edge_services[s].get("spec", {}).get("latencyTargetMs", 0.0)) for s in spec.services
    ]
    if not all(t > 0 for t in targets):
        raise SpecError("spec.services", "every EdgeService needs spec.latencyTargetMs > 0")

    nodes = tuple(node_from_edge_node(obj) for obj in chosen)
    topology = Topology.build(names, spec.services, neighbours, links, max_degree=max_degree)
    return MeshProblem(
        topology=topology,
        nodes=nodes,
        services=tuple(services),
        mesh_objects=mesh_objects(services, nodes),
        capacity_rps=np.array(capacity, dtype=float),
        cpu_cores=np.array(cores, dtype=float),
        target_ms=np.array(targets, dtype=float),
        missing=missing_nodes(spec, edge_nodes),
    )
