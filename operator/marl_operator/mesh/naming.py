"""The names generated mesh objects and the cluster must agree on.

A DestinationRule subset per edge node, a Service per edge node for the Gateway API, the route
names: each is derived here, checked against the rule the receiving API enforces (Istio's
webhook wants subset names that are DNS labels; Service names are DNS-1035 labels), and parsed
back when reading a live object.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from marl_operator.mesh.model import MeshError, MeshNode, MeshService

SUBSET_PREFIX = "node-"
"""DestinationRule subset of edge node N: ``node-N``."""

SOURCE_RULE_PREFIX = "from-"
"""Route rule for clients on edge node N: ``from-N``."""

CATCH_ALL_RULE = "default"
"""Name of the last rule, for clients on no edge node."""

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def subset_name(node: str) -> str:
    """The DestinationRule subset that selects edge node ``node``'s pods."""
    name = SUBSET_PREFIX + node
    if len(name) > 63 or not _DNS1123_LABEL.match(name):
        raise MeshError(
            f"subset {name!r} for edge node {node!r} is not a DNS label of at most 63 "
            "characters (Istio refuses it): use EdgeNode names of at most 58 lowercase "
            "letters, digits and '-'"
        )
    return name


def node_of_subset(subset: str, nodes: Iterable[str]) -> str:
    """The edge node a subset name stands for."""
    node = subset.removeprefix(SUBSET_PREFIX)
    if subset.startswith(SUBSET_PREFIX) and node in set(nodes):
        return node
    raise MeshError(f"subset {subset!r} is not node-<edge node> for a known edge node")


def is_former_node_subset(subset: str, nodes: Iterable[str]) -> bool:
    """Whether ``subset`` is ``node-<name>`` for an edge node not among ``nodes``: one the
    policy governed when the route was written (since deleted, or no longer selected)."""
    return subset.startswith(SUBSET_PREFIX) and subset.removeprefix(SUBSET_PREFIX) not in set(nodes)


def node_service_name(prefix: str, node: str) -> str:
    """The Service that selects the service's pods on edge node ``node`` (Gateway API)."""
    name = f"{prefix}-{node}"
    if len(name) > 63 or not _DNS1035_LABEL.match(name):
        raise MeshError(
            f"Service name {name!r} for edge node {node!r} is not a DNS-1035 label of at most "
            "63 characters: shorten nodeServicePrefix or the EdgeNode name"
        )
    return name


def node_of_service(prefix: str, service: str, nodes: Iterable[str]) -> str:
    """The edge node a per-node Service name stands for."""
    node = service.removeprefix(f"{prefix}-")
    if service.startswith(f"{prefix}-") and node in set(nodes):
        return node
    raise MeshError(f"Service {service!r} is not {prefix}-<edge node> for a known edge node")


def is_former_node_service(prefix: str, service: str, nodes: Iterable[str]) -> bool:
    """:func:`is_former_node_subset` for the Gateway API's per-node Services."""
    return service.startswith(f"{prefix}-") and service.removeprefix(f"{prefix}-") not in set(nodes)


def source_rule_name(node: str) -> str:
    return SOURCE_RULE_PREFIX + node


def destination_names(service: MeshService, nodes: Sequence[MeshNode]) -> tuple[str, ...]:
    """The Service names Istio's metrics give ``service``'s requests
    (``destination_service_name``: the Service of the cluster a request was sent to). A
    VirtualService routes to subsets of the host's Service; an HTTPRoute to one Service per
    edge node, so the EdgeService's own name is in neither."""
    if service.provider == "gateway-api":
        return tuple(node_service_name(service.service_prefix, node.name) for node in nodes)
    where = service.kubernetes_service
    return (where[1] if where is not None else service.host.split(".", 1)[0],)


def destination_namespace(service: MeshService) -> str:
    """The namespace of :func:`destination_names` (and of their pods): the one the host
    names, the EdgeService's for a short host and for the HTTPRoute's per-node Services."""
    where = service.kubernetes_service
    if service.provider == "gateway-api" or where is None:
        return service.namespace
    return where[0]
