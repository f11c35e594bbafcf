"""Which edge nodes can serve: the readiness of the Kubernetes nodes that make them up, and of
each service's pods on them.

Prometheus cannot tell an edge node that is gone from one whose clients went quiet: the series
of a node that left the cluster just stop. Requests routed to it meanwhile fail, or wait for
its pods to be scheduled elsewhere. The API server knows: an edge node is up while at least
one of its Kubernetes nodes (``spec.nodeNames`` and those ``spec.nodeSelector`` matches)
exists and reports the condition Ready. A node that is down is treated as the simulator
treats a failed one (``simulator.env``): no capacity, no clients, no route to it.

A node that is up can still fail one service: its pods of that service crash, are evicted or
were never scheduled there. What the mesh routes to for the node then has no endpoint, and
every request routed to it is answered 503 at once: with Istio, the node's subset (the pods
of the host's Service with the EdgeService's ``nodeLabel`` set to the node's label value);
with the Gateway API, the node's own Service. So for each service those pods are read as
well, and a node without a ready one gets no route *for that service*; its other services
keep theirs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from marl_operator.mesh.model import MeshNode
from marl_operator.problem import selector_matches


@dataclass(frozen=True)
class Liveness:
    """The edge nodes of a policy that cannot serve now, and why."""

    down: Mapping[str, str] = field(default_factory=dict)  # edge node -> why it is down
    unknown: str | None = None  # why readiness could not be read (every node counted up)
    # service -> edge node that is up but has no ready pod of it -> why
    unserved: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # service -> why its pods could not be read (every node that is up counted serving it)
    pods_unknown: Mapping[str, str] = field(default_factory=dict)

    def cannot_serve(self, service: str) -> frozenset[str]:
        """The edge nodes no route of ``service`` may go to: those down, and those without a
        ready pod of it."""
        return frozenset(self.down) | frozenset(self.unserved.get(service, ()))


def ready(node: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether a Kubernetes Node (as the API returns it) is Ready, and if not, what its Ready
    condition says (a node without one has not reported since it registered)."""
    for condition in (node.get("status") or {}).get("conditions") or ():
        if condition.get("type") == "Ready":
            if condition.get("status") == "True":
                return True, ""
            why = condition.get("reason") or condition.get("message") or "no reason given"
            return False, f"Ready is {condition.get('status', 'Unknown')} ({why})"
    return False, "it reports no Ready condition"


def members(edge_node: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]]) -> list[Mapping]:
    """The Kubernetes nodes that make up ``edge_node``: those it names and those its selector
    matches."""
    spec = edge_node.get("spec") or {}
    named = set(spec.get("nodeNames") or ())
    selector = spec.get("nodeSelector")

    def selected(node: Mapping[str, Any]) -> bool:
        labels = node["metadata"].get("labels") or {}
        return selector is not None and selector_matches(selector, labels)

    return [node for node in nodes if node["metadata"]["name"] in named or selected(node)]


def why_down(edge_node: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]]) -> str | None:
    """None when ``edge_node`` is up, else why it is down, naming its Kubernetes nodes."""
    found = members(edge_node, nodes)
    if any(ready(node)[0] for node in found):
        return None
    if not found:
        spec = edge_node.get("spec") or {}
        wanted = [f"named {', '.join(spec['nodeNames'])}"] if spec.get("nodeNames") else []
        if spec.get("nodeSelector") is not None:
            wanted.append("matching its spec.nodeSelector")
        return f"no Kubernetes node {' or '.join(wanted)} exists"
    states = "; ".join(f"{node['metadata']['name']}: {ready(node)[1]}" for node in found)
    return f"none of its Kubernetes nodes is Ready ({states})"


def liveness(
    edge_nodes: Sequence[Mapping[str, Any]], nodes: Sequence[Mapping[str, Any]]
) -> Liveness:
    """Which of ``edge_nodes`` are down, given every Kubernetes node of the cluster."""
    down = {}
    for edge_node in edge_nodes:
        why = why_down(edge_node, nodes)
        if why is not None:
            down[edge_node["metadata"]["name"]] = why
    return Liveness(down)


def edge_node_status(edge_node: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]]) -> dict:
    """What an EdgeNode's status says: its Kubernetes nodes, and the condition Ready (without
    its transition time, which :func:`marl_operator.status.merge_conditions` keeps)."""
    why = why_down(edge_node, nodes)
    found = sorted(node["metadata"]["name"] for node in members(edge_node, nodes))
    if why is None:
        ready = ("True", "KubernetesNodeReady", f"Ready Kubernetes node among {', '.join(found)}")
    else:
        reason = "KubernetesNodesNotReady" if found else "KubernetesNodesNotFound"
        ready = ("False", reason, f"{why}: no route goes to this edge node")
    status, reason, message = ready
    condition = {"type": "Ready", "status": status, "reason": reason, "message": message[:1024]}
    return {
        "observedGeneration": int(edge_node["metadata"].get("generation", 0)),
        "kubernetesNodes": found,
        "conditions": [condition],
    }


def pod_ready(pod: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether a Pod is a ready endpoint of its Service (Ready, and not being deleted: a
    terminating pod leaves the endpoints at once), and if not, why."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp"):
        return False, "terminating"
    for condition in status.get("conditions") or ():
        if condition.get("type") == "Ready":
            if condition.get("status") == "True":
                return True, ""
            why = condition.get("reason") or condition.get("message") or "no reason given"
            return False, f"Ready is {condition.get('status', 'Unknown')} ({why})"
    return False, f"{status.get('phase') or 'Pending'}, not Ready yet"


def unserved(
    nodes: Sequence[MeshNode], node_label: str, pods: Sequence[Mapping[str, Any]]
) -> dict[str, str]:
    """The edge nodes among ``nodes`` without a ready pod among ``pods`` (a service's pods),
    a pod being on the node whose label value its ``node_label`` carries, as the mesh's
    subsets select them; each with why, naming a few of its pods."""
    by_value: dict[str, list[Mapping[str, Any]]] = {}
    for pod in pods:
        value = ((pod.get("metadata") or {}).get("labels") or {}).get(node_label)
        if value is not None:
            by_value.setdefault(value, []).append(pod)
    out = {}
    for node in nodes:
        found = by_value.get(node.label, [])
        why = why_unready(found) if found else f"no pod labelled {node_label}={node.label}"
        if why is not None:
            out[node.name] = why
    return out


def why_unready(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """None when one of ``pods`` is ready, else why none is, naming a few."""
    if any(pod_ready(pod)[0] for pod in pods):
        return None
    if not pods:
        return "no pod"
    shown = sorted(pods, key=lambda pod: pod["metadata"]["name"])[:3]
    states = "; ".join(f"{pod['metadata']['name']}: {pod_ready(pod)[1]}" for pod in shown)
    more = f" and {len(pods) - len(shown)} more" if len(pods) > len(shown) else ""
    return f"none of its {len(pods)} pods is ready ({states}{more})"
