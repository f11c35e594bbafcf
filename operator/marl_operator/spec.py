"""A RoutingPolicy's spec, read into typed values with the CRD's defaults.

The API server validates the spec against the CRD schema and fills in defaults, but the
operator does not rely on it: an object may come from a server that skipped validation (an
older CRD, an emulator), and a controller that trusted it would write weights computed from a
typo. Every check here names the field and says what would be accepted, so the message can go
straight into the resource's status condition.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from marl_operator.prometheus import QueryError, check_templates, check_url, check_window

FALLBACKS = ("hold", "static", "local")


class SpecError(ValueError):
    """A spec the operator cannot run; ``field`` is its path, e.g. ``spec.safety.minWeight``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class CheckpointSource:
    kind: str  # configMap | path | bundled
    value: str  # ConfigMap name, directory or bundled name
    key: str = "policy"  # the ConfigMap's key prefix

    def describe(self) -> str:
        return f"{self.kind}:{self.value}" + (f"/{self.key}" if self.kind == "configMap" else "")


@dataclass(frozen=True)
class PrometheusSpec:
    url: str | None = None  # None: the operator's --prometheus-url (the chart's prometheus.url)
    window: str = "1m"
    queries: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RolloutSpec:
    enabled: bool = True
    horizon: int = 5
    steps: tuple[float, ...] = (0.1, 0.3)
    margin: float = 0.01
    reuse_tolerance: float = 0.05


@dataclass(frozen=True)
class SafetySpec:
    max_weight_change: int = 20
    min_weight_change: int = 2
    min_weight: int = 0
    failure_threshold: int = 3
    fallback: str = "hold"
    stale_after_s: int = 120


@dataclass(frozen=True)
class PolicySpec:
    services: tuple[str, ...]
    checkpoint: CheckpointSource
    node_names: tuple[str, ...] | None = None
    node_selector: Mapping[str, Any] | None = None
    interval_s: int = 30
    prometheus: PrometheusSpec = field(default_factory=PrometheusSpec)
    rollout: RolloutSpec = field(default_factory=RolloutSpec)
    safety: SafetySpec = field(default_factory=SafetySpec)
    suspend: bool = False
    dry_run: bool = False


class _Fields:
    """Typed access to one object of the spec, with the path for messages."""

    def __init__(self, raw: Any, path: str):
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise SpecError(path, f"must be an object, got {type(raw).__name__}")
        self.raw, self.path = raw, path

    def sub(self, key: str) -> _Fields:
        return _Fields(self.raw.get(key), f"{self.path}.{key}")

    def get(self, key: str, kind: type, default: Any, lo: float | None = None, hi=None) -> Any:
        value = self.raw.get(key, default)
        where = f"{self.path}.{key}"
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise SpecError(where, f"must be a {kind.__name__}, got {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise SpecError(where, f"must lie in [{lo}, {hi}], got {value!r}")
        return value


def parse_policy_spec(spec: Mapping[str, Any] | None) -> PolicySpec:
    """The typed spec, or :class:`SpecError` naming the first bad field."""
    root = _Fields(spec, "spec")
    services = root.raw.get("services")
    if not isinstance(services, list) or not services:
        raise SpecError("spec.services", "list at least one EdgeService name")
    if not all(isinstance(s, str) and s for s in services) or len(set(services)) < len(services):
        raise SpecError("spec.services", f"must be distinct non-empty names, got {services!r}")

    nodes = root.sub("nodes")
    names = nodes.raw.get("names")
    selector = nodes.raw.get("selector")
    if names is not None and selector is not None:
        raise SpecError("spec.nodes", "set nodes.names or nodes.selector, not both")
    if names is not None and (not isinstance(names, list) or not names):
        raise SpecError("spec.nodes.names", "list at least one EdgeNode name, or omit it")
    if selector is not None and not isinstance(selector, Mapping):
        raise SpecError("spec.nodes.selector", "must be a label selector object")

    prom = root.sub("prometheus")
    queries = prom.get("queries", dict, {})
    for name, template in sorted(queries.items()):
        # A template that could never run is the spec's fault: left to the first read, it
        # would count as a metrics outage and end in the fallback routing.
        try:
            check_templates({name: template})
        except QueryError as error:
            where = f"spec.prometheus.queries.{name}"
            raise SpecError(where, str(error).removeprefix(f"{where}: ")) from None
    window = prom.get("window", str, "1m")
    try:
        check_window(window)
    except ValueError as error:
        where = "spec.prometheus.window"
        raise SpecError(where, str(error).removeprefix(f"{where}: ")) from None
    url = prom.get("url", str, "") or None
    if url is not None:
        try:
            check_url(url)
        except ValueError as error:
            raise SpecError("spec.prometheus.url", str(error)) from None

    rollout = root.sub("rollout")
    steps = rollout.raw.get("candidateSteps", list(RolloutSpec.steps))
    if (
        not isinstance(steps, list)
        or not steps
        or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in steps)
        or not all(0 < x < 1 for x in steps)
    ):
        raise SpecError(
            "spec.rollout.candidateSteps", f"list numbers in (0, 1), e.g. [0.1, 0.3], got {steps}"
        )

    safety = root.sub("safety")
    fallback = safety.get("fallback", str, "hold")
    if fallback not in FALLBACKS:
        raise SpecError("spec.safety.fallback", f"must be one of {FALLBACKS}, got {fallback!r}")

    return PolicySpec(
        services=tuple(services),
        checkpoint=_checkpoint(root.sub("checkpoint")),
        node_names=tuple(names) if names is not None else None,
        node_selector=selector,
        interval_s=root.get("intervalSeconds", int, 30, 5, 3600),
        prometheus=PrometheusSpec(url=url, window=window, queries=dict(queries)),
        rollout=RolloutSpec(
            enabled=rollout.get("enabled", bool, True),
            horizon=rollout.get("horizon", int, 5, 1, 50),
            steps=tuple(float(x) for x in steps),
            margin=rollout.get("margin", float, 0.01, 0.0, 1.0),
            reuse_tolerance=rollout.get("reuseTolerance", float, 0.05, 0.0, 1.0),
        ),
        safety=SafetySpec(
            max_weight_change=safety.get("maxWeightChange", int, 20, 1, 100),
            min_weight_change=safety.get("minWeightChange", int, 2, 1, 100),
            min_weight=safety.get("minWeight", int, 0, 0, 99),
            failure_threshold=safety.get("failureThreshold", int, 3, 1, 1000),
            fallback=fallback,
            stale_after_s=safety.get("staleAfterSeconds", int, 120, 5, 86400),
        ),
        suspend=root.get("suspend", bool, False),
        dry_run=root.get("dryRun", bool, False),
    )


def _checkpoint(raw: _Fields) -> CheckpointSource:
    given = [k for k in ("configMap", "path", "bundled") if k in raw.raw]
    if len(given) != 1:
        raise SpecError(
            "spec.checkpoint", "set exactly one checkpoint source: configMap, path or bundled"
        )
    kind = given[0]
    if kind == "configMap":
        cm = raw.sub("configMap")
        return CheckpointSource(kind, cm.get("name", str, ""), cm.get("key", str, "policy"))
    value = raw.get(kind, str, "")
    if kind == "path" and not value.startswith("/"):
        raise SpecError("spec.checkpoint.path", f"must be an absolute path, got {value!r}")
    if not value:
        raise SpecError(f"spec.checkpoint.{kind}", "must not be empty")
    return CheckpointSource(kind, value)
