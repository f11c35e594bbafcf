"""Open-loop load for the demo edge function: Poisson arrivals at ``RATE`` requests per second.

Run one per edge node (``loadgen-edge-N``, pod label ``marl.dev/node=edge-N``): Istio then
reports its requests with ``source_workload=loadgen-edge-N``, which is how the operator tells
the traffic of each source node apart. Open loop means a slow server does not slow the
arrivals, as with real users. Settings from the environment: ``TARGET_URL``
(http://fn.edge.svc.cluster.local:8080/), ``RATE`` (20), ``MAX_IN_FLIGHT`` (256: beyond it an
arrival is counted as dropped), ``TIMEOUT_S`` (10), ``REPORT_S`` (10: a summary line every so
often), ``DURATION_S`` (0: forever), ``SEED``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import sys
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True)
class Settings:
    target_url: str = "http://fn.edge.svc.cluster.local:8080/"
    rate: float = 20.0
    max_in_flight: int = 256
    timeout_s: float = 10.0
    report_s: float = 10.0
    duration_s: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError("RATE must be > 0")
        if self.max_in_flight < 1:
            raise ValueError("MAX_IN_FLIGHT must be >= 1")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        def get(name: str, kind, default):
            value = env.get(name)
            return default if value in (None, "") else kind(value)

        return cls(
            target_url=get("TARGET_URL", str, cls.target_url),
            rate=get("RATE", float, cls.rate),
            max_in_flight=get("MAX_IN_FLIGHT", int, cls.max_in_flight),
            timeout_s=get("TIMEOUT_S", float, cls.timeout_s),
            report_s=get("REPORT_S", float, cls.report_s),
            duration_s=get("DURATION_S", float, cls.duration_s),
            seed=get("SEED", int, None),
        )


@dataclass
class Stats:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    dropped: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))  # the latest
    by_node: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        lat = sorted(self.latencies_ms)
        p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None
        return {
            "sent": self.sent,
            "ok": self.ok,
            "failed": self.failed,
            "dropped": self.dropped,
            "p95_ms": round(p95, 1) if p95 is not None else None,
            "by_node": dict(self.by_node),
        }


def arrival_gaps(rate: float, rng: random.Random):
    """Seconds between consecutive arrivals of a Poisson process of ``rate`` per second."""
    while True:
        yield rng.expovariate(rate)


@dataclass(frozen=True)
class Outcome:
    ok: bool
    latency_ms: float
    node: str | None = None


def record(stats: Stats, outcome: Outcome) -> None:
    if not outcome.ok:
        stats.failed += 1
        return
    stats.ok += 1
    stats.latencies_ms.append(outcome.latency_ms)
    if outcome.node:
        stats.by_node[outcome.node] = stats.by_node.get(outcome.node, 0) + 1


async def request(client: httpx.AsyncClient, url: str) -> Outcome:
    """One request: ok (200) or not, its latency, and the node that answered."""
    start = time.perf_counter()
    try:
        response = await client.get(url)
    except httpx.HTTPError:
        return Outcome(False, (time.perf_counter() - start) * 1000)
    latency = (time.perf_counter() - start) * 1000
    if response.status_code != 200:
        return Outcome(False, latency)
    try:
        node = response.json().get("node")
    except ValueError:
        node = None
    return Outcome(True, latency, node)


def _recorded(into: tuple[Stats, ...], task: asyncio.Task) -> None:
    if task.cancelled():
        return
    for stats in into:
        record(stats, task.result())


async def run(
    settings: Settings, client: httpx.AsyncClient, duration_s: float | None = None
) -> Stats:
    """Send load for ``duration_s`` (``settings.duration_s`` if None; 0 is forever) and
    return what happened; a summary line is printed every ``settings.report_s``."""
    duration = settings.duration_s if duration_s is None else duration_s
    rng = random.Random(settings.seed)
    stats, window = Stats(), Stats()
    tasks: set[asyncio.Task] = set()
    loop = asyncio.get_running_loop()
    start = next_report = loop.time()
    next_arrival = start
    for gap in arrival_gaps(settings.rate, rng):
        next_arrival += gap
        now = loop.time()
        if duration and next_arrival - start >= duration:
            break
        if next_arrival > now:
            await asyncio.sleep(next_arrival - now)
        stats.sent += 1
        window.sent += 1
        if len(tasks) >= settings.max_in_flight:
            stats.dropped += 1
            window.dropped += 1
            continue
        task = asyncio.create_task(request(client, settings.target_url))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        task.add_done_callback(functools.partial(_recorded, (stats, window)))
        if settings.report_s and loop.time() >= next_report + settings.report_s:
            next_report = loop.time()
            print(json.dumps({"window_s": settings.report_s, **window.summary()}), flush=True)
            window = Stats()
    if tasks:
        await asyncio.wait(tasks, timeout=settings.timeout_s)
    return stats


async def amain(settings: Settings) -> None:
    limits = httpx.Limits(max_connections=settings.max_in_flight)
    async with httpx.AsyncClient(timeout=settings.timeout_s, limits=limits) as client:
        stats = await run(settings, client)
    print(json.dumps({"total": True, **stats.summary()}), flush=True)


def main() -> None:
    settings = Settings.from_env()
    print(f"loadgen: {settings.rate} rps to {settings.target_url}", file=sys.stderr, flush=True)
    asyncio.run(amain(settings))


if __name__ == "__main__":
    main()
