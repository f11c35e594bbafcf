"""A cycle report as the RoutingPolicy's status: phase, conditions, applied routes, decision.

Conditions follow ``metav1.Condition`` (type, status, reason, message, lastTransitionTime,
observedGeneration); a condition's transition time moves only when its status changes, so
``kubectl get`` shows how long a policy has been ready or falling back, not when it last ran.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from typing import Any

from marl_operator.report import BUILD_FORBIDDEN, CYCLE_FAILED, CycleReport, Outcome

PHASES = {
    Outcome.APPLIED: "Active",
    Outcome.UNCHANGED: "Active",
    Outcome.DRY_RUN: "DryRun",
    Outcome.HELD: "Holding",
    Outcome.FALLBACK: "Fallback",
    Outcome.SUSPENDED: "Suspended",
    Outcome.INVALID: "Failed",
}


def timestamp(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(kind: str, ok: bool | None, reason: str, message: str) -> dict[str, Any]:
    """``ok`` None: the status is Unknown."""
    return {
        "type": kind,
        "status": "Unknown" if ok is None else ("True" if ok else "False"),
        "reason": reason,
        "message": message[:1024],
    }


def conditions_of(
    report: CycleReport, previous: Sequence[Mapping[str, Any]] = ()
) -> list[dict[str, Any]]:
    """The seven conditions a report implies (without times), given the ``previous`` ones
    (a fallback written before stays True through cycles that write nothing: the mesh still
    carries it). A call the API server refused
    (403) makes WeightsApplied False with reason Forbidden, whatever the outcome: the message
    names the RBAC rule to grant. A cycle held because a read the policy is built from was
    refused read no metrics either: MetricsAvailable is Unknown (NotRead) then, not missing,
    as it is for a cycle held before it asked for them (every edge node down, say);
    after a cycle that failed unexpectedly it is Unknown too (CycleFailed), and so it is for
    a suspended or invalid policy, which reads nothing (Suspended, Invalid)."""
    o = report.outcome
    metrics_failed = o in (Outcome.HELD, Outcome.FALLBACK) and report.reason.startswith("metrics")
    unread = o == Outcome.HELD and report.reason.startswith(BUILD_FORBIDDEN)
    failed = o == Outcome.HELD and report.reason.startswith(CYCLE_FAILED)
    decided = o in (Outcome.APPLIED, Outcome.UNCHANGED, Outcome.DRY_RUN)
    written = o in (Outcome.APPLIED, Outcome.UNCHANGED)
    # Why no metrics were read this cycle, if none were: a suspended or invalid policy reads
    # nothing, which says nothing about whether they are there (Unknown, not False).
    not_read = (
        "CycleFailed"
        if failed
        else "NotRead"
        if unread or (o == Outcome.HELD and not report.metrics_read)
        else o.value
        if o in (Outcome.SUSPENDED, Outcome.INVALID)
        else None
    )
    return [
        _condition(
            "Ready",
            decided,
            o.value if not decided else "Deciding",
            report.reason,
        ),
        (
            _condition("MetricsAvailable", None, not_read, report.reason)
            if not_read
            else _condition(
                "MetricsAvailable",
                not metrics_failed,
                "MetricsMissing" if metrics_failed else "Read",
                report.reason if metrics_failed else _metrics_read(report),
            )
        ),
        (
            _condition("WeightsApplied", False, "Forbidden", report.forbidden)
            if report.forbidden
            else _condition(
                "WeightsApplied",
                written
                or (o == Outcome.FALLBACK and report.fallback != "hold" and not report.dry_run),
                "Written" if written else "DryRun" if report.dry_run else o.value,
                report.reason,
            )
        ),
        _fallback(report, decided, previous),
        _condition(
            "Suspended",
            o == Outcome.SUSPENDED,
            "SpecSuspend" if o == Outcome.SUSPENDED else "Running",
            "spec.suspend is true" if o == Outcome.SUSPENDED else "spec.suspend is false",
        ),
        _nodes_ready(report),
        _pods_ready(report),
    ]


def _fallback(
    report: CycleReport, decided: bool, previous: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Fallback: whether the mesh carries the safety fallback. A cycle that neither decided
    nor fell back (held, suspended, invalid) wrote no decision over a fallback in place."""
    o = report.outcome
    if o == Outcome.FALLBACK:
        return _condition("Fallback", True, "FailureThreshold", report.reason)
    if decided:
        return _condition("Fallback", False, "NotNeeded", "decisions are being made")
    fell = any(c.get("type") == "Fallback" and c.get("status") == "True" for c in previous)
    if fell:
        return _condition(
            "Fallback",
            True,
            "FallbackKept",
            f"the fallback written before is still in the mesh: the last cycle ended {o.value} "
            "and decided nothing",
        )
    return _condition(
        "Fallback", False, "NotNeeded", f"no fallback written: the last cycle ended {o.value}"
    )


def _nodes_ready(report: CycleReport) -> dict[str, Any]:
    """NodesReady: whether every edge node of the policy has a Ready Kubernetes node (Unknown
    when the cycle did not ask, or could not read them)."""
    down = "; ".join(f"{node}: {why}" for node, why in sorted((report.down or {}).items()))
    if report.liveness_unknown:
        known = f"; down all the same: {down}" if down else ""
        return _condition(
            "NodesReady",
            None,
            "Unreadable",
            f"whether the edge nodes are up is unknown, so every one is counted up: "
            f"{report.liveness_unknown}{known}",
        )
    if report.down is None:
        return _condition("NodesReady", None, "NotRead", "the last cycle did not read the nodes")
    if report.down:
        return _condition(
            "NodesReady", False, "NodesDown", f"no route goes to edge nodes that are down: {down}"
        )
    return _condition(
        "NodesReady", True, "Ready", "every edge node of the policy has a Ready Kubernetes node"
    )


def _pods_ready(report: CycleReport) -> dict[str, Any]:
    """PodsReady: whether every edge node that is up has a ready pod of each service (Unknown
    when the cycle did not ask, or could not read some service's pods)."""
    if report.unserved is None:
        return _condition("PodsReady", None, "NotRead", "the last cycle did not read the pods")
    reasons: dict[str, list[str]] = {}  # one long refusal, named once for all its services
    for service, why in sorted((report.pods_unknown or {}).items()):
        reasons.setdefault(why, []).append(service)
    unread = "; ".join(f"{', '.join(services)}: {why}" for why, services in reasons.items())
    unread = unread and (
        f"the pods of some services could not be read (what was last read of them holds; "
        f"never read, every edge node that is up counts as serving them): {unread}"
    )
    if report.unserved:
        gaps = "; ".join(
            f"{service} on {node}: {why}"
            for service, row in sorted(report.unserved.items())
            for node, why in sorted(row.items())
        )
        message = (
            f"edge nodes without a ready pod of a service, which get no route of it while "
            f"another can serve it: {gaps}"
        )
        return _condition(
            "PodsReady", False, "NoReadyPod", "; and ".join(filter(None, [message, unread]))
        )
    if unread:
        return _condition("PodsReady", None, "Unreadable", unread)
    return _condition(
        "PodsReady", True, "Ready", "every edge node that is up has a ready pod of each service"
    )


def merge_conditions(
    previous: Sequence[Mapping[str, Any]],
    current: Sequence[Mapping[str, Any]],
    when: str,
    generation: int,
) -> list[dict[str, Any]]:
    """``current`` with each condition's lastTransitionTime kept from ``previous`` unless its
    status changed."""
    before = {c.get("type"): c for c in previous or ()}
    out = []
    for cond in current:
        old = before.get(cond["type"])
        same = old is not None and old.get("status") == cond["status"]
        out.append(
            {
                **cond,
                "observedGeneration": generation,
                "lastTransitionTime": old.get("lastTransitionTime", when) if same else when,
            }
        )
    return out


def status_of(report: CycleReport, previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """The status patch for a report (``previous`` is the resource's current status)."""
    previous = previous or {}
    when = timestamp(report.time)
    # services is a list, so a merge patch replaces it whole: a service's lastAppliedTime is
    # carried over from the status until the next cycle that writes it (which may be a cycle
    # that failed after writing it, or one that wrote the other services and not this one).
    before = {s.get("name"): s for s in previous.get("services") or ()}
    services = []
    for name, rows in sorted(report.weights.items()):
        written = name in report.written
        last_applied = when if written else before.get(name, {}).get("lastAppliedTime")
        objects = report.mesh_objects.get(name) or before.get(name, {}).get("meshObjects")
        catch_all = (  # kept from the status only by a cycle that did not read the mesh
            report.catch_all.get(name)
            if report.catch_all is not None
            else before.get(name, {}).get("defaultWeights")
        )
        services.append(
            {
                "name": name,
                "routes": [
                    {"sourceNode": source, "weights": dict(row)}
                    for source, row in sorted(rows.items())
                ],
                **({"meshObjects": list(objects)} if objects else {}),
                **({"defaultWeights": dict(catch_all)} if catch_all else {}),
                **({"lastAppliedTime": last_applied} if last_applied else {}),
            }
        )
    if not report.weights:
        # A cycle that read no routes (the spec turned invalid) changed none: the mesh still
        # carries what the status said, and the policy's deletion must still find it.
        services = list(previous.get("services") or ())
    r2 = [
        v for v in (report.model or {}).get("r2", {}).values() if v is not None and math.isfinite(v)
    ]
    # lastDecision is an object, merged key by key: a figure this cycle has none of is sent
    # as None, which removes the last cycle's instead of leaving it beside this message.
    decision: dict[str, Any] = {
        "time": when,
        "action": _action(report),
        "decisionMs": round(report.decision_ms, 3),
        "message": report.reason[:1024],
        "predictedLatencyMs": (
            _mean(report.predicted_p95_ms.values()) if report.predicted_p95_ms else None
        ),
        "observedLatencyMs": (
            _mean(report.observed_p95_ms.values()) if report.observed_p95_ms else None
        ),
        "modelAccuracy": min(1.0, min(r2)) if r2 else None,
    }
    out = {
        "phase": PHASES[report.outcome],
        "observedGeneration": report.generation,
        # None (no policy was ever built, or the spec is invalid) removes a stale one: merge patch
        "checkpoint": report.checkpoint,
        "services": services,
        "lastDecision": decision,
        "conditions": merge_conditions(
            previous.get("conditions") or [],
            conditions_of(report, previous.get("conditions") or ()),
            when,
            report.generation,
        ),
    }
    if report.failures is not None:  # unknown (no controller counted): the stored count holds
        out["consecutiveFailures"] = report.failures
    return out


def _metrics_read(report: CycleReport) -> str:
    """What the cycle read, naming the nodes whose clients reported no request and those
    whose requests came without a latency."""
    if not (
        report.silent
        or report.unmeasured
        or report.no_upstream
        or report.unplaced
        or report.links_over
        or report.query_problems
    ):
        return "the last cycle read every service's metrics"
    gaps = []
    if report.query_problems:
        gaps.append(
            "queries were answered in a way that had their series ignored ("
            + "; ".join(
                f"{service}: {problem}"
                for service, problems in sorted(report.query_problems.items())
                for problem in problems.values()
            )
            + ")"
        )
    if report.silent:
        gaps.append(
            f"no request was reported from the clients of ({_by_service(report.silent)}): "
            "counted as offering none (no clients there, or their proxies unscraped)"
        )
    if report.unmeasured:
        gaps.append(
            f"no latency was reported for the requests served by "
            f"({_by_service(report.unmeasured)}): left out of the system model's data"
        )
    if report.no_upstream:
        gaps.append(
            f"clients got 503 with no upstream ({_rates(report.no_upstream)}): a route's "
            "subset had no ready pod (routed around from the next cycle: see PodsReady)"
        )
    if report.unplaced:
        gaps.append(
            f"requests were served by workloads whose names end in no edge node's pod label "
            f"({_rates(report.unplaced)}): left out of every node's load, latency and CPU "
            "(name each node's Deployment <name>-<label>)"
        )
    if report.links_over:
        links = ", ".join(
            f"{pair.replace('/', ' to ')} {ms:.1f} ms"
            for pair, ms in sorted(report.links_over.items())
        )
        gaps.append(
            f"clients saw less latency than their link's declared one-way latency ({links}): "
            "check the EdgeNodes' spec.neighbours[].latencyMs (one way, not the round trip)"
        )
    return f"the last cycle read the metrics, but {'; and '.join(gaps)}"


def _by_service(nodes: Mapping[str, Sequence[str]]) -> str:
    return "; ".join(f"{service}: {', '.join(names)}" for service, names in nodes.items())


def _rates(by_service: Mapping[str, Mapping[str, float]]) -> str:
    """``service: name 1.0/s, ...; ...`` of requests per second by service and node or
    workload."""
    return "; ".join(
        f"{service}: " + ", ".join(f"{name} {rps:.1f}/s" for name, rps in sorted(row.items()))
        for service, row in sorted(by_service.items())
    )


def _action(report: CycleReport) -> str:
    if report.outcome in (Outcome.HELD, Outcome.SUSPENDED, Outcome.INVALID):
        return "hold"
    if report.outcome == Outcome.FALLBACK:
        return "fallback"
    return "candidate" if report.changed_agents else "base"


def _mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 3)
