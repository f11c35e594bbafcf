"""What a mesh writer is given and gives back, independent of the mesh provider.

The writers speak in edge-node names (EdgeNode objects) and integer weights; these small frozen
values carry them, read from the EdgeService and EdgeNode custom resources by the two
constructors at the bottom so that the operator and the tests build them the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Manifest = dict[str, Any]
"""A Kubernetes object as plain JSON-compatible dicts and lists."""

NODE_LABEL = "marl.dev/node"
"""Default pod label whose value names the edge node a pod runs on."""

SOURCE_HEADER = "x-marl-source-node"
"""Default request header naming the source edge node (Gateway API has no source match)."""


class MeshError(ValueError):
    """Routes or a mesh object the writers cannot represent or interpret. Permanent: retrying
    with the same input fails the same way, so the message says what to change."""


class RestoreIncomplete(MeshError):
    """Some mesh objects could not be given back (the spec saved before the takeover is
    unreadable): ``done`` lists what was given back or deleted, ``failed`` what was not and
    why. Retrying cannot help, and a deletion must not hang on it."""

    def __init__(self, done: list[str], failed: list[str]):
        super().__init__("; ".join(failed))
        self.done, self.failed = done, failed


class RouteLimitError(MeshError):
    """The routes exceed a hard limit of the provider's API (e.g. 16 rules per HTTPRoute)."""


@dataclass(frozen=True)
class MeshNode:
    """An edge node as the mesh sees it: its EdgeNode name (which names subsets and per-node
    Services) and the value of its pod label (which identifies its pods at runtime)."""

    name: str
    label_value: str = ""

    @property
    def label(self) -> str:
        """The pod label value; the EdgeNode's name unless it sets ``podLabelValue``."""
        return self.label_value or self.name


@dataclass(frozen=True, kw_only=True)
class MeshService:
    """One EdgeService: the host and port the routes address and where the routes live.

    Empty names default to the EdgeService's name, as the CRD documents.
    """

    name: str
    namespace: str
    host: str
    port: int
    node_label: str = NODE_LABEL
    provider: str = "istio"
    virtual_service: str = ""
    destination_rule: str = ""
    http_route: str = ""
    parent_refs: tuple[Mapping[str, Any], ...] = ()
    node_service_prefix: str = ""
    source_header: str = SOURCE_HEADER

    @property
    def virtual_service_name(self) -> str:
        return self.virtual_service or self.name

    @property
    def destination_rule_name(self) -> str:
        return self.destination_rule or self.name

    @property
    def http_route_name(self) -> str:
        return self.http_route or self.name

    @property
    def service_prefix(self) -> str:
        return self.node_service_prefix or self.name

    @property
    def ref(self) -> str:
        """``namespace/name``, the value of the annotation that ties mesh objects to it."""
        return f"{self.namespace}/{self.name}"

    @property
    def kubernetes_service(self) -> tuple[str, str] | None:
        """``(namespace, name)`` of the Kubernetes Service ``host`` names, as the mesh reads
        it: a short name is in the EdgeService's namespace, ``name.namespace.svc...`` in the
        one it names; None for a host that names no Service (an external one)."""
        parts = self.host.split(".")
        if len(parts) == 1:
            return self.namespace, parts[0]
        if len(parts) >= 3 and parts[2] == "svc":
            return parts[1], parts[0]
        return None

    @classmethod
    def from_edge_service(cls, obj: Mapping[str, Any]) -> MeshService:
        """Read an EdgeService custom resource (defaults as the CRD declares them); a host
        naming a Service of another namespace is refused (:meth:`check_namespace`)."""
        spec = obj["spec"]
        mesh = spec.get("mesh", {})
        service = cls(
            name=obj["metadata"]["name"],
            namespace=obj["metadata"]["namespace"],
            host=spec["host"],
            port=int(spec["port"]),
            node_label=spec.get("nodeLabel", NODE_LABEL),
            provider=mesh.get("provider", "istio"),
            virtual_service=mesh.get("virtualService", ""),
            destination_rule=mesh.get("destinationRule", ""),
            http_route=mesh.get("httpRoute", ""),
            parent_refs=tuple(dict(p) for p in mesh.get("parentRefs", ())),
            node_service_prefix=mesh.get("nodeServicePrefix", ""),
            source_header=mesh.get("sourceHeader", SOURCE_HEADER),
        )
        service.check_namespace()
        return service

    def check_namespace(self) -> None:
        """MeshError if ``host`` names a Service of another namespace. The routes are written
        in the EdgeService's namespace and Istio applies them to every client of the host:
        whoever may create EdgeServices in one namespace would otherwise steer, through the
        operator's rights, the traffic of another namespace's Service."""
        where = self.kubernetes_service
        if where is not None and where[0] != self.namespace:
            raise MeshError(
                f"spec.host {self.host!r} names a Service of namespace {where[0]!r}: an "
                f"EdgeService routes only Services of its own namespace ({self.namespace!r}); "
                f"create the EdgeService and its RoutingPolicy in {where[0]!r}"
            )


def node_from_edge_node(obj: Mapping[str, Any]) -> MeshNode:
    """Read an EdgeNode custom resource."""
    return MeshNode(obj["metadata"]["name"], obj.get("spec", {}).get("podLabelValue", ""))


@dataclass(frozen=True)
class MeshRoutes:
    """Integer weights for one service: ``by_source[i][j]`` is the weight of traffic from
    edge node ``i`` to edge node ``j``; ``default`` is the catch-all for clients that are on
    no edge node (e.g. an ingress gateway). Only positive weights are kept: a mesh object
    cannot tell a zero route from an absent one, so neither does this value.

    Build it with :func:`marl_operator.mesh.routing.build_routes`, which checks the weights;
    writers' ``read`` returns whatever a live object holds, checked or not.
    """

    nodes: tuple[MeshNode, ...]
    by_source: Mapping[str, Mapping[str, int]]
    default: Mapping[str, int] = field(default_factory=dict)

    def node(self, name: str) -> MeshNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise MeshError(f"{name!r} is not one of the edge nodes {[n.name for n in self.nodes]}")
