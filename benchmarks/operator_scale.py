"""CPU and memory of one operator process running many RoutingPolicies, as JSON.

    python benchmarks/operator_scale.py                  # 100 policies, 10 nodes, 10 s
    python benchmarks/operator_scale.py --policies 100 --nodes 10 --interval 10 \\
        --duration 120 --warmup 30 --seed 0
    python benchmarks/operator_scale.py --policies 5 --nodes 4 --duration 20 --warmup 10

The target it checks: 100 RoutingPolicies over 10-node meshes on one operator at a 10 s
interval use less than half a core and less than 500 MB of memory.

What runs, each part as a user would start it: the emulated API server (``python -m
demo.apiserver``); ``--nodes``
EdgeNodes on a ring with chords (maximum degree 3, the bundled checkpoint's neighbour slots);
per policy a namespace ``bench-<i>`` with the EdgeService ``fn`` (Istio) and the RoutingPolicy
``routing`` (bundled ``mesh-10x3``, ``intervalSeconds`` = ``--interval``); a stub Prometheus
in this process; and the real operator process (``python -m marl_operator``). The stub answers
every query template with steady, plausible Istio series (M/M/1 nodes under a fixed 70 % local
split, a little multiplicative noise per call). It is a stub on purpose: a real Prometheus
under this load would measure Prometheus.

After ``--warmup`` seconds the operator's CPU time and resident memory are read from /proc
every second for ``--duration`` seconds. Cycles are counted from the operator's own
``marl_operator_cycles_total`` (read at both ends of the window), decision times, decision
paths and the time between two cycles of a policy from its per-cycle JSON log lines: the
headline ``decision_ms_*`` are of the cycles that decided anew (a cycle that keeps its last
decision, or holds, decides nothing), ``decision_ms_by_path`` splits them all by path.
``meets_target`` says whether the mean CPU and the peak RSS are under the target and whether
the policies kept pace (at least 90 % of ``policies / interval`` cycles per second);
``machine_cpu_busy_cores_mean`` shows whether other work shared the machine. Progress goes to
stderr; the last line of stdout is one JSON object. ``--logs DIR`` keeps the components' logs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from kubernetes import client, config
from marl_operator.prometheus import label_answers, split_combined
from tqdm import tqdm

from demo.cluster import kubernetes_node, kubernetes_pod
from demo.prometheus import free_port
from demo.stack import Stack, StackError
from simulator.cli import json_line, non_negative_int, parser_from_doc

TARGET_CPU_CORES = 0.5
TARGET_RSS_MB = 500.0
CPU_WINDOW_S = 10
SERVICE = "fn"
POLICY = "routing"
CHECKPOINT = "mesh-10x3"
MAX_DEGREE = 3
LOCAL_SHARE = 0.7
"""Share of a node's requests its clients send to itself in the stub; the rest is split
evenly over its neighbours."""

# --- the mesh ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Mesh:
    """Edge nodes, their neighbours (in listed order), links and capacities."""

    names: tuple[str, ...]
    neighbours: dict[str, tuple[str, ...]]
    link_ms: dict[frozenset[str], float]
    capacity_rps: dict[str, float]
    cores: dict[str, float]

    def edge_nodes(self) -> list[dict[str, Any]]:
        return [
            {
                "apiVersion": "marl.dev/v1alpha1",
                "kind": "EdgeNode",
                "metadata": {"name": name},
                "spec": {
                    "nodeNames": [f"worker-{name}"],
                    "neighbours": [
                        {"name": nb, "latencyMs": self.link_ms[frozenset((name, nb))]}
                        for nb in self.neighbours[name]
                    ],
                    "capacity": {
                        "requestsPerSecond": self.capacity_rps[name],
                        "cpu": f"{int(self.cores[name] * 1000)}m",
                    },
                },
            }
            for name in self.names
        ]


def ring_with_chords(n: int, rng: np.random.Generator) -> Mesh:
    """A ring plus chords across it, every node of degree at most 3 (as the decision
    benchmark's mesh), with heterogeneous capacities and link latencies."""
    names = tuple(f"edge-{i}" for i in range(n))
    nbrs: dict[str, list[str]] = {x: [] for x in names}
    links: dict[frozenset[str], float] = {}

    def link(a: str, b: str, low: float, high: float) -> None:
        free = len(nbrs[a]) < MAX_DEGREE and len(nbrs[b]) < MAX_DEGREE
        if a != b and b not in nbrs[a] and free:
            nbrs[a].append(b)
            nbrs[b].append(a)
            links[frozenset((a, b))] = round(float(rng.uniform(low, high)), 1)

    for i in range(n):
        link(names[i], names[(i + 1) % n], 2.0, 8.0)
    for i in range(0, n - n % 2, 4):
        link(names[i], names[(i + n // 2) % n], 8.0, 15.0)
    return Mesh(
        names=names,
        neighbours={x: tuple(v) for x, v in nbrs.items()},
        link_ms=links,
        capacity_rps={x: float(rng.choice([60, 80, 100, 120, 150])) for x in names},
        cores={x: float(rng.choice([2.0, 2.5, 4.0])) for x in names},
    )


def edge_service(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "marl.dev/v1alpha1",
        "kind": "EdgeService",
        "metadata": {"name": SERVICE, "namespace": namespace},
        "spec": {
            "host": f"{SERVICE}.{namespace}.svc.cluster.local",
            "port": 8080,
            "latencyTargetMs": 200,
            "nodeLabel": "marl.dev/node",
            "mesh": {"provider": "istio", "virtualService": SERVICE, "destinationRule": SERVICE},
        },
    }


def routing_policy(namespace: str, interval: int, prometheus_url: str) -> dict[str, Any]:
    return {
        "apiVersion": "marl.dev/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": POLICY, "namespace": namespace},
        "spec": {
            "services": [SERVICE],
            "nodes": {},
            "checkpoint": {"bundled": CHECKPOINT},
            "intervalSeconds": interval,
            "prometheus": {"url": prometheus_url, "window": "30s"},
        },
    }


def create_objects(kubeconfig: Path, mesh: Mesh, policies: int, interval: int, url: str) -> None:
    """Through the ``kubernetes`` client configured from ``kubeconfig`` (never $KUBECONFIG)."""
    api = config.new_client_from_config(config_file=str(kubeconfig))
    try:
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        group, version = "marl.dev", "v1alpha1"
        for node in mesh.edge_nodes():
            custom.create_cluster_custom_object(group, version, "edgenodes", node)
            # its Kubernetes node, Ready (the operator routes to no edge node without one)
            worker = kubernetes_node(node["spec"]["nodeNames"][0], {})
            core.create_node({**worker, "status": None})
            core.patch_node_status(worker["metadata"]["name"], {"status": worker["status"]})
        for i in tqdm(range(policies), desc="creating policies", unit="policy", leave=False):
            namespace = f"bench-{i}"
            core.create_namespace({"metadata": {"name": namespace}})
            custom.create_namespaced_custom_object(
                group, version, namespace, "edgeservices", edge_service(namespace)
            )
            # its Service and a ready pod on every edge node (the operator reads them to route
            # the service only where it has a ready pod)
            service = {"metadata": {"name": SERVICE}, "spec": {"selector": {"app": SERVICE}}}
            core.create_namespaced_service(namespace, service)
            for node in mesh.names:
                labels = {"app": SERVICE, "marl.dev/node": node}
                pod = kubernetes_pod(f"{SERVICE}-{node}", namespace, labels)
                core.create_namespaced_pod(namespace, {**pod, "status": None})
                core.patch_namespaced_pod_status(pod["metadata"]["name"], namespace, pod)
            custom.create_namespaced_custom_object(
                group, version, namespace, "routingpolicies",
                routing_policy(namespace, interval, url),
            )  # fmt: skip
    finally:
        api.close()


def count_condition(kubeconfig: Path, kind: str, status: str) -> int:
    """How many RoutingPolicies have the condition ``kind`` with ``status``: that their cycles
    read what the condition says (the Nodes, the pods), not just that they ran."""
    api = config.new_client_from_config(config_file=str(kubeconfig))
    try:
        listed = client.CustomObjectsApi(api).list_cluster_custom_object(
            "marl.dev", "v1alpha1", "routingpolicies"
        )
    finally:
        api.close()
    return sum(
        any(c["type"] == kind and c["status"] == status for c in conds)
        for conds in ((p.get("status") or {}).get("conditions") or [] for p in listed["items"])
    )


# --- the stub Prometheus ----------------------------------------------------------------------


@dataclass
class Traffic:
    """One namespace's steady state: per-pair request rates and latencies, per-node CPU."""

    rate: dict[tuple[str, str], float]  # (source node, destination node) -> requests/s
    mean_ms: dict[tuple[str, str], float]  # client-side, link included
    success: dict[tuple[str, str], float]
    cpu: dict[str, float]  # destination node -> cores


def steady_traffic(mesh: Mesh, rng: np.random.Generator) -> Traffic:
    """M/M/1 nodes under a fixed split: every node offers 30-75 % of its capacity."""
    offered = {x: mesh.capacity_rps[x] * float(rng.uniform(0.3, 0.75)) for x in mesh.names}
    split: dict[str, dict[str, float]] = {}
    for x in mesh.names:
        nbrs = mesh.neighbours[x]
        split[x] = {x: LOCAL_SHARE if nbrs else 1.0}
        split[x] |= {nb: (1.0 - LOCAL_SHARE) / len(nbrs) for nb in nbrs}
    incoming = {x: 0.0 for x in mesh.names}
    for x in mesh.names:
        for y, share in split[x].items():
            incoming[y] += offered[x] * share
    server_ms, success, cpu = {}, {}, {}
    for y in mesh.names:
        rho = incoming[y] / mesh.capacity_rps[y]
        server_ms[y] = 1000.0 / mesh.capacity_rps[y] / (1.0 - min(rho, 0.95))
        success[y] = 1.0 if rho < 0.9 else 0.97
        cpu[y] = min(rho, 1.0) * mesh.cores[y]
    rate, mean, ok = {}, {}, {}
    for x in mesh.names:
        for y, share in split[x].items():
            rate[x, y] = offered[x] * share
            mean[x, y] = server_ms[y] + mesh.link_ms.get(frozenset((x, y)), 0.0)
            ok[x, y] = success[y]
    return Traffic(rate, mean, ok, cpu)


SCRAPE_AGE_S = 5.0
"""Age of the newest sample of every stub series (half a 10-second scrape interval)."""

_NAMESPACE = re.compile(r'(?:destination_service_namespace|namespace)="([^"]+)"')
_SERVICE = re.compile(r'destination_service_name=~"([^"]+)"|pod=~"([^"]+?)-\.\+"')


def classify(query: str) -> str | None:
    """Which built-in template a query is, by the metric names in it."""
    if "container_cpu_usage_seconds_total" in query:
        return "cpu"
    if "timestamp(" in query:
        return "age"
    if "histogram_quantile" in query:
        return "p95"
    if "istio_request_duration_milliseconds_sum" in query and "_count" in query:
        return "mean"
    if "istio_requests_total" in query:
        return "success" if "response_code" in query else "rate"
    return None


class StubPrometheus:
    """Answers ``/api/v1/query`` with Istio-shaped series for any namespace (deterministic
    per namespace and seed, with ``noise`` relative jitter on every answer)."""

    def __init__(self, mesh: Mesh, seed: int, noise: float = 0.03):
        self.mesh, self.seed, self.noise = mesh, seed, noise
        self.queries: Counter[str] = Counter()
        self._traffic: dict[str, Traffic] = {}
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()

    def traffic(self, namespace: str) -> Traffic:
        with self._lock:
            if namespace not in self._traffic:
                rng = np.random.default_rng([self.seed, zlib.crc32(namespace.encode())])
                self._traffic[namespace] = steady_traffic(self.mesh, rng)
            return self._traffic[namespace]

    def jitter(self, size: int) -> np.ndarray:
        with self._lock:
            return self._rng.lognormal(0.0, self.noise, size)

    def answer(self, query: str) -> list[dict[str, Any]]:
        """The answer to one template's query, or to a read's combined query part by part."""
        parts = split_combined(query)
        if parts:
            return label_answers({name: self.answer(q) for name, q in parts.items()})
        kind = classify(query)
        namespace = _NAMESPACE.search(query)
        service = _SERVICE.search(query)
        with self._lock:
            self.queries[kind or "unknown"] += 1
        if kind is None or namespace is None or service is None:
            return []
        svc = service.group(1) or service.group(2)
        traffic = self.traffic(namespace.group(1))
        now = time.time()
        if kind == "cpu":
            noise = self.jitter(len(traffic.cpu))
            return [
                {"metric": {"destination_workload": f"{svc}-{y}"}, "value": [now, f"{v * e:.6g}"]}
                for (y, v), e in zip(traffic.cpu.items(), noise, strict=True)
            ]
        values = {
            "rate": traffic.rate,
            "success": traffic.success,
            "mean": traffic.mean_ms,
            "p95": {k: 3.0 * v for k, v in traffic.mean_ms.items()},  # exponential sojourn
            "age": dict.fromkeys(traffic.rate, SCRAPE_AGE_S),  # scraped a moment ago
        }[kind]
        noise = self.jitter(len(values))
        out = []
        for ((x, y), v), e in zip(values.items(), noise, strict=True):
            value = min(v * e, 1.0) if kind == "success" else v * e
            labels = {"source_workload": f"loadgen-{x}", "destination_workload": f"{svc}-{y}"}
            out.append({"metric": labels, "value": [now, f"{value:.6g}"]})
        return out


def _handler(stub: StubPrometheus) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the operator's requests session expects

        def _serve(self, body: bytes) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path != "/api/v1/query":
                self._send(404, {"status": "error", "error": f"no endpoint {url.path}"})
                return
            params = urllib.parse.parse_qs(url.query)
            params.update(urllib.parse.parse_qs(body.decode(errors="replace")))
            query = (params.get("query") or [""])[0]
            result = stub.answer(query)
            self._send(
                200, {"status": "success", "data": {"resultType": "vector", "result": result}}
            )

        def _send(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve(b"")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self._serve(self.rfile.read(length) if length else b"")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextlib.contextmanager
def serve_stub(stub: StubPrometheus) -> Iterator[str]:
    """Serve ``stub`` on a free loopback port in a thread; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(stub))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="stub-prometheus", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --- measuring --------------------------------------------------------------------------------

CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; utime is field 14
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def rss_mb(status: Mapping[str, str]) -> float:
    return int(status["VmRSS"].split()[0]) / 1024.0  # kB


_CYCLES = re.compile(
    r'^marl_operator_cycles_total\{(?=[^}]*outcome="(?P<outcome>[^"]*)")'
    r'(?=[^}]*policy="(?P<policy>[^"]*)")[^}]*\}\s+(?P<value>\S+)$',
    re.MULTILINE,
)


def cycles_by_policy(operator_url: str) -> dict[tuple[str, str], float]:
    """``(policy, outcome) -> count`` from the operator's /metrics."""
    with urllib.request.urlopen(f"{operator_url}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {(m["policy"], m["outcome"]): float(m["value"]) for m in _CYCLES.finditer(text)}


@dataclass(frozen=True)
class LoggedCycle:
    time: float  # unix seconds
    policy: str
    outcome: str
    decision_ms: float
    path: str  # how it decided: one of DECIDED, kept or other


DECIDED = ("rollout_prior", "rollout_learned", "base_policy")
"""The paths of a cycle that made a decision anew. A kept decision (``kept``) costs one
scoring of two routings, a held one (``other``) none: pooled with them, the percentiles of a
decision's time are mostly the cost of not deciding."""


def decision_path(reason: str) -> str:
    """Which way the cycle decided, from the reason the controller gives."""
    if reason.startswith("rollout decision applied (model: queueing prior"):
        return "rollout_prior"
    if reason.startswith("rollout decision applied (model: learned"):
        return "rollout_learned"
    if reason.startswith("base policy applied"):
        return "base_policy"
    if reason.startswith("previous rollout decision kept"):
        return "kept"
    return "other"


def decision_times(cycles: list[LoggedCycle]) -> dict[str, Any]:
    """Percentiles of the time cycles spent deciding: of the new decisions (the headline
    ``decision_ms_*``), and per path."""
    paths = sorted({c.path for c in cycles})
    by_path = {p: [c.decision_ms for c in cycles if c.path == p] for p in paths}
    decided = [c.decision_ms for c in cycles if c.path in DECIDED]
    return {
        "decision_ms_p50": percentile(decided, 50),
        "decision_ms_p95": percentile(decided, 95),
        "decision_ms_max": round(max(decided), 1) if decided else None,
        "decisions": len(decided),
        "decision_ms_by_path": {
            p: {
                "cycles": len(ms),
                "p50": percentile(ms, 50),
                "p95": percentile(ms, 95),
                "max": round(max(ms), 1),
            }
            for p, ms in by_path.items()
        },
    }


def cycle_log(path: Path) -> list[LoggedCycle]:
    """Every cycle the operator logged, oldest first: its JSON log carries ``policy``,
    ``outcome`` and ``decision_ms`` on the line ``cycle <policy>: <outcome> (<reason>)``."""
    out = []
    with path.open(errors="replace") as lines:
        for line in lines:
            if '"decision_ms"' not in line:
                continue
            try:
                entry = json.loads(line)
                policy, outcome = entry["policy"], entry["outcome"]
                decision_ms = float(entry["decision_ms"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            message = str(entry.get("message", ""))
            reason = message.removeprefix(f"cycle {policy}: {outcome} (").removesuffix(")")
            stamp = datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp()
            out.append(LoggedCycle(stamp, policy, outcome, decision_ms, decision_path(reason)))
    return out


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used (all of /proc/stat's cpu line but
    idle and iowait): a busy machine skews what one process takes."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLOCK_TICK


@dataclass
class Samples:
    """Per-second readings of one process: wall time, CPU seconds, RSS in MB."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)

    def take(self, pid: int) -> None:
        status = proc_status(pid)
        self.wall.append(time.monotonic())
        self.cpu.append(cpu_seconds(pid))
        self.rss.append(rss_mb(status))
        self.threads.append(int(status.get("Threads", "0")))

    def cores_mean(self) -> float:
        return (self.cpu[-1] - self.cpu[0]) / (self.wall[-1] - self.wall[0])

    def cores_windows(self, seconds: float) -> list[float]:
        """Mean cores over every window of ``seconds`` (sliding by one sample)."""
        out = []
        j = 0
        for i in range(len(self.wall)):
            while j < len(self.wall) and self.wall[j] - self.wall[i] < seconds - 0.5:
                j += 1
            if j == len(self.wall):
                break
            out.append((self.cpu[j] - self.cpu[i]) / (self.wall[j] - self.wall[i]))
        return out


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


# --- the run ----------------------------------------------------------------------------------


def measure(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    mesh = ring_with_chords(args.nodes, rng)
    stub = StubPrometheus(mesh, args.seed, noise=args.noise)
    stack = Stack(directory=directory, kubeconfig=directory / "kubeconfig")
    with contextlib.ExitStack() as cleanup:
        stub_url = cleanup.enter_context(serve_stub(stub))
        cleanup.callback(stack.stop_all)  # before the stub stops: the operator goes first
        stack.api_url = stack.spawn(
            "apiserver", ["demo.apiserver", "--kubeconfig", str(stack.kubeconfig)], first_line=True
        )
        create_objects(stack.kubeconfig, mesh, args.policies, args.interval, stub_url)

        port = free_port()
        operator_args = [
            "marl_operator", "--kubeconfig", str(stack.kubeconfig), "--standalone",
            "--prometheus-url", stub_url, "--api-host", "127.0.0.1", "--api-port", str(port),
            "--log-format", "json",
        ]  # fmt: skip
        started = time.monotonic()
        stack.spawn("operator", operator_args)
        stack.operator_url = f"http://127.0.0.1:{port}"
        stack.wait_http("operator", f"{stack.operator_url}/readyz", timeout=args.startup_timeout)
        ready_s = time.monotonic() - started
        operator = stack.processes["operator"]
        apiserver = stack.processes["apiserver"]

        def alive() -> None:
            for name, process in (("operator", operator), ("apiserver", apiserver)):
                if process.poll() is not None:
                    raise StackError(f"{name} exited with code {process.returncode}")

        with tqdm(total=args.warmup, desc="warm-up", unit="s", file=sys.stderr) as bar:
            for _ in range(args.warmup):
                time.sleep(1.0)
                alive()
                bar.update(1)

        samples, api_samples = Samples(), Samples()
        before = cycles_by_policy(stack.operator_url)
        t0, busy0 = time.time(), machine_busy_seconds()
        samples.take(operator.pid)
        api_samples.take(apiserver.pid)
        with tqdm(total=args.duration, desc="measuring", unit="s", file=sys.stderr) as bar:
            next_tick = time.monotonic()
            for _ in range(args.duration):
                next_tick += 1.0
                time.sleep(max(0.0, next_tick - time.monotonic()))
                alive()
                samples.take(operator.pid)
                api_samples.take(apiserver.pid)
                window = samples.cores_windows(CPU_WINDOW_S)
                bar.set_postfix(
                    cores=f"{window[-1] if window else samples.cores_mean():.2f}",
                    rss_mb=f"{samples.rss[-1]:.0f}",
                )
                bar.update(1)
        t1, busy1 = time.time(), machine_busy_seconds()
        after = cycles_by_policy(stack.operator_url)
        pods_ready = count_condition(stack.kubeconfig, "PodsReady", "True")
        wall = samples.wall[-1] - samples.wall[0]

    # Everything below reads what the run left: the processes are gone.
    delta: Counter[tuple[str, str]] = Counter()
    for key, value in after.items():
        delta[key] = value - before.get(key, 0.0)
    per_policy: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    for (policy, outcome), value in delta.items():
        per_policy[policy] += value
        outcomes[outcome] += value
    expected_policies = [f"bench-{i}/{POLICY}" for i in range(args.policies)]
    counts = [per_policy.get(p, 0.0) for p in expected_policies]
    everything = cycle_log(directory / "operator.log")
    logged = [c for c in everything if t0 <= c.time < t1]
    first_seen: dict[str, float] = {}
    previous: dict[str, float] = {}
    periods = []  # seconds from one cycle of a policy to its next, ideally the interval
    for c in everything:
        first_seen.setdefault(c.policy, c.time)
        if c.policy in previous and t0 <= c.time < t1:
            periods.append(c.time - previous[c.policy])
        previous[c.policy] = c.time
    windows = samples.cores_windows(CPU_WINDOW_S)
    cycles = float(sum(counts))
    cores = samples.cores_mean()
    expected = args.policies / args.interval
    rss_peak = max(samples.rss)
    return {
        "policies": args.policies,
        "nodes": args.nodes,
        "interval_s": args.interval,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "seed": args.seed,
        "cpu_cores_mean": round(cores, 4),
        f"cpu_cores_p95_{CPU_WINDOW_S}s": percentile(windows, 95),
        f"cpu_cores_max_{CPU_WINDOW_S}s": round(max(windows), 4) if windows else None,
        "rss_mb_peak": round(rss_peak, 1),
        "rss_mb_mean": round(float(np.mean(samples.rss)), 1),
        "rss_mb_start": round(samples.rss[0], 1),
        "threads_max": max(samples.threads),
        "cycles": int(cycles),
        "cycles_per_s": round(cycles / wall, 3),
        "expected_cycles_per_s": round(expected, 3),
        "cycles_ratio": round(cycles / wall / expected, 3),
        "policies_cycled": sum(c > 0 for c in counts),
        "cycles_per_policy_min": int(min(counts)),
        "cycles_per_policy_max": int(max(counts)),
        **decision_times(logged),
        "cycle_period_s_p50": percentile(periods, 50),
        "cycle_period_s_p95": percentile(periods, 95),
        "cpu_ms_per_cycle": round(1000.0 * cores * wall / cycles, 1) if cycles else None,
        "outcomes": {k: int(v) for k, v in sorted(outcomes.items()) if v},
        "policies_pods_ready": pods_ready,
        "operator_ready_s": round(ready_s, 2),
        "all_policies_first_cycle_s": (
            round(max(first_seen.values()) - min(first_seen.values()), 2)
            if len(first_seen) == args.policies
            else None
        ),
        "apiserver_cpu_cores_mean": round(api_samples.cores_mean(), 4),
        "machine_cpu_busy_cores_mean": round((busy1 - busy0) / (t1 - t0), 3),
        "stub_queries": sum(stub.queries.values()),
        "cpu_count": os.cpu_count(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "targets": {"cpu_cores": TARGET_CPU_CORES, "rss_mb": TARGET_RSS_MB},
        "meets_target": {
            "cpu": cores < TARGET_CPU_CORES,
            "memory": rss_peak < TARGET_RSS_MB,
            "cycles": cycles / wall >= 0.9 * expected,
        },
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from ``main`` so that its help can be checked without running it."""
    parser = parser_from_doc("operator_scale.py", __doc__)
    parser.add_argument("--policies", type=int, default=100, help="RoutingPolicies (namespaces)")
    parser.add_argument("--nodes", type=int, default=10, help="EdgeNodes in the mesh (>= 2)")
    parser.add_argument("--interval", type=int, default=10, help="intervalSeconds (>= 5)")
    parser.add_argument("--duration", type=int, default=120, help="seconds measured")
    parser.add_argument("--warmup", type=int, default=30, help="seconds after ready, unmeasured")
    parser.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seeds the mesh's chords and the stub's readings",
    )
    parser.add_argument("--noise", type=float, default=0.03, help="relative jitter of readings")
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the operator to be ready",
    )
    parser.add_argument("--logs", type=Path, help="keep the components' logs in this directory")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nodes < 2 or args.policies < 1 or args.interval < 5 or args.duration < 2:
        parser.error("need --nodes >= 2, --policies >= 1, --interval >= 5 and --duration >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C (even when started in the background, where SIGINT comes ignored) and SIGTERM
    # end the run through the cleanup that stops every process it started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with contextlib.ExitStack() as cleanup:
        if args.logs is not None:
            directory = args.logs
            directory.mkdir(parents=True, exist_ok=True)
        else:
            tmp = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="marl-scale-"))
            directory = Path(tmp)
        try:
            result = measure(args, directory)
        except StackError as error:
            print(f"operator_scale: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(
                "operator_scale: interrupted; every process it started is stopped", file=sys.stderr
            )
            return 130
    print(json_line(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
