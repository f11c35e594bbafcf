"""A demo edge function: one replica per edge node, with a service time, a capacity and a slow
mode that emulates a degraded node.

Each request waits for one of ``CONCURRENCY`` slots (at most ``QUEUE_LIMIT`` wait; more are
refused with 503, as an overloaded node sheds load), then takes its service time: an
exponential (or fixed) draw around ``SERVICE_TIME_MS``, of which ``CPU_MS`` is spent computing
(so the node's CPU usage follows its load, as the operator's capacity estimate expects) and the
rest waiting, like a call to a local accelerator or disk. The node thus serves about
``CONCURRENCY / SERVICE_TIME_MS`` requests per millisecond. The slowdown factor multiplies the
service time: set it at start (``SLOWDOWN=5``) or at run time::

    python -m edgefn slow 5          # inside the pod: kubectl exec deploy/fn-edge-2 -- ...
    python -m edgefn normal
    curl -X PUT 'localhost:8080/admin/slowdown?factor=5'

Endpoints: ``GET /`` (the function), ``/healthz``, ``/metrics`` (Prometheus), ``GET /admin/state``,
``PUT|DELETE /admin/slowdown``. Settings come from the environment: ``NODE_NAME``,
``SERVICE_TIME_MS`` (20), ``CPU_MS`` (2), ``CONCURRENCY`` (4), ``QUEUE_LIMIT`` (64),
``SLOWDOWN`` (1), ``DISTRIBUTION`` (exponential | fixed), ``PORT`` (8080), ``SEED``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

from fastapi import FastAPI, HTTPException, Query, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

DURATION_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass(frozen=True)
class Settings:
    node: str = "local"
    service_time_ms: float = 20.0
    cpu_ms: float = 2.0
    concurrency: int = 4
    queue_limit: int = 64
    slowdown: float = 1.0
    distribution: str = "exponential"
    port: int = 8080
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.service_time_ms < 0 or self.cpu_ms < 0:
            raise ValueError("SERVICE_TIME_MS and CPU_MS must be >= 0")
        if self.concurrency < 1 or self.queue_limit < 0:
            raise ValueError("CONCURRENCY must be >= 1 and QUEUE_LIMIT >= 0")
        if self.slowdown < 1:
            raise ValueError("SLOWDOWN must be >= 1 (1 is normal speed)")
        if self.distribution not in ("exponential", "fixed"):
            raise ValueError("DISTRIBUTION must be exponential or fixed")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        def get(name: str, kind, default):
            value = env.get(name)
            return default if value in (None, "") else kind(value)

        return cls(
            node=get("NODE_NAME", str, cls.node),
            service_time_ms=get("SERVICE_TIME_MS", float, cls.service_time_ms),
            cpu_ms=get("CPU_MS", float, cls.cpu_ms),
            concurrency=get("CONCURRENCY", int, cls.concurrency),
            queue_limit=get("QUEUE_LIMIT", int, cls.queue_limit),
            slowdown=get("SLOWDOWN", float, cls.slowdown),
            distribution=get("DISTRIBUTION", str, cls.distribution),
            port=get("PORT", int, cls.port),
            seed=get("SEED", int, None),
        )

    @property
    def capacity_rps(self) -> float:
        """Requests per second the node serves at full concurrency."""
        return self.concurrency * 1000.0 / max(self.service_time_ms * self.slowdown, 1e-3)


class Overloaded(Exception):
    """More requests wait than ``queue_limit``."""


class EdgeFunction:
    """The node's state: slots, waiting requests, slowdown, and its metrics."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None):
        self.settings = settings
        self.slowdown = settings.slowdown
        self.slots = asyncio.Semaphore(settings.concurrency)
        self.waiting = 0
        self.in_flight = 0
        self.rng = random.Random(settings.seed)
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = ["node"]
        self.requests = Counter(
            "edgefn_requests",
            "Requests answered, by HTTP code.",
            [*labels, "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "edgefn_request_duration_seconds",
            "Time in the node: waiting plus service.",
            labels,
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.in_flight_gauge = Gauge(
            "edgefn_in_flight", "Requests being served.", labels, registry=self.registry
        )
        self.waiting_gauge = Gauge(
            "edgefn_waiting", "Requests waiting for a slot.", labels, registry=self.registry
        )
        self.slowdown_gauge = Gauge(
            "edgefn_slowdown",
            "Service-time multiplier (1 = normal).",
            labels,
            registry=self.registry,
        )
        self.capacity_gauge = Gauge(
            "edgefn_capacity_requests_per_second",
            "Requests per second at full concurrency.",
            labels,
            registry=self.registry,
        )
        self.set_slowdown(settings.slowdown)

    def set_slowdown(self, factor: float) -> None:
        if not factor >= 1:
            raise ValueError("the slowdown factor must be >= 1 (1 is normal speed)")
        self.slowdown = float(factor)
        node = self.settings.node
        self.slowdown_gauge.labels(node).set(self.slowdown)
        capacity = replace(self.settings, slowdown=self.slowdown).capacity_rps
        self.capacity_gauge.labels(node).set(capacity)

    def service_seconds(self) -> tuple[float, float]:
        """(CPU seconds, waiting seconds) of one request at the current slowdown."""
        settings = self.settings
        mean = settings.service_time_ms / 1000.0 * self.slowdown
        total = mean
        if settings.distribution == "exponential" and mean > 0:
            total = self.rng.expovariate(1.0 / mean)
        cpu_share = 0.0
        if settings.service_time_ms > 0:
            cpu_share = min(settings.cpu_ms / settings.service_time_ms, 1.0)
        return total * cpu_share, total * (1.0 - cpu_share)

    async def serve(self) -> dict:
        node = self.settings.node
        if self.waiting >= self.settings.queue_limit and self.slots.locked():
            self.requests.labels(node, "503").inc()
            raise Overloaded
        start = time.perf_counter()
        self.waiting += 1
        self.waiting_gauge.labels(node).set(self.waiting)
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
            self.waiting_gauge.labels(node).set(self.waiting)
        queued = time.perf_counter() - start
        self.in_flight += 1
        self.in_flight_gauge.labels(node).set(self.in_flight)
        try:
            cpu, wait = self.service_seconds()
            if cpu > 0:
                await asyncio.to_thread(_burn, cpu)
            if wait > 0:
                await asyncio.sleep(wait)
        finally:
            self.in_flight -= 1
            self.in_flight_gauge.labels(node).set(self.in_flight)
            self.slots.release()
        elapsed = time.perf_counter() - start
        self.duration.labels(node).observe(elapsed)
        self.requests.labels(node, "200").inc()
        return {
            "node": node,
            "queued_ms": round(queued * 1000, 3),
            "service_ms": round((elapsed - queued) * 1000, 3),
            "slowdown": self.slowdown,
        }

    def state(self) -> dict:
        return {
            "settings": asdict(self.settings),
            "slowdown": self.slowdown,
            "capacity_rps": replace(self.settings, slowdown=self.slowdown).capacity_rps,
            "in_flight": self.in_flight,
            "waiting": self.waiting,
        }


def _burn(seconds: float) -> None:
    """Busy CPU for ``seconds`` of this thread's CPU time."""
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        for _ in range(1000):
            x += 1


def create_app(
    settings: Settings | None = None, registry: CollectorRegistry | None = None
) -> FastAPI:
    settings = settings or Settings.from_env()
    fn = EdgeFunction(settings, registry)
    app = FastAPI(title=f"edge function on {settings.node}")
    app.state.fn = fn

    @app.get("/")
    async def work() -> dict:
        try:
            return await fn.serve()
        except Overloaded:
            raise HTTPException(503, f"{settings.node} is overloaded") from None

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(fn.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/state")
    async def state() -> dict:
        return fn.state()

    @app.put("/admin/slowdown")
    async def slow(
        factor: float = Query(..., ge=1.0, description="service-time multiplier"),
    ) -> dict:
        fn.set_slowdown(factor)
        return fn.state()

    @app.delete("/admin/slowdown")
    async def normal() -> dict:
        fn.set_slowdown(1.0)
        return fn.state()

    return app


def _admin(url: str, method: str) -> None:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=5) as response:
        print(json.dumps(json.load(response), indent=2))


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from ``main`` so that its help can be checked without running it."""
    head, _, rest = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        prog="python -m edgefn",
        description=head,
        epilog=rest,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", default=None, help="the function's address (default: this pod)")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve the function (the default)")
    slow = sub.add_parser("slow", help="degrade this node: multiply its service time")
    slow.add_argument("factor", type=float, help="how many times slower, 1 or more (e.g. 5)")
    sub.add_parser("normal", help="back to normal speed")
    sub.add_parser("state", help="print the node's state")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    base = args.url or f"http://127.0.0.1:{settings.port}"
    if args.command == "slow":
        _admin(f"{base}/admin/slowdown?factor={args.factor}", "PUT")
    elif args.command == "normal":
        _admin(f"{base}/admin/slowdown", "DELETE")
    elif args.command == "state":
        _admin(f"{base}/admin/state", "GET")
    else:
        import uvicorn

        print(f"edge function on {settings.node}: {settings.capacity_rps:.0f} rps", file=sys.stderr)
        uvicorn.run(create_app(settings), host="0.0.0.0", port=settings.port, access_log=False)


if __name__ == "__main__":
    main()
