"""The Kubernetes nodes of the cluster ``kind-config.yaml`` describes, as the API returns them.

The operator counts an edge node up while one of its Kubernetes nodes is Ready
(``marl_operator.liveness``). The emulated API server has no kubelet to register nodes, so the
demo and the tests register these: kind's workers, by kind's names and with the labels the
config gives them, which ``examples/edgenodes.yaml`` selects by edge node and by zone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from marl_operator.liveness import members

KIND_CONFIG = Path(__file__).resolve().parent.parent / "kind-config.yaml"


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
