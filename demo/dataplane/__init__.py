"""A simulated service-mesh data plane: the simulator obeys live Istio routes and serves
Istio-style metrics, standing in for Istio and the edge functions.

The operator's closed-loop test and the embedded demo need a mesh whose latency responds to
the weights the operator writes, without a cluster full of real functions. This process
builds the simulator's mesh from the same EdgeNode and EdgeService objects a user applies,
steps it once per simulated second, routes every node's requests by the weights of the
services' VirtualServices (read from the API server) and serves the metrics Prometheus would
scrape from Istio's sidecars and cAdvisor.

Modules: ``scenario`` (EdgeNode and EdgeService objects -> the simulator's scenario, the
offered load), ``meter`` (the Istio and cAdvisor counters and their Prometheus collector),
``plane`` (:class:`DataPlane`: steps the simulator with the routes in force), ``follower``
(:class:`RouteFollower`: VirtualServices -> routes), ``server`` (the HTTP endpoints) and
``cli`` (``python -m demo.dataplane``: read the resources, serve, step in real time).
"""

from demo.dataplane.cli import MARL_GROUP, MARL_VERSION, STOP_SIGNALS, main, read_resources, run
from demo.dataplane.follower import (
    ISTIO_GROUP,
    ISTIO_VERSION,
    VIRTUAL_SERVICES,
    CustomObjects,
    RouteFollower,
    routes_from_virtual_service,
)
from demo.dataplane.meter import ISTIO_BUCKETS_MS, pod_name
from demo.dataplane.plane import DataPlane
from demo.dataplane.scenario import (
    DEFAULT_CORES,
    NODE_RAM,
    REQUEST_WORK,
    EdgeNodeSpec,
    cpu_cores,
    parse_load,
    parse_work,
    scenario_data,
)
from demo.dataplane.server import start_http_server

__all__ = [
    "DEFAULT_CORES",
    "ISTIO_BUCKETS_MS",
    "ISTIO_GROUP",
    "ISTIO_VERSION",
    "MARL_GROUP",
    "MARL_VERSION",
    "NODE_RAM",
    "REQUEST_WORK",
    "STOP_SIGNALS",
    "VIRTUAL_SERVICES",
    "CustomObjects",
    "DataPlane",
    "EdgeNodeSpec",
    "RouteFollower",
    "cpu_cores",
    "main",
    "parse_load",
    "parse_work",
    "pod_name",
    "read_resources",
    "routes_from_virtual_service",
    "run",
    "scenario_data",
    "start_http_server",
]
