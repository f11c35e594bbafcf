"""The Kubernetes nodes of the cluster ``kind-config.yaml`` describes, and the pods of the demo
workload, as the API returns them.

The operator counts an edge node up while one of its Kubernetes nodes is Ready, and routes a
service to it while it has a ready pod of the service (``marl_operator.liveness``). The
emulated API server has no kubelet to register nodes nor controllers to make pods, so the demo
and the tests register these: kind's workers, by kind's names and with the labels the config
gives them, which ``examples/edgenodes.yaml`` selects by edge node and by zone; and the
Services of ``workload/k8s/10-fn.yaml`` with one running pod per replica of its Deployments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from marl_operator.liveness import members

KIND_CONFIG = Path(__file__).resolve().parent.parent / "kind-config.yaml"
WORKLOAD = Path(__file__).resolve().parent.parent / "workload" / "k8s" / "10-fn.yaml"


def kind_nodes(
    config_file: Path = KIND_CONFIG, cluster: str = "kind", ready: str = "True"
) -> list[dict[str, Any]]:
    """The worker Nodes kind creates from a cluster config (``kind-worker``, ``kind-worker2``,
    ...), each with its Ready condition's status ``ready``."""
    config = yaml.safe_load(Path(config_file).read_text())
    workers = [node for node in config["nodes"] if node.get("role") == "worker"]
    nodes = []
    for index, worker in enumerate(workers, start=1):
        name = f"{cluster}-worker{index if index > 1 else ''}"
        labels = {"kubernetes.io/hostname": name, **(worker.get("labels") or {})}
        nodes.append(kubernetes_node(name, labels, ready))
    return nodes


def kubernetes_node(name: str, labels: dict[str, str], ready: str = "True") -> dict[str, Any]:
    """A Node with a Ready condition of status ``ready`` (``True``, ``False``, ``Unknown``)."""
    reason, message = {  # what a kubelet, or the node controller for Unknown, reports
        "True": ("KubeletReady", "kubelet is posting ready status"),
        "False": ("KubeletNotReady", "container runtime network not ready"),
    }.get(ready, ("NodeStatusUnknown", "Kubelet stopped posting node status."))
    condition = {"type": "Ready", "status": ready, "reason": reason, "message": message}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {"conditions": [condition]},
    }


def kubernetes_nodes_of(edge_node: dict[str, Any], config_file: Path = KIND_CONFIG) -> list[str]:
    """The names of the Kubernetes nodes of the kind cluster that make up ``edge_node``
    (named, or selected by its labels), as the operator finds them."""
    return [n["metadata"]["name"] for n in members(edge_node, kind_nodes(config_file))]


def kubernetes_pod(
    name: str, namespace: str, labels: dict[str, str], ready: str = "True"
) -> dict[str, Any]:
    """A running Pod whose Ready condition has status ``ready`` (``True``, ``False``)."""
    reason = {"True": None, "False": "ContainersNotReady"}.get(ready, "PodNotReady")
    condition = {"type": "Ready", "status": ready} | ({"reason": reason} if reason else {})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "status": {"phase": "Running", "conditions": [condition]},
    }


def workload_pods(app: str, node_label: str, manifest: Path = WORKLOAD) -> list[str]:
    """The names of the pods of ``workload_objects`` labelled ``app`` on the edge node whose
    ``marl.dev/node`` label value is ``node_label``."""
    wanted = {"app": app, "marl.dev/node": node_label}
    return [
        obj["metadata"]["name"]
        for obj in workload_objects(manifest)
        if obj["kind"] == "Pod" and wanted.items() <= obj["metadata"]["labels"].items()
    ]


def workload_objects(manifest: Path = WORKLOAD) -> list[dict[str, Any]]:
    """The Services of a workload manifest, and a ready Pod (``<deployment>-<i>``) for each
    replica of its Deployments, labelled as their template says."""
    objects = []
    for doc in yaml.safe_load_all(Path(manifest).read_text()):
        if not isinstance(doc, dict):
            continue
        if doc.get("kind") == "Service":
            objects.append(doc)
        elif doc.get("kind") == "Deployment":
            meta, spec = doc["metadata"], doc["spec"]
            labels = spec["template"]["metadata"].get("labels") or {}
            for i in range(int(spec.get("replicas", 1))):
                pod = kubernetes_pod(f"{meta['name']}-{i}", meta["namespace"], labels)
                objects.append(pod)
    return objects
