"""The operator's own Prometheus metrics, all updated from one CycleReport (but the count of
cycles skipped because the policy's previous one still ran, which produced no report).

The metrics live in a registry owned by :class:`Instruments`, not in prometheus_client's global
default one: tests, and several operators in one process, then never see each other's series.
Everything is set from the report a cycle produced, so the metrics cannot disagree with the
status, the events and the HTTP API, which read the same value.

Gauges describe the policy as of its last cycle: a series that the last report no longer has
(a route that disappeared, a service without observations this cycle) is removed rather than
left at a stale value, and :meth:`Instruments.forget` removes every series of a deleted policy.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics import MetricWrapperBase

from marl_operator.report import CycleReport, Outcome

PREFIX = "marl_operator_"

DECISION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds; a decision takes milliseconds with a heuristic and up to seconds with rollout."""

NO_DECISION = frozenset({Outcome.SUSPENDED, Outcome.INVALID})
"""Outcomes of cycles that never attempted a decision: their time would skew the histogram.
A cycle held or fallen back without deciding (metrics missing, every node down, a failure)
is told by its report having no proposal."""

Labels = tuple[str, ...]


class Instruments:
    """The ``marl_operator_*`` metrics of one operator, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        # process_* (start time, resident memory, CPU, open fds): the default registry has them,
        # this one only if asked; without them restarts and the memory the chart's limit is
        # sized from cannot be watched from the operator's own metrics.
        ProcessCollector(registry=reg)
        self.cycles = Counter(
            PREFIX + "cycles",
            "Control cycles run, by how they ended.",
            ["policy", "outcome"],
            registry=reg,
        )
        self.decision_seconds = Histogram(
            PREFIX + "decision_seconds",
            "Time one cycle spent deciding the weights.",
            ["policy"],
            buckets=DECISION_BUCKETS,
            registry=reg,
        )
        self.weight = Gauge(
            PREFIX + "weight",
            "Integer weight (of 100) the mesh carries from source to destination edge node.",
            ["policy", "service", "source", "destination"],
            registry=reg,
        )
        self.fallback = Gauge(
            PREFIX + "fallback",
            "1 when the last cycle kept the base policy or wrote the safety fallback, else 0.",
            ["policy"],
            registry=reg,
        )
        self.model_nmae = Gauge(
            PREFIX + "model_nmae",
            "Held-out normalised mean absolute error of the system model, per target "
            "(mesh_mean_ms: each interval's mean latency over the whole mesh).",
            ["policy", "target"],
            registry=reg,
        )
        self.observed_p95 = Gauge(
            PREFIX + "observed_p95_seconds",
            "95th-percentile latency observed over the last interval, in seconds.",
            ["policy", "service"],
            registry=reg,
        )
        self.predicted_p95 = Gauge(
            PREFIX + "predicted_p95_seconds",
            "95th-percentile latency the model predicts for the chosen weights, in seconds.",
            ["policy", "service"],
            registry=reg,
        )
        self.cycles_skipped = Counter(
            PREFIX + "cycles_skipped",
            "Cycles not run because the policy's previous cycle was still running.",
            ["policy"],
            registry=reg,
        )
        self.last_cycle = Gauge(
            PREFIX + "last_cycle_timestamp_seconds",
            "Unix time the last cycle of the policy ended.",
            ["policy"],
            registry=reg,
        )
        # policy -> metric -> label values it has series for; what forget() and the
        # stale-series removal need, since prometheus_client cannot select by one label.
        self._series: dict[str, dict[MetricWrapperBase, set[Labels]]] = defaultdict(
            lambda: defaultdict(set)
        )
        # Cycles run in several worker threads; the bookkeeping above must move in step
        # with the series themselves.
        self._lock = threading.Lock()

    def record(self, report: CycleReport) -> None:
        """Update every metric from one finished cycle."""
        policy = report.policy
        with self._lock:
            series = self._series[policy]
            if not series[self.cycles]:
                # Start every outcome at zero, so the first Fallback shows as an increase.
                for outcome in Outcome:
                    self.cycles.labels(policy, outcome.value)
                    series[self.cycles].add((policy, outcome.value))
            self.cycles.labels(policy, report.outcome.value).inc()

            if report.outcome not in NO_DECISION and report.proposed is not None:
                self.decision_seconds.labels(policy).observe(report.decision_ms / 1000.0)
                series[self.decision_seconds].add((policy,))

            fell_back = report.fallback is not None or report.outcome is Outcome.FALLBACK
            self._replace(self.fallback, policy, {(policy,): float(fell_back)})
            self._replace(self.last_cycle, policy, {(policy,): report.time})
            self._replace(
                self.weight,
                policy,
                {
                    (policy, service, source, destination): float(weight)
                    for service, sources in report.weights.items()
                    for source, destinations in sources.items()
                    for destination, weight in destinations.items()
                },
            )
            nmae = (report.model or {}).get("nmae") or {}
            self._replace(
                self.model_nmae,
                policy,
                {(policy, target): _number(value) for target, value in nmae.items()},
            )
            self._replace(self.observed_p95, policy, _seconds(policy, report.observed_p95_ms))
            self._replace(self.predicted_p95, policy, _seconds(policy, report.predicted_p95_ms))

    def track_certificate(self, refused: Callable[[], bool]) -> None:
        """Expose whether the HTTP API's certificate files hold a pair it cannot serve
        (``refused``, asked at each scrape): the previous certificate is served meanwhile,
        and without an alert on this it would expire unnoticed (probes do not verify it)."""
        Gauge(
            PREFIX + "api_certificate_refused",
            "1 while the HTTP API's certificate files hold a pair it cannot serve (it serves "
            "the previous certificate meanwhile), else 0.",
            registry=self.registry,
        ).set_function(lambda: float(refused()))

    def skipped(self, policy: str) -> None:
        """Count a cycle that was not run: the policy's previous one still ran."""
        with self._lock:
            self.cycles_skipped.labels(policy).inc()
            self._series[policy][self.cycles_skipped].add((policy,))

    def forget(self, policy: str) -> None:
        """Remove every series of a deleted policy."""
        with self._lock:
            for metric, keys in self._series.pop(policy, {}).items():
                for key in keys:
                    metric.remove(*key)

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The registry in the format the scraper's Accept header asks for (Prometheus text by
        default, OpenMetrics on request), with its content type. Taken under the lock, so
        that a scrape sees a policy's series as one report left them, never half replaced."""
        encode, content_type = choose_encoder(accept or "")
        with self._lock:
            return encode(self.registry), content_type

    def _replace(self, gauge: Gauge, policy: str, values: Mapping[Labels, float]) -> None:
        """Make the policy's series of ``gauge`` exactly ``values``; called under the lock."""
        known = self._series[policy][gauge]
        for key in known - values.keys():
            gauge.remove(*key)
        for key, value in values.items():
            gauge.labels(*key).set(value)
        known.clear()
        known.update(values.keys())


def _seconds(policy: str, values_ms: Mapping[str, float | None]) -> dict[Labels, float]:
    """Milliseconds, as the report keeps them, in seconds, Prometheus's base unit of time."""
    return {
        (policy, service): _number(None if ms is None else ms / 1000.0)
        for service, ms in values_ms.items()
    }


def _number(value: float | None) -> float:
    """A float for a gauge; None (no estimate) becomes NaN, which Prometheus shows as such."""
    return math.nan if value is None else float(value)
