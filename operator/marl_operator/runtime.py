"""The operator's live state across RoutingPolicies, independent of kopf.

A :class:`Runtime` owns one :class:`~marl_operator.controller.PolicyController` per policy,
rebuilds it when the spec's generation changes, turns unusable specs into an ``Invalid``
report (never into a write), and hands every report to the store and the instruments. The
kopf handlers call :meth:`Runtime.cycle` and :meth:`Runtime.delete`; tests and the benchmark
call them directly.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from marl_operator.controller import MeshClient, MetricsSource, PolicyController
from marl_operator.instruments import Instruments
from marl_operator.kube import Kube, KubeMesh
from marl_operator.problem import build_problem
from marl_operator.prometheus import PrometheusReader
from marl_operator.report import CycleReport, Outcome
from marl_operator.spec import CheckpointSource, SpecError, parse_policy_spec
from marl_operator.store import ReportStore
from policies import checkpoint
from policies.checkpoint import CheckpointError, LoadedPolicy

log = logging.getLogger(__name__)

DEFAULT_PROMETHEUS_URL = "http://prometheus.istio-system.svc:9090"
"""Where Istio's Prometheus add-on listens; policies without ``spec.prometheus.url`` use the
operator's ``--prometheus-url``, which defaults to this."""


class Runtime:
    """Controllers, checkpoints, store and instruments of one operator process."""

    def __init__(
        self,
        kube: Kube,
        mesh: MeshClient | None = None,
        reader_for: Callable[[str], MetricsSource] | None = None,
        store: ReportStore | None = None,
        instruments: Instruments | None = None,
        clock: Callable[[], float] = time.time,
        prometheus_url: str = DEFAULT_PROMETHEUS_URL,
    ):
        self.kube = kube
        self.mesh = mesh or KubeMesh(kube)
        self.reader_for = reader_for or (lambda url: PrometheusReader(url))
        self.store = store or ReportStore()
        self.instruments = instruments or Instruments()
        self.clock = clock
        self.prometheus_url = prometheus_url
        self.controllers: dict[str, PolicyController] = {}
        self._checkpoints: dict[tuple, tuple[LoadedPolicy, str]] = {}
        self._lock = threading.Lock()

    # -- building --------------------------------------------------------------------------

    def checkpoint(self, source: CheckpointSource, namespace: str) -> tuple[LoadedPolicy, str]:
        """The policy and the sha256 of its weights (cached: many policies share one)."""
        key = (
            source.kind,
            source.value,
            source.key,
            namespace if source.kind == "configMap" else "",
        )
        with self._lock:
            if key in self._checkpoints:
                return self._checkpoints[key]
        if source.kind == "bundled":
            if not (checkpoint.BUNDLED / source.value).is_dir():
                names = sorted(p.name for p in checkpoint.BUNDLED.iterdir() if p.is_dir())
                raise SpecError(
                    "spec.checkpoint.bundled",
                    f"no bundled checkpoint {source.value!r}; bundled: {', '.join(names)}",
                )
            directory = checkpoint.BUNDLED / source.value
        elif source.kind == "path":
            directory = Path(source.value)
        else:
            try:
                directory = self.kube.checkpoint_from_configmap(namespace, source.value, source.key)
            except FileNotFoundError as error:
                raise SpecError("spec.checkpoint.configMap", str(error)) from None
        try:
            policy = checkpoint.load(directory)  # tensors only, read without torch
        except CheckpointError as error:
            raise SpecError(f"spec.checkpoint.{source.kind}", str(error)) from None
        if policy.meta.get("action", {}).get("mode") != "neighbours":
            raise SpecError(
                f"spec.checkpoint.{source.kind}",
                "the checkpoint's action mode is not 'neighbours' (per-neighbour weights); "
                "train one on a mesh scenario",
            )
        digest = hashlib.sha256((directory / checkpoint.WEIGHTS_FILE).read_bytes()).hexdigest()
        with self._lock:
            self._checkpoints[key] = (policy, digest)
        return policy, digest

    def build(self, key: str, body: Mapping[str, Any]) -> PolicyController:
        namespace = key.split("/", 1)[0]
        spec = parse_policy_spec(body.get("spec"))
        policy, _ = self.checkpoint(spec.checkpoint, namespace)
        max_degree = int(policy.meta["observation"]["max_degree"])
        services = self.kube.edge_services(namespace, spec.services)
        problem = build_problem(spec, self.kube.edge_nodes(), services, max_degree)
        meta = {"step_seconds": 1.0, **policy.meta.get("environment", {})}
        return PolicyController(
            key,
            spec,
            int(body.get("metadata", {}).get("generation", 0)),
            problem,
            policy,
            self.reader_for(spec.prometheus.url or self.prometheus_url),
            self.mesh,
            meta=meta,
            clock=self.clock,
        )

    # -- running -----------------------------------------------------------------------------

    def cycle(self, key: str, body: Mapping[str, Any]) -> CycleReport:
        """One interval of the policy ``key`` (``namespace/name``) as ``body`` now reads."""
        generation = int(body.get("metadata", {}).get("generation", 0))
        controller = self.controllers.get(key)
        if controller is None or controller.generation != generation:
            try:
                controller = self.build(key, body)
            except SpecError as error:
                self.controllers.pop(key, None)
                report = CycleReport(
                    policy=key,
                    time=self.clock(),
                    generation=generation,
                    outcome=Outcome.INVALID,
                    reason=str(error),
                )
                self._publish(report)
                return report
            self.controllers[key] = controller
        report = controller.cycle()
        self._publish(report)
        return report

    def interval(self, key: str) -> float:
        """Seconds from one cycle's start to the next: the spec's interval (30 s, the CRD's
        default, for a policy without a controller)."""
        controller = self.controllers.get(key)
        if controller is None:
            return 30.0
        return float(controller.spec.interval_s)

    def delete(self, key: str, body: Mapping[str, Any]) -> list[str]:
        """Restore the mesh objects of a deleted policy and forget it. A policy this process
        never ran (deleted right after a restart) is rebuilt from ``body`` to find its
        objects; one that cannot be built never wrote anything."""
        controller = self.controllers.pop(key, None)
        if controller is None:
            try:
                controller = self.build(key, body)
            except SpecError:
                controller = None
        done: list[str] = []
        if controller is not None and hasattr(self.mesh, "restore"):
            for service in controller.problem.services:
                done += self.mesh.restore(service, controller.problem.nodes)
        self.store.forget(key)
        self.instruments.forget(key)
        return done

    def _publish(self, report: CycleReport) -> None:
        self.store.put(report)
        self.instruments.record(report)
        log.info(
            "cycle %s: %s (%s)",
            report.policy,
            report.outcome.value,
            report.reason,
            extra={
                "fields": {
                    "policy": report.policy,
                    "outcome": report.outcome.value,
                    "decision_ms": round(report.decision_ms, 2),
                }
            },
        )
