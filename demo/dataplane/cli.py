"""A simulated service-mesh data plane: the simulator obeys live Istio routes and serves
Istio-style metrics, standing in for Istio and the edge functions.

Simulated time runs ``--speed`` times faster than wall time; Prometheus measures rates in
wall time, so a closed loop wants ``--speed 1``.

Examples:

    python -m demo.dataplane --kubeconfig kind.kubeconfig --namespace edge --port 9464 \\
        --load edge-0=40,edge-1=40,edge-2=40
    python -m demo.dataplane --kubeconfig kind.kubeconfig --namespace edge --port 0 \\
        --load fn/edge-0=40,fn/edge-1=40,fn/edge-2=40 --speed 1 --seed 0
    python -m demo.dataplane --kubeconfig kind.kubeconfig --namespace edge --port 0 \\
        --load edge-0=20,edge-1=20,edge-2=20 --work fn=1,heavy=5   # heavy costs 5x fn
    curl -s localhost:9464/metrics | grep istio_requests_total
    curl -s -X POST 'localhost:9464/degrade?node=edge-2&factor=0.5'
    curl -s -X POST 'localhost:9464/fail?node=edge-1'
    curl -s -X POST 'localhost:9464/unready?node=edge-1&service=fn'
    curl -s localhost:9464/truth

Endpoints: GET /metrics (Prometheus text format); GET /truth?seconds=10 (JSON: per-service
p95 and mean latency over the last 10 simulated seconds, the routes applied, the
capacities); POST /degrade?node=N&factor=F (N serves F times its EdgeNode's capacity from
now on; F=1 restores it); POST /fail?node=N (N is gone for the rest of the run: requests
routed to it are refused, its clients and its pods' series stop; its Kubernetes node stays
Ready in the API server unless marked otherwise, as python -m demo --fail does); POST
/unready?node=N&service=S (S's pods on N leave its endpoints for the rest of the run: requests
of S routed to N are refused, N and its clients go on; the pods stay ready in the API server
unless marked otherwise, as python -m demo --unready does); GET
/healthz. It prints ``ready port=N`` on stdout once it serves, logs one JSON object per line
on stderr and stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from kubernetes import client, config
from marl_operator.logs import JsonFormatter
from marl_operator.mesh.model import Manifest

from demo.dataplane.follower import CustomObjects, RouteFollower
from demo.dataplane.plane import DataPlane
from demo.dataplane.scenario import parse_load, parse_work
from demo.dataplane.server import start_http_server
from simulator.cli import (
    DocHelpFormatter,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

logger = logging.getLogger("demo.dataplane")

MARL_GROUP, MARL_VERSION = "marl.dev", "v1alpha1"

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _argument(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its ValueError becomes the flag's error message."""

    def parsed(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parsed


def build_parser() -> argparse.ArgumentParser:
    """Description: the docstring's first paragraph; epilog: its examples and endpoints."""
    head, _, rest = (__doc__ or "").partition("\n\n")
    usage = "Examples:" + rest.partition("Examples:")[2]
    parser = argparse.ArgumentParser(
        prog="python -m demo.dataplane",
        description=head,
        epilog=usage.rstrip(),
        formatter_class=DocHelpFormatter,
    )
    parser.add_argument("--kubeconfig", required=True, help="kubeconfig file of the API server")
    parser.add_argument("--namespace", required=True, help="namespace of the EdgeServices")
    parser.add_argument("--port", type=int, default=9464, help="HTTP port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--load",
        required=True,
        type=_argument(parse_load),
        help="offered requests/s: NODE=RPS,... for every service, or SERVICE/NODE=RPS,...",
    )
    parser.add_argument(
        "--work",
        type=_argument(parse_work),
        default={},
        help="work of one request of a service, SERVICE=UNITS,... (default 1: one request of "
        "an EdgeNode's requestsPerSecond); the CPU metric follows it",
    )
    parser.add_argument(
        "--speed", type=positive_float, default=1.0, help="simulated seconds per second"
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of every random draw"
    )
    parser.add_argument(
        "--poll-seconds", type=positive_float, default=2.0, help="route poll period"
    )
    parser.add_argument(
        "--queue-seconds", type=positive_float, default=10.0, help="queue, in seconds"
    )
    parser.add_argument(
        "--startup-timeout",
        type=non_negative_float,
        default=60.0,
        help="wait this long for the resources",
    )
    parser.add_argument(
        "--log-every",
        type=positive_int,
        default=10,
        help="log the truth every N simulated seconds",
    )
    return parser


def read_resources(
    api: CustomObjects, namespace: str, timeout: float, stop: threading.Event
) -> tuple[list[Manifest], list[Manifest]]:
    """EdgeNodes and the namespace's EdgeServices, waiting until both exist."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            nodes = api.list_cluster_custom_object(MARL_GROUP, MARL_VERSION, "edgenodes")["items"]
            services = api.list_namespaced_custom_object(
                MARL_GROUP, MARL_VERSION, namespace, "edgeservices"
            )["items"]
            if nodes and services:
                return nodes, services
            problem = (
                f"found {len(nodes)} EdgeNodes and {len(services)} EdgeServices in {namespace}"
            )
        except Exception as exc:  # not reachable yet, CRDs not installed yet
            problem = f"reading the resources failed: {exc}"
        if time.monotonic() > deadline or stop.is_set():
            raise RuntimeError(f"{problem} (waited {timeout:g} s)")
        logger.info("waiting for resources", extra={"fields": {"problem": problem}})
        stop.wait(1.0)


def run(args: argparse.Namespace, api: CustomObjects, stop: threading.Event) -> int:
    """Build the data plane from the API server's resources, serve it and step it in real
    time until ``stop`` is set."""
    nodes, services = read_resources(api, args.namespace, args.startup_timeout, stop)
    dp = DataPlane(
        nodes,
        services,
        args.load,
        seed=args.seed,
        queue_seconds=args.queue_seconds,
        work=args.work,
    )
    follower = RouteFollower(dp, api)
    follower.poll()
    server = start_http_server(dp, args.host, args.port)
    poller = threading.Thread(
        target=follower.run, args=(stop, args.poll_seconds), name="routes", daemon=True
    )
    poller.start()
    logger.info(
        "serving",
        extra={
            "fields": {
                "port": server.server_port,
                "nodes": dp.node_names,
                "services": dp.service_names,
            }
        },
    )
    print(f"ready port={server.server_port}", flush=True)
    try:
        _step_in_real_time(dp, stop, 1.0 / args.speed, args.log_every)
    finally:
        server.shutdown()
        server.server_close()
        poller.join(timeout=5)
        logger.info("stopped", extra={"fields": {"seconds": dp.seconds}})
    return 0


def _step_in_real_time(dp: DataPlane, stop: threading.Event, period: float, log_every: int) -> None:
    """One step per ``period`` wall seconds. Falling behind by more than a few periods
    (a paused process) skips ahead rather than replaying the missed seconds in a burst."""
    deadline = time.monotonic()
    while not stop.is_set():
        dp.step()
        if log_every > 0 and dp.seconds % log_every == 0:
            truth = dp.truth(min(log_every, 600))
            fields = {k: truth[k] for k in ("seconds", "services", "degraded", "down")}
            logger.info("truth", extra={"fields": fields})
        deadline += period
        delay = deadline - time.monotonic()
        if delay < -max(1.0, 5 * period):
            logger.warning(
                "behind real time; skipping ahead", extra={"fields": {"behind_s": -delay}}
            )
            deadline = time.monotonic()
        stop.wait(max(delay, 0.0))


def main(
    argv: Sequence[str] | None = None, api_factory: Callable[[str], CustomObjects] | None = None
) -> int:
    """``python -m demo.dataplane``; ``api_factory`` (kubeconfig path -> client) lets a test
    stand in for the API server. SIGTERM and SIGINT stop it; their handlers are restored."""
    args = build_parser().parse_args(argv)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in STOP_SIGNALS}
    try:
        with _json_logging():
            try:
                api = (api_factory or _custom_objects_api)(args.kubeconfig)
                return run(args, api, stop)
            except (RuntimeError, ValueError, OSError, config.ConfigException) as exc:
                logger.error(str(exc))
                return 1
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _json_logging() -> Iterator[None]:
    """This module's records as JSON lines on stderr, for as long as ``main`` runs (the
    root logger is left alone, so an embedding process keeps its own logging)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _custom_objects_api(kubeconfig: str) -> CustomObjects:
    """A client configured from this kubeconfig file only, never from $KUBECONFIG."""
    return client.CustomObjectsApi(config.new_client_from_config(config_file=kubeconfig))
