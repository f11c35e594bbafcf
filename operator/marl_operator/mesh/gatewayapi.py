"""Gateway API: one HTTPRoute with one rule per source edge node and a catch-all.

The Gateway API cannot match a request by the client's pod, so a rule per source node matches
a header naming the source node (``x-marl-source-node`` by default), which something on each
node must set. Among matching rules the one with more header matches wins, so the header-less
catch-all only serves requests without the header. Each rule sends traffic to one Service per
edge node (``<prefix>-<node>``). The API allows at most 16 rules per route and 16 backendRefs
per rule; routes beyond that raise :class:`RouteLimitError` instead of being cut short.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from marl_operator.mesh import naming
from marl_operator.mesh.model import (
    Manifest,
    MeshError,
    MeshNode,
    MeshRoutes,
    MeshService,
    RouteLimitError,
)
from marl_operator.mesh.ownership import managed_metadata

API_VERSION = "gateway.networking.k8s.io/v1"
MAX_RULES = 16
MAX_BACKEND_REFS = 16
WEIGHT_DEFAULT = 1
"""What the API server fills in for a backendRef without a weight."""


def _match_all() -> dict[str, Any]:
    """The path match the API server fills in; written out so that a live copy compares equal."""
    return {"path": {"type": "PathPrefix", "value": "/"}}


def parent_refs(service: MeshService) -> list[dict[str, Any]]:
    """The route's parents: the EdgeService's, or the Service named by the host's first label
    on the service port (GAMMA: the route applies to mesh traffic sent to that Service)."""
    if service.parent_refs:
        return [{"group": "", "kind": "Service", **ref} for ref in service.parent_refs]
    name = service.host.split(".", 1)[0]
    return [{"group": "", "kind": "Service", "name": name, "port": service.port}]


def _backend_refs(service: MeshService, weights: Mapping[str, int], where: str) -> list[dict]:
    refs = [
        {
            "group": "",
            "kind": "Service",
            "name": naming.node_service_name(service.service_prefix, node),
            "port": service.port,
            "weight": weight,
        }
        for node, weight in weights.items()
        if weight > 0
    ]
    if not refs:
        raise MeshError(f"{where} has no positive weight: its traffic would get no backend")
    if len(refs) > MAX_BACKEND_REFS:
        raise RouteLimitError(
            f"{where} sends traffic to {len(refs)} edge nodes, but an HTTPRoute rule allows at "
            f"most {MAX_BACKEND_REFS} backendRefs: use provider istio or fewer neighbours"
        )
    return refs


def http_route(service: MeshService, routes: MeshRoutes) -> Manifest:
    """The HTTPRoute carrying every source node's weights for ``service``."""
    needed = len(routes.by_source) + 1
    if needed > MAX_RULES:
        raise RouteLimitError(
            f"{len(routes.by_source)} source edge nodes need {needed} HTTPRoute rules (one per "
            f"source node plus the catch-all), but an HTTPRoute allows at most {MAX_RULES} "
            f"rules: use provider istio, or at most {MAX_RULES - 1} nodes per policy"
        )
    header = service.source_header
    rules = [
        {
            "name": naming.source_rule_name(source),
            "matches": [
                {
                    **_match_all(),
                    "headers": [
                        {"type": "Exact", "name": header, "value": routes.node(source).label}
                    ],
                }
            ],
            "backendRefs": _backend_refs(service, row, f"source node {source!r}"),
        }
        for source, row in routes.by_source.items()
    ]
    rules.append(
        {
            "name": naming.CATCH_ALL_RULE,
            "matches": [_match_all()],
            "backendRefs": _backend_refs(service, routes.default, "the catch-all rule"),
        }
    )
    return {
        "apiVersion": API_VERSION,
        "kind": "HTTPRoute",
        "metadata": {
            "name": service.http_route_name,
            "namespace": service.namespace,
            **managed_metadata(service),
        },
        "spec": {"parentRefs": parent_refs(service), "rules": rules},
    }


def _source_of(
    rule: Mapping[str, Any], header: str, by_label: Mapping[str, str], where: str
) -> str | None:
    """The source node a rule matches, or None for a catch-all (no header match)."""
    matches = rule.get("matches") or [_match_all()]
    headers = [h for m in matches for h in m.get("headers") or []]
    if not headers:
        return None
    ours = [h for h in headers if h.get("name", "").lower() == header.lower()]
    if len(matches) != 1 or len(headers) != 1 or len(ours) != 1:
        raise MeshError(f"{where} does not match exactly one {header} header")
    if ours[0].get("type", "Exact") != "Exact" or ours[0].get("value") not in by_label:
        raise MeshError(f"{where} matches {ours[0].get('value')!r}, no known edge node's label")
    return by_label[ours[0]["value"]]


def read_http_route(service: MeshService, nodes: Sequence[MeshNode], obj: Manifest) -> MeshRoutes:
    """The weights an HTTPRoute carries (see :meth:`MeshWriter.read`)."""
    by_label = {node.label: node.name for node in nodes}
    names = [node.name for node in nodes]
    by_source: dict[str, dict[str, int]] = {}
    default: dict[str, int] | None = None
    for i, rule in enumerate(obj.get("spec", {}).get("rules") or []):
        where = f"HTTPRoute {obj['metadata']['name']!r} rules[{i}]"
        weights: dict[str, int] = {}
        for ref in rule.get("backendRefs") or []:
            if ref.get("kind", "Service") != "Service" or ref.get("group", "") != "":
                raise MeshError(f"{where} sends traffic to a {ref.get('kind')}, not a Service")
            node = naming.node_of_service(service.service_prefix, ref["name"], names)
            weights[node] = weights.get(node, 0) + int(ref.get("weight", WEIGHT_DEFAULT))
        source = _source_of(rule, service.source_header, by_label, where)
        if source is None:
            default = weights if default is None else default
        else:
            by_source.setdefault(source, weights)
    if default is None:
        raise MeshError(f"HTTPRoute {obj['metadata']['name']!r} has no catch-all rule")
    return MeshRoutes(nodes=tuple(nodes), by_source=by_source, default=default)


class GatewayAPIWriter:
    """:class:`~marl_operator.mesh.writer.MeshWriter` for the Gateway API."""

    provider = "gateway-api"

    def desired(self, service: MeshService, routes: MeshRoutes) -> list[Manifest]:
        return [http_route(service, routes)]

    def read(
        self, service: MeshService, nodes: Sequence[MeshNode], objects: Sequence[Manifest]
    ) -> MeshRoutes:
        for obj in objects:
            if obj.get("kind") == "HTTPRoute":
                return read_http_route(service, nodes, obj)
        raise MeshError(f"no HTTPRoute among the objects of {service.ref}")
