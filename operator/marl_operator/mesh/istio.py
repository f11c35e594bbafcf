"""Istio: a VirtualService with one rule per source edge node, and a DestinationRule with one
subset per edge node.

Rules are evaluated in order and the first match wins, so the per-source rules come first,
each matching the client pod's node label with ``sourceLabels``, and the catch-all comes last.
Weights are integers summing to 100 per rule (Istio's webhook refuses a total of 0); zero
routes are left out.

A VirtualService or DestinationRule taken over from its owner keeps what the operator does not
route: the hosts it had, its own rules (those ahead of its catch-all stay ahead of the
operator's rules, those behind it stay behind), the options of its catch-all rule (retries,
timeout, headers...: :data:`ROUTE_OPTIONS`) on every rule the operator writes, and its
subsets. Its catch-all is the first rule that every request of the mesh passes (no match,
or one on the whole path, the ``mesh`` gateway or the service's port), and is replaced;
the rules matching only the node label are the operator's, and so are the subsets
``node-<name>`` that select only by it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from marl_operator.mesh import naming
from marl_operator.mesh.model import Manifest, MeshError, MeshNode, MeshRoutes, MeshService
from marl_operator.mesh.ownership import (
    created_by_operator,
    is_managed,
    managed_metadata,
    owners_spec,
    written_source_key,
)
from marl_operator.mesh.patching import apply_merge_patch

API_VERSION = "networking.istio.io/v1"


def _metadata(service: MeshService, name: str, source_key: str | None = None) -> dict[str, Any]:
    return {"name": name, "namespace": service.namespace, **managed_metadata(service, source_key)}


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
        "metadata": _metadata(service, service.virtual_service_name, service.node_label),
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


ROUTE_OPTIONS = (
    "corsPolicy",
    "fault",
    "headers",
    "mirror",
    "mirrorPercent",
    "mirrorPercentage",
    "mirrors",
    "retries",
    "rewrite",
    "timeout",
)
"""The fields of a taken-over catch-all rule that apply to every rule the operator writes; a
redirect, direct response or delegation cannot stand beside a route, and is not copied."""


def _is_source_rule(service: MeshService, rule: Mapping[str, Any]) -> bool:
    """Whether ``rule`` matches the client's node label and nothing else (a source node's)."""
    match = rule.get("match") or []
    if len(match) != 1 or set(match[0]) != {"sourceLabels"}:
        return False
    return set(match[0]["sourceLabels"] or {}) == {service.node_label}


WHOLE_PATH = ({"prefix": "/"}, {"prefix": ""}, {"regex": ".*"}, {"regex": "/.*"})
"""URI matches every path passes."""


def _matches_everything(service: MeshService, rule: Mapping[str, Any]) -> bool:
    """Whether every request of the mesh's clients passes ``rule``: no match, or one whose
    every condition they all meet (the whole path, the ``mesh`` gateway, the service's
    port). The first such rule is the catch-all, and rules after it are never reached: left
    ahead of the operator's, one matching on ``gateways: [mesh]`` hid them all while their
    weights read back as applied."""
    matches = rule.get("match")
    if not matches:
        return True
    passed = {
        "name": lambda _: True,
        "ignoreUriCase": lambda _: True,
        "uri": lambda uri: uri in WHOLE_PATH,
        "gateways": lambda gateways: "mesh" in (gateways or []),
        "port": lambda port: port == service.port,
    }
    return any(
        all(key in passed and passed[key](value) for key, value in match.items())
        for match in matches
    )


def _was_ours(
    service: MeshService,
    rule: Mapping[str, Any],
    saved: Sequence[Mapping],
    written_on: str | None,
) -> bool:
    """Whether a live rule of a taken-over VirtualService is one the operator wrote: a
    source node's (:func:`_is_source_rule`), or one of that shape on the pod label the
    object says its rules were last written on (``written_on``, before a change of
    ``nodeLabel``). Where that is not recorded, any single pod label will do for a rule not
    among the owner's saved at takeover, as long as it routes to node subsets only."""
    if _is_source_rule(service, rule):
        return True
    if written_on is not None:
        return written_on != service.node_label and _source_rule_shape(rule, written_on)
    return rule not in saved and _source_rule_shape(rule, None)


def _source_rule_shape(rule: Mapping[str, Any], label: str | None) -> bool:
    """A match on one pod label (``label``, or any) and routes to node subsets only."""
    match, routes = rule.get("match") or [], rule.get("route") or []
    if len(match) != 1 or set(match[0]) != {"sourceLabels"}:
        return False
    labels = set(match[0]["sourceLabels"] or {})
    return (
        (labels == {label} if label is not None else len(labels) == 1)
        and bool(routes)
        and all(
            str((r.get("destination") or {}).get("subset", "")).startswith(naming.SUBSET_PREFIX)
            for r in routes
        )
    )


def _keep_rules(
    service: MeshService,
    ours: list[dict],
    live: Sequence[Mapping],
    saved: Sequence[Mapping],
    written_on: str | None,
) -> list[dict]:
    """``ours`` among the live rules the operator does not own, as :mod:`this module
    <marl_operator.mesh.istio>` says (``saved``: the owner's, as taken over; ``written_on``:
    the pod label the live rules were last written on, if recorded)."""
    cut = next((i for i, rule in enumerate(live) if _matches_everything(service, rule)), len(live))
    catch_all = live[cut] if cut < len(live) else {}
    options = {k: copy.deepcopy(v) for k, v in catch_all.items() if k in ROUTE_OPTIONS}
    theirs = [
        [copy.deepcopy(r) for r in part if not _was_ours(service, r, saved, written_on)]
        for part in (live[:cut], live[cut + 1 :])
    ]
    behind = [r for r in theirs[1] if not _matches_everything(service, r)]
    return theirs[0] + [{**rule, **copy.deepcopy(options)} for rule in ours] + behind


def keep_virtual_service(
    service: MeshService, desired: Manifest, live: Mapping[str, Any] | None
) -> Manifest:
    """``desired`` with what a live VirtualService carries besides the operator's routes."""
    if live is None or created_by_operator(live):
        return desired  # nothing in it is an owner's: every rule is written as desired
    owners = owners_spec(live)
    hosts = list(owners.get("hosts") or [])
    if owners and not hosts:
        raise MeshError(
            f"VirtualService {service.namespace}/{desired['metadata']['name']} has no hosts: "
            "it is a delegate, whose rules apply only through the root VirtualService that "
            "delegates to it, and given a host it would be one no more (the root's delegated "
            "route would lose its rules): name a VirtualService with hosts, or a new one, in "
            "the EdgeService's spec.mesh.virtualService"
        )
    gateways = owners.get("gateways")
    if gateways and "mesh" not in gateways:
        raise MeshError(
            f"VirtualService {service.namespace}/{desired['metadata']['name']} applies to "
            f"gateways {', '.join(gateways)} only (spec.gateways lacks 'mesh'): the sidecars "
            "of the edge nodes' clients would never use its routes; add 'mesh' to its "
            "spec.gateways, or name another VirtualService in the EdgeService's "
            "spec.mesh.virtualService"
        )
    out = copy.deepcopy(desired)
    out["spec"]["hosts"] = hosts if service.host in hosts else [*hosts, service.host]
    rules = (live.get("spec") or {}).get("http") or []
    saved = owners.get("http") or []
    out["spec"]["http"] = _keep_rules(
        service, out["spec"]["http"], rules, saved, written_source_key(live)
    )
    return out


def _is_node_subset(service: MeshService, subset: Mapping[str, Any]) -> bool:
    """Whether ``subset`` is one the operator writes: ``node-<name>``, selecting by the node
    label alone."""
    name, labels = str(subset.get("name", "")), subset.get("labels") or {}
    return name.startswith(naming.SUBSET_PREFIX) and set(labels) == {service.node_label}


def _was_node_subset(
    service: MeshService, subset: Mapping[str, Any], saved: Sequence[Mapping]
) -> bool:
    """Whether a live subset of a taken-over DestinationRule is one the operator wrote:
    :func:`_is_node_subset`, or, not among the owner's saved at takeover, ``node-<name>``
    on another single label (written under an earlier ``nodeLabel``)."""
    if _is_node_subset(service, subset):
        return True
    name, labels = str(subset.get("name", "")), subset.get("labels") or {}
    return subset not in saved and name.startswith(naming.SUBSET_PREFIX) and len(labels) == 1


def keep_destination_rule(
    service: MeshService, desired: Manifest, live: Mapping[str, Any] | None
) -> Manifest:
    """``desired`` with a live DestinationRule's subsets that are not the operator's, first."""
    if live is None or created_by_operator(live):
        return desired
    saved = owners_spec(live).get("subsets") or []
    theirs = [
        copy.deepcopy(subset)
        for subset in (live.get("spec") or {}).get("subsets") or []
        if not _was_node_subset(service, subset, saved)
    ]
    out = copy.deepcopy(desired)
    theirs = [t for t in theirs if t not in out["spec"]["subsets"]]  # kept already
    clash = sorted({t["name"] for t in theirs} & {o["name"] for o in out["spec"]["subsets"]})
    if clash:  # Istio refuses two subsets of one name, and every write with them
        raise MeshError(
            f"DestinationRule {service.namespace}/{desired['metadata']['name']} has subsets "
            f"of its own named {', '.join(clash)}, as the operator names an edge node's "
            f"subset ({naming.SUBSET_PREFIX}<edge node>, selecting by {service.node_label} "
            "alone): rename them, or name another DestinationRule in the EdgeService's "
            "spec.mesh.destinationRule"
        )
    out["spec"]["subsets"] = theirs + out["spec"]["subsets"]
    return out


def routed_subsets(virtual_service: Mapping[str, Any] | None) -> set[str]:
    """The subsets some rule of ``virtual_service`` sends traffic to, the owner's included."""
    rules = ((virtual_service or {}).get("spec") or {}).get("http") or []
    return {
        route.get("destination", {}).get("subset")
        for rule in rules
        for route in rule.get("route") or []
    } - {None}


def make_before_break(
    service: MeshService, desired: Sequence[Manifest], lives: Sequence[Manifest | None]
) -> list[Manifest]:
    """``desired`` whose DestinationRule keeps each of the operator's live subsets that the
    live VirtualService still routes to. Removing a subset in the write that moves the routes
    off it leaves sidecars a moment with routes to a subset that is gone (503 NR, whichever
    object lands first); kept, it goes with the first write after the routes left it."""
    live = {obj["kind"]: obj for obj in lives if obj is not None}
    routed = routed_subsets(live.get("VirtualService"))
    out = []
    for manifest in desired:
        if manifest["kind"] == "VirtualService":
            manifest = _exported_as_subsets(manifest, live)
        if manifest["kind"] == "DestinationRule" and "DestinationRule" in live:
            wanted = {subset["name"] for subset in manifest["spec"]["subsets"]}
            leaving = [
                copy.deepcopy(subset)
                for subset in (live["DestinationRule"].get("spec") or {}).get("subsets") or []
                if _is_node_subset(service, subset)
                and subset["name"] in routed
                and subset["name"] not in wanted
            ]
            if leaving:
                manifest = copy.deepcopy(manifest)
                manifest["spec"]["subsets"] += leaving
        out.append(manifest)
    return out


def subsets_given_up(live: Mapping[str, Any], patch: Mapping[str, Any] | None) -> set[str]:
    """The subsets of the DestinationRule ``live`` that giving it back removes: ``patch``
    (see :func:`~marl_operator.mesh.patching.restore_patch`), or deleting it for None. A
    host given back to another one takes every subset away from this one."""
    spec = live.get("spec") or {}
    before = {subset.get("name") for subset in spec.get("subsets") or []} - {None}
    if patch is None:
        return before
    after = apply_merge_patch(spec, patch.get("spec") or {})
    if after.get("host") != spec.get("host"):
        return before
    return before - {subset.get("name") for subset in after.get("subsets") or []}


def _exported_as_subsets(manifest: Manifest, live: Mapping[str, Manifest]) -> Manifest:
    """The VirtualService ``manifest``, when the operator creates it, exported where the
    live DestinationRule is: a client seeing routes to subsets it cannot see fails every
    request (503 NC). A taken-over VirtualService keeps its owner's ``exportTo``."""
    routes = live.get("VirtualService")
    if routes is not None and not created_by_operator(routes):
        return manifest
    export = ((live.get("DestinationRule") or {}).get("spec") or {}).get("exportTo")
    manifest = copy.deepcopy(manifest)
    if export:
        manifest["spec"]["exportTo"] = list(export)
    elif "exportTo" in ((routes or {}).get("spec") or {}):
        manifest["spec"]["exportTo"] = None  # seen everywhere again: the merge patch drops it
    return manifest


def _rule_weights(
    rule: Mapping[str, Any], nodes: Sequence[str], where: str, managed: bool
) -> dict[str, int]:
    """The weights of one rule's routes; in an object the operator manages, a route to the
    subset of an edge node the policy no longer governs is left out (what it carried leaves
    it, as from a node that is down)."""
    routes = rule.get("route") or []
    weights: dict[str, int] = {}
    for route in routes:
        subset = route.get("destination", {}).get("subset")
        if subset is None:
            raise MeshError(f"{where} routes to the whole service, not to a node subset")
        # An omitted weight on a rule's only route means all of its traffic.
        default = 100 if len(routes) == 1 else 0
        if managed and naming.is_former_node_subset(subset, nodes):
            continue
        node = naming.node_of_subset(subset, nodes)
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
    managed = is_managed(obj)
    for i, rule in enumerate(obj.get("spec", {}).get("http") or []):
        where = f"VirtualService {obj['metadata']['name']!r} http[{i}]"
        if _matches_everything(service, rule):
            default = _rule_weights(rule, names, where, managed)
            break  # first match wins: later rules are unreachable
        if not _is_source_rule(service, rule):
            continue  # the owner's own rule, kept as it is
        value = rule["match"][0]["sourceLabels"][service.node_label]
        if value not in by_label:
            continue  # an edge node the policy no longer governs: its clients are not ours
        row = _rule_weights(rule, names, where, managed)
        if row:  # else every route went to former nodes: no weight to step from
            by_source.setdefault(by_label[value], row)
    if default is None:
        raise MeshError(f"VirtualService {obj['metadata']['name']!r} has no catch-all rule")
    return MeshRoutes(nodes=tuple(nodes), by_source=by_source, default=default)


class IstioWriter:
    """:class:`~marl_operator.mesh.writer.MeshWriter` for Istio."""

    provider = "istio"
    owned: ClassVar = {"DestinationRule": ("host", "subsets"), "VirtualService": ("hosts", "http")}

    def desired(self, service: MeshService, routes: MeshRoutes) -> list[Manifest]:
        # The subsets must exist before a route names them.
        return [destination_rule(service, routes.nodes), virtual_service(service, routes)]

    def make_before_break(
        self, service: MeshService, desired: Sequence[Manifest], lives: Sequence[Manifest | None]
    ) -> list[Manifest]:
        return make_before_break(service, desired, lives)

    def keep(self, service: MeshService, desired: Manifest, live: Manifest | None) -> Manifest:
        if desired["kind"] == "VirtualService":
            return keep_virtual_service(service, desired, live)
        return keep_destination_rule(service, desired, live)

    def read(
        self, service: MeshService, nodes: Sequence[MeshNode], objects: Sequence[Manifest]
    ) -> MeshRoutes:
        for obj in objects:
            if obj.get("kind") == "VirtualService":
                return read_virtual_service(service, nodes, obj)
        raise MeshError(f"no VirtualService among the objects of {service.ref}")

    def routed_targets(self, live: Manifest) -> set[str]:
        return routed_subsets(live) if live.get("kind") == "VirtualService" else set()

    def targets_given_up(self, live: Manifest, patch: Mapping[str, Any] | None) -> set[str]:
        return subsets_given_up(live, patch) if live.get("kind") == "DestinationRule" else set()
