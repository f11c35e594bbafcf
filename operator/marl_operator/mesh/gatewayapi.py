"""Gateway API: one HTTPRoute with one rule per source edge node and a catch-all.

The Gateway API cannot match a request by the client's pod, so a rule per source node matches
a header naming the source node (``x-marl-source-node`` by default), which something on each
node must set. Among matching rules the one with more header matches wins, so the header-less
catch-all only serves requests without the header. Each rule sends traffic to one Service per
edge node (``<prefix>-<node>``). The API allows at most 16 rules per route and 16 backendRefs
per rule; routes beyond that raise :class:`RouteLimitError` instead of being cut short.

The rules carry no ``name``: the field is young (Gateway API releases before it prune it, and
a route that never reads back as written would be rewritten every interval), and the operator's
rules are told by their matches. An HTTPRoute taken over from its owner keeps the parents it
had, its own rules (any match other than the source header on ``/``, such as another path) and
the options of its catch-all rule (:data:`ROUTE_OPTIONS`) on every rule the operator writes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from marl_operator.mesh import naming
from marl_operator.mesh.model import (
    Manifest,
    MeshError,
    MeshNode,
    MeshRoutes,
    MeshService,
    RouteLimitError,
)
from marl_operator.mesh.ownership import (
    created_by_operator,
    is_managed,
    managed_metadata,
    owners_spec,
    written_source_key,
)

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
            **managed_metadata(service, service.source_header),
        },
        "spec": {"parentRefs": parent_refs(service), "rules": rules},
    }


ROUTE_OPTIONS = ("filters", "retry", "sessionPersistence", "timeouts")
"""The fields of a taken-over catch-all rule that apply to every rule the operator writes
(its filters but a RequestRedirect, which the API refuses beside backendRefs)."""


def _operator_match(service: MeshService, rule: Mapping[str, Any]) -> dict[str, Any] | None:
    """The source-header match of one of the operator's rules (``{}`` for its catch-all), or
    None for a rule of the owner's (another path, method, query or header)."""
    matches = rule.get("matches") or [_match_all()]
    if len(matches) != 1 or set(matches[0]) - {"path", "headers"}:
        return None
    if matches[0].get("path", _match_all()["path"]) != _match_all()["path"]:
        return None
    headers = matches[0].get("headers") or []
    if not headers:
        return {}
    if len(headers) != 1 or headers[0].get("name", "").lower() != service.source_header.lower():
        return None
    return dict(headers[0])


def _was_ours(
    service: MeshService,
    rule: Mapping[str, Any],
    saved: Sequence[Mapping],
    written_on: str | None,
) -> bool:
    """Whether a live rule of a taken-over HTTPRoute is one the operator wrote: on its
    source header or its catch-all (:func:`_operator_match`), or one of that shape on the
    header the object says its rules were last written on (``written_on``, before a change
    of ``sourceHeader``). Where that is not recorded, any single Exact header will do for a
    rule not among the owner's saved at takeover, as long as every backend is a per-node
    Service."""
    if _operator_match(service, rule) is not None:
        return True
    if written_on is not None:
        changed = written_on.lower() != service.source_header.lower()
        return changed and _source_rule_shape(service, rule, written_on)
    return rule not in saved and _source_rule_shape(service, rule, None)


def _source_rule_shape(service: MeshService, rule: Mapping[str, Any], header: str | None) -> bool:
    """A match on the whole path and one Exact header (``header``, or any), and per-node
    Services as backends only."""
    matches, refs = rule.get("matches") or [], rule.get("backendRefs") or []
    if len(matches) != 1 or set(matches[0]) != {"path", "headers"}:
        return False
    headers = matches[0]["headers"] or []
    return (
        matches[0]["path"] == _match_all()["path"]
        and len(headers) == 1
        and headers[0].get("type", "Exact") == "Exact"
        and (header is None or headers[0].get("name", "").lower() == header.lower())
        and bool(refs)
        and all(str(r.get("name", "")).startswith(f"{service.service_prefix}-") for r in refs)
    )


def _keep_rules(
    service: MeshService,
    ours: list[dict],
    live: Sequence[Mapping],
    saved: Sequence[Mapping],
    written_on: str | None,
) -> list[dict]:
    theirs = [copy.deepcopy(r) for r in live if not _was_ours(service, r, saved, written_on)]
    catch_all = next((r for r in live if _operator_match(service, r) == {}), {})
    options = {k: copy.deepcopy(v) for k, v in catch_all.items() if k in ROUTE_OPTIONS}
    filters = [f for f in options.pop("filters", []) if f.get("type") != "RequestRedirect"]
    if filters:
        options["filters"] = filters
    rules = theirs + [{**rule, **copy.deepcopy(options)} for rule in ours]
    if len(rules) > MAX_RULES:
        raise RouteLimitError(
            f"the HTTPRoute's own {len(theirs)} rules and the operator's {len(ours)} make "
            f"{len(rules)}, but an HTTPRoute allows at most {MAX_RULES} rules: move them to "
            "another HTTPRoute, or name another object in the EdgeService's spec.mesh"
        )
    return rules


def keep_http_route(
    service: MeshService, desired: Manifest, live: Mapping[str, Any] | None
) -> Manifest:
    """``desired`` with what a live HTTPRoute carries besides the operator's routes."""
    if live is None or created_by_operator(live):
        return desired  # nothing in it is an owner's: every rule is written as desired
    out = copy.deepcopy(desired)
    owners = owners_spec(live)
    parents = [copy.deepcopy(ref) for ref in owners.get("parentRefs") or []]
    named = {_parent(ref, service.namespace) for ref in parents}
    out["spec"]["parentRefs"] = parents + [
        ref for ref in out["spec"]["parentRefs"] if _parent(ref, service.namespace) not in named
    ]
    rules = (live.get("spec") or {}).get("rules") or []
    saved = owners.get("rules") or []
    out["spec"]["rules"] = _keep_rules(
        service, out["spec"]["rules"], rules, saved, written_source_key(live)
    )
    return out


def _parent(ref: Mapping[str, Any], namespace: str) -> tuple[str, str, str, str]:
    """The object a parentRef names, whatever port or section: the API refuses two refs to
    one parent that do not tell their sections apart."""
    return (
        ref.get("group", "gateway.networking.k8s.io"),
        ref.get("kind", "Gateway"),
        ref.get("namespace", namespace),
        ref.get("name", ""),
    )


def read_http_route(service: MeshService, nodes: Sequence[MeshNode], obj: Manifest) -> MeshRoutes:
    """The weights an HTTPRoute carries (see :meth:`MeshWriter.read`)."""
    by_label = {node.label: node.name for node in nodes}
    names = [node.name for node in nodes]
    by_source: dict[str, dict[str, int]] = {}
    default: dict[str, int] | None = None
    managed = is_managed(obj)  # only its routes to former nodes are known to be the operator's
    for i, rule in enumerate(obj.get("spec", {}).get("rules") or []):
        where = f"HTTPRoute {obj['metadata']['name']!r} rules[{i}]"
        header = _operator_match(service, rule)
        if header is None:
            continue  # the owner's own rule, kept as it is
        weights: dict[str, int] = {}
        for ref in rule.get("backendRefs") or []:
            if ref.get("kind", "Service") != "Service" or ref.get("group", "") != "":
                raise MeshError(f"{where} sends traffic to a {ref.get('kind')}, not a Service")
            former = naming.is_former_node_service(service.service_prefix, ref["name"], names)
            if managed and former:
                continue  # an edge node the policy no longer governs
            node = naming.node_of_service(service.service_prefix, ref["name"], names)
            weights[node] = weights.get(node, 0) + int(ref.get("weight", WEIGHT_DEFAULT))
        if not header:
            default = weights if default is None else default
            continue
        if header.get("type", "Exact") != "Exact":
            raise MeshError(
                f"{where} matches the {service.source_header} header by type "
                f"{header['type']}, not Exact"
            )
        source = by_label.get(header.get("value"))
        if source is not None and weights:  # else an edge node the policy no longer governs
            by_source.setdefault(source, weights)
    if default is None:
        raise MeshError(f"HTTPRoute {obj['metadata']['name']!r} has no catch-all rule")
    return MeshRoutes(nodes=tuple(nodes), by_source=by_source, default=default)


class GatewayAPIWriter:
    """:class:`~marl_operator.mesh.writer.MeshWriter` for the Gateway API."""

    provider = "gateway-api"
    owned: ClassVar = {"HTTPRoute": ("parentRefs", "rules")}

    def desired(self, service: MeshService, routes: MeshRoutes) -> list[Manifest]:
        return [http_route(service, routes)]

    def keep(self, service: MeshService, desired: Manifest, live: Manifest | None) -> Manifest:
        return keep_http_route(service, desired, live)

    def make_before_break(
        self, service: MeshService, desired: Sequence[Manifest], lives: Sequence[Manifest | None]
    ) -> list[Manifest]:
        # The backends are the user's per-node Services: no write removes one.
        return list(desired)

    def read(
        self, service: MeshService, nodes: Sequence[MeshNode], objects: Sequence[Manifest]
    ) -> MeshRoutes:
        for obj in objects:
            if obj.get("kind") == "HTTPRoute":
                return read_http_route(service, nodes, obj)
        raise MeshError(f"no HTTPRoute among the objects of {service.ref}")

    def routed_targets(self, live: Manifest) -> set[str]:
        return set()  # the backends are the user's per-node Services, never given back

    def targets_given_up(self, live: Manifest, patch: Mapping[str, Any] | None) -> set[str]:
        return set()
