"""Istio: a VirtualService with one rule per source edge node, and a DestinationRule with one
subset per edge node.

Rules are evaluated in order and the first match wins, so the per-source rules come first,
each matching the client pod's node label with ``sourceLabels``, and the catch-all comes last.
Weights are integers summing to 100 per rule (Istio's webhook refuses a total of 0); zero
routes are left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from marl_operator.mesh import naming
from marl_operator.mesh.model import Manifest, MeshError, MeshNode, MeshRoutes, MeshService
from marl_operator.mesh.ownership import managed_metadata

API_VERSION = "networking.istio.io/v1"


def _metadata(service: MeshService, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": service.namespace, **managed_metadata(service)}


def _route(service: MeshService, weights: Mapping[str, int], where: str) -> list[dict[str, Any]]:
    if not any(w > 0 for w in weights.values()):
        raise MeshError(f"{where} has no positive weight: Istio refuses a total weight of 0")
    return [
        {
            "destination": {
                "host": service.host,
                "subset": naming.subset_name(node),
                "port": {"number": service.port},
            },
            "weight": weight,
        }
        for node, weight in weights.items()
        if weight > 0
    ]


def virtual_service(service: MeshService, routes: MeshRoutes) -> Manifest:
    """The VirtualService carrying every source node's weights for ``service``."""
    http = [
        {
            "name": naming.source_rule_name(source),
            "match": [{"sourceLabels": {service.node_label: routes.node(source).label}}],
            "route": _route(service, row, f"source node {source!r}"),
        }
        for source, row in routes.by_source.items()
    ]
    default = _route(service, routes.default, "the catch-all rule")
    http.append({"name": naming.CATCH_ALL_RULE, "route": default})
    return {
        "apiVersion": API_VERSION,
        "kind": "VirtualService",
        "metadata": _metadata(service, service.virtual_service_name),
        "spec": {"hosts": [service.host], "http": http},
    }


def destination_rule(service: MeshService, nodes: Sequence[MeshNode]) -> Manifest:
    """The DestinationRule with subset ``node-<name>`` selecting each edge node's pods."""
    subsets = [
        {"name": naming.subset_name(node.name), "labels": {service.node_label: node.label}}
        for node in nodes
    ]
    return {
        "apiVersion": API_VERSION,
        "kind": "DestinationRule",
        "metadata": _metadata(service, service.destination_rule_name),
        "spec": {"host": service.host, "subsets": subsets},
    }


def _rule_weights(rule: Mapping[str, Any], nodes: Sequence[str], where: str) -> dict[str, int]:
    routes = rule.get("route") or []
    weights: dict[str, int] = {}
    for route in routes:
        subset = route.get("destination", {}).get("subset")
        if subset is None:
            raise MeshError(f"{where} routes to the whole service, not to a node subset")
        node = naming.node_of_subset(subset, nodes)
        # An omitted weight on a rule's only route means all of its traffic.
        default = 100 if len(routes) == 1 else 0
        weights[node] = weights.get(node, 0) + int(route.get("weight", default))
    return weights


def read_virtual_service(
    service: MeshService, nodes: Sequence[MeshNode], obj: Manifest
) -> MeshRoutes:
    """The weights a VirtualService carries (see :meth:`MeshWriter.read`)."""
    by_label = {node.label: node.name for node in nodes}
    names = [node.name for node in nodes]
    by_source: dict[str, dict[str, int]] = {}
    default: dict[str, int] | None = None
    for i, rule in enumerate(obj.get("spec", {}).get("http") or []):
        where = f"VirtualService {obj['metadata']['name']!r} http[{i}]"
        match = rule.get("match")
        if not match:
            default = _rule_weights(rule, names, where)
            break  # first match wins: later rules are unreachable
        labels = match[0].get("sourceLabels") or {}
        value = labels.get(service.node_label)
        if len(match) != 1 or set(match[0]) != {"sourceLabels"} or len(labels) != 1:
            raise MeshError(f"{where} matches more than the source node label {service.node_label}")
        if value not in by_label:
            raise MeshError(f"{where} matches {value!r}, the label of no known edge node")
        source = by_label[value]
        by_source.setdefault(source, _rule_weights(rule, names, where))
    if default is None:
        raise MeshError(f"VirtualService {obj['metadata']['name']!r} has no catch-all rule")
    return MeshRoutes(nodes=tuple(nodes), by_source=by_source, default=default)


class IstioWriter:
    """:class:`~marl_operator.mesh.writer.MeshWriter` for Istio."""

    provider = "istio"

    def desired(self, service: MeshService, routes: MeshRoutes) -> list[Manifest]:
        # The subsets must exist before a route names them.
        return [destination_rule(service, routes.nodes), virtual_service(service, routes)]

    def read(
        self, service: MeshService, nodes: Sequence[MeshNode], objects: Sequence[Manifest]
    ) -> MeshRoutes:
        for obj in objects:
            if obj.get("kind") == "VirtualService":
                return read_virtual_service(service, nodes, obj)
        raise MeshError(f"no VirtualService among the objects of {service.ref}")
