"""Metering: what Istio's sidecars and cAdvisor would have counted, kept as counters and
histograms and exposed to Prometheus at scrape time.

How the metrics approximate Istio's
    ``istio_requests_total{reporter="source"}`` counts the requests node i sends to node j in a
    step, with code 200 for those j accepts and 503 for those its full queue refuses: the
    per-pair rates are exactly what the routing did. The simulator knows each request's latency
    by serving node, not by (source, serving node) pair, so a pair's latency histogram gets that
    step's latency distribution of requests served at j (queueing and service) shifted by the
    link i -> j, spread over the pair's accepted requests; a 503 takes the link latency. A
    request routed to a node that is down (no endpoint left in its subset) is answered 503 by
    the client's own proxy at once, flag UH, with destination workload ``unknown``: Envoy never
    picked a host. Requests from different sources share j's queue, so their latencies differ
    only by their place within the step. Counting a request in the step it is routed rather than
    the one it completes in differs from Istio by at most a queue's worth of requests (and the
    queue of a node that fails was counted as accepted: Envoy would report those as reset).
    ``container_cpu_usage_seconds_total`` is busy fraction x cores x seconds, split among
    services by the work each had served. The exact client-perceived latencies are kept as
    ground truth (:meth:`DataPlane.p95_ms`, :meth:`DataPlane.mean_ms`, GET /truth) for tests and
    the demo; the operator never reads them.

Workload names: the server of service S on edge node N is ``S-L`` and its clients are
``loadgen-L``, with L the node's pod-label value (``spec.podLabelValue`` or its name), so
the operator maps a workload to its edge node by that suffix. Pods are named like Deployment
pods (``S-L-<hash>-<hash>``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from policies.topology import Topology
from policies.weights import largest_remainder
from simulator.engine import LATENCY_BINS_MS, StepOutcome

if TYPE_CHECKING:
    from demo.dataplane.plane import DataPlane

ISTIO_BUCKETS_MS = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000,
    30000, 60000, 300000, 600000, 1800000, 3600000,
)  # fmt: skip
"""Upper bounds of Istio's default ``istio_request_duration_milliseconds`` buckets (+Inf after)."""

_POD_HASH_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what Kubernetes uses for name suffixes
_OK, _REFUSED = 0, 1  # response-code axis: 200, 503
_CODES = (("200", "-"), ("503", "UO"))  # response_code, response_flags (UO: upstream overflow)


def pod_name(namespace: str, workload: str) -> str:
    """A stable Deployment-style pod name, ``<workload>-<10 chars>-<5 chars>``."""
    digest = hashlib.sha256(f"{namespace}/{workload}".encode()).digest()
    chars = [_POD_HASH_ALPHABET[b % len(_POD_HASH_ALPHABET)] for b in digest[:15]]
    return f"{workload}-{''.join(chars[:10])}-{''.join(chars[10:])}"


@dataclass
class Counters:
    """Monotone totals behind the metrics, by (source, destination slot, service, code)."""

    requests: np.ndarray  # (N, K+1, S, 2) int
    buckets: np.ndarray  # (N, K+1, S, 2, len(ISTIO_BUCKETS_MS) + 1) int, not cumulative
    sum_ms: np.ndarray  # (N, K+1, S, 2)
    cpu_seconds: np.ndarray  # (N, S)
    no_upstream: np.ndarray  # (N, S) int: routed to a node that is down, answered 503 UH
    seconds: int = 0

    def copy(self) -> Counters:
        return Counters(
            self.requests.copy(),
            self.buckets.copy(),
            self.sum_ms.copy(),
            self.cpu_seconds.copy(),
            self.no_upstream.copy(),
            self.seconds,
        )


class Meter:
    """What Istio's sidecars and cAdvisor would have counted, step by step (the
    approximations are the module docstring's). Pairs are (source node, slot): slot 0 is
    the node itself, slot m its m-th neighbour, as in the simulator's action layout."""

    def __init__(
        self,
        topo: Topology,
        rps: np.ndarray,
        cores: np.ndarray,
        step_seconds: float,
        work: np.ndarray | None = None,
    ):
        n, s, k = topo.num_nodes, topo.num_services, topo.max_degree
        self.dest = np.concatenate([np.arange(n)[:, None], topo.neighbour_safe], axis=1)
        self.valid = np.concatenate([np.ones((n, 1), bool), topo.neighbour_mask], axis=1)
        self.link_ms = topo.link_matrix[np.arange(n)[:, None], self.dest]
        self.cores, self.step_seconds = cores, step_seconds
        self.work = np.ones(topo.num_services) if work is None else np.asarray(work, float)
        # Simulator latency bin (read at its midpoint) plus the link -> Istio bucket, one-hot.
        edges = LATENCY_BINS_MS
        middle = np.concatenate([(edges[:-1] + edges[1:]) / 2, edges[-1:]])
        bucket = np.searchsorted(ISTIO_BUCKETS_MS, middle + self.link_ms[..., None], "left")
        self.bucket_map = np.eye(len(ISTIO_BUCKETS_MS) + 1, dtype=np.int64)[bucket]
        self.refused_bucket = np.searchsorted(ISTIO_BUCKETS_MS, self.link_ms, "left")
        # Each node's latest latency distribution, for a step in which it served nothing:
        # until it serves, one request's service time.
        first = np.clip(np.searchsorted(edges, 1000.0 / rps, "right") - 1, 0, None)
        self.last_hist = np.zeros((n, s, len(edges)))
        self.last_hist[np.arange(n), :, first] = 1.0
        self.last_mean = np.repeat((1000.0 / rps)[:, None], s, axis=1)
        self.counters = Counters(
            requests=np.zeros((n, k + 1, s, 2), np.int64),
            buckets=np.zeros((n, k + 1, s, 2, len(ISTIO_BUCKETS_MS) + 1), np.int64),
            sum_ms=np.zeros((n, k + 1, s, 2)),
            cpu_seconds=np.zeros((n, s)),
            no_upstream=np.zeros((n, s), np.int64),
        )

    def record(
        self,
        info: Mapping[str, Any],
        out: StepOutcome,
        cpu_cap: np.ndarray,
        unroutable: np.ndarray | None = None,
    ) -> np.ndarray:
        """Count one step of ``EdgeEnv.step``; returns each node's busy fraction.
        ``unroutable`` ``(N, S, K+1)``: requests routed to a node that is down, which the step
        counted as the source's rejections; they are counted as no upstream's instead."""
        server = info["server"]
        valid = self.valid[..., None]
        sent = np.concatenate([info["local"][0][:, None], info["forward"][0]], axis=1)
        refused = np.concatenate(
            [(out.local_rejects[0] + info["reject"][0])[:, None], out.forward_rejects[0]], axis=1
        )
        if unroutable is not None:
            refused[:, 0] -= unroutable.sum(axis=-1)
            self.counters.no_upstream += unroutable.sum(axis=-1)
        accepted = np.where(valid, sent - refused, 0)  # (N, K+1, S)
        refused = np.where(valid, refused, 0)

        count = server.count[0]  # (N, S) requests served at each node
        seen = count > 0
        self.last_hist[seen] = server.hist[0][seen]
        self.last_mean[seen] = server.sum_ms[0][seen] / count[seen]
        per_bin = largest_remainder(self.last_hist[self.dest], accepted)  # (N, K+1, S, bins)
        c = self.counters
        c.buckets[..., _OK, :] += np.einsum("nmsb,nmbk->nmsk", per_bin, self.bucket_map)
        rows, slots = np.indices(self.refused_bucket.shape)
        np.add.at(
            c.buckets[..., _REFUSED, :], (rows, slots, slice(None), self.refused_bucket), refused
        )
        c.requests[..., _OK] += accepted
        c.requests[..., _REFUSED] += refused
        link = self.link_ms[..., None]
        c.sum_ms[..., _OK] += accepted * (self.last_mean[self.dest] + link)
        c.sum_ms[..., _REFUSED] += refused * link

        busy = np.where(cpu_cap > 0, info["cpu_used"][0] / np.maximum(cpu_cap, 1e-12), 0.0)
        served = count * self.work  # (N, S) work served
        total = served.sum(axis=1, keepdims=True)
        share = np.where(total > 0, served / np.where(total > 0, total, 1.0), 1 / count.shape[1])
        c.cpu_seconds += (busy * self.cores * self.step_seconds)[:, None] * share
        c.seconds += 1
        return busy


class Collector:
    """Turns a :class:`DataPlane`'s counters into metric families at scrape time."""

    PAIR_LABELS = (
        "reporter",
        "source_workload",
        "source_workload_namespace",
        "destination_workload",
        "destination_workload_namespace",
        "destination_service_name",
        "destination_service_namespace",
        "response_code",
        "response_flags",
    )

    def __init__(self, dataplane: DataPlane):
        self.dp = dataplane

    def collect(self) -> Iterator[Metric]:
        dp = self.dp
        c, dest, down = dp._snapshot()  # a node that is down has no pods: no series
        labels = [node.label for node in dp.nodes]
        requests = CounterMetricFamily(
            "istio_requests_total",
            "Requests by client and server workload (simulated mesh).",
            labels=self.PAIR_LABELS,
        )
        duration = HistogramMetricFamily(
            "istio_request_duration_milliseconds",
            "Client-perceived request duration (simulated mesh).",
            labels=self.PAIR_LABELS,
        )
        for i, m, s, code in zip(*np.nonzero(c.requests), strict=True):
            if down[i]:
                continue
            svc = dp.service_names[s]
            ns = dp.namespaces[svc]
            values = (
                "source",
                f"loadgen-{labels[i]}",
                ns,
                f"{svc}-{labels[dest[i, m]]}",
                ns,
                svc,
                ns,
                *_CODES[code],
            )
            requests.add_metric(values, float(c.requests[i, m, s, code]))
            cumulative = np.cumsum(c.buckets[i, m, s, code])
            les = [_le(b) for b in ISTIO_BUCKETS_MS] + ["+Inf"]
            duration.add_metric(
                values,
                list(zip(les, cumulative.astype(float), strict=True)),
                float(c.sum_ms[i, m, s, code]),
            )
        for i, s in zip(*np.nonzero(c.no_upstream), strict=True):
            if down[i]:
                continue
            svc = dp.service_names[s]
            ns = dp.namespaces[svc]
            values = ("source", f"loadgen-{labels[i]}", ns, "unknown", "unknown", svc, ns)
            count = float(c.no_upstream[i, s])
            requests.add_metric((*values, "503", "UH"), count)
            les = [_le(b) for b in ISTIO_BUCKETS_MS] + ["+Inf"]
            duration.add_metric((*values, "503", "UH"), [(le, count) for le in les], 0.0)
        cpu = CounterMetricFamily(
            "container_cpu_usage_seconds_total",
            "CPU seconds used by the service containers (simulated cAdvisor).",
            labels=("namespace", "pod", "container"),
        )
        for j, s in np.ndindex(c.cpu_seconds.shape):
            if down[j]:
                continue
            svc = dp.service_names[s]
            ns = dp.namespaces[svc]
            cpu.add_metric(
                (ns, pod_name(ns, f"{svc}-{labels[j]}"), svc), float(c.cpu_seconds[j, s])
            )
        seconds = CounterMetricFamily(
            "marl_dataplane_simulated_seconds_total", "Simulated seconds stepped by the data plane."
        )
        seconds.add_metric((), float(c.seconds))
        yield from (requests, duration, cpu, seconds)


def _le(bound: float) -> str:
    """Bucket bound as Istio writes it (``0.5``, ``1800000``), never in exponent notation."""
    return f"{bound:f}".rstrip("0").rstrip(".")
