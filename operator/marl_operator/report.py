"""What one control cycle of a RoutingPolicy did, in one value.

The cycle builds a :class:`CycleReport`; everything that tells people about it reads the same
value: the resource's status, the events, the operator's own Prometheus metrics and the JSON
decisions API. Keeping it plain data (JSON-compatible through :meth:`CycleReport.as_dict`)
is what lets those four stay consistent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

RouteTable = dict[str, dict[str, dict[str, int]]]
"""``service -> source edge node -> destination edge node -> integer weight``."""


class Outcome(StrEnum):
    """How a cycle ended, from best to worst."""

    APPLIED = "Applied"  # new weights written to the mesh
    UNCHANGED = "Unchanged"  # the decision equals what the mesh already carries
    DRY_RUN = "DryRun"  # decided, not written (spec.dryRun)
    HELD = "Held"  # the previous weights kept (metrics missing or stale, model untrusted)
    FALLBACK = "Fallback"  # the safety fallback written (failureThreshold cycles in a row)
    SUSPENDED = "Suspended"  # spec.suspend: nothing read, nothing written
    INVALID = "Invalid"  # the spec or the resources it names cannot be used


BUILD_FORBIDDEN = "forbidden: the policy cannot be built"
"""How the reason of a held cycle starts when the API server refused (403) a read the policy is
built from (its EdgeServices, the EdgeNodes, a ConfigMap checkpoint): no metrics were read and
nothing was written; ``forbidden`` says what to grant."""


CYCLE_FAILED = "cycle failed"
"""How the reason of a held cycle starts when something no handler expects went wrong (the API
server unreachable mid-cycle, or a bug): the error follows, and the operator's log has its
traceback. The next cycle tries again with the same controller."""


@dataclass(frozen=True)
class NodeInputs:
    """One edge node's readings for one service, as the decision used them."""

    offered_rps: float
    incoming_rps: float
    success: float | None
    mean_ms: float | None
    p95_ms: float | None
    capacity_rps: float  # requests of the services' mean work per second
    cpu_ms_per_request: float | None = None  # this service's, at this node, as measured


@dataclass(frozen=True)
class CycleReport:
    """One cycle of one RoutingPolicy (``policy`` is ``namespace/name``)."""

    policy: str
    time: float  # unix seconds when the cycle ended
    generation: int  # metadata.generation of the spec it ran
    outcome: Outcome
    reason: str  # one sentence for people: why this outcome
    weights: RouteTable = field(default_factory=dict)  # what the mesh carries after the cycle
    proposed: RouteTable | None = None  # the decision before the guard, when one was made
    fallback: str | None = None  # why rollout kept the base policy, or why the guard fell back
    changed_agents: tuple[str, ...] = ()  # agents ("node/service") rollout moved off the base
    predicted_p95_ms: dict[str, float] = field(default_factory=dict)  # service -> ms
    observed_p95_ms: dict[str, float] = field(default_factory=dict)  # service -> ms
    model: dict[str, Any] | None = None  # held-out accuracy (nmae, r2 per target, mesh)
    decision_ms: float = 0.0
    inputs: dict[str, dict[str, NodeInputs]] = field(default_factory=dict)  # service -> node
    forbidden: str | None = None  # a call the API server refused (403): what to grant
    checkpoint: dict[str, str] | None = None  # {"source", "sha256" of policy.pt} decided with
    mesh_objects: dict[str, tuple[str, ...]] = field(default_factory=dict)  # service -> Kind/name
    written: tuple[str, ...] = ()  # services whose mesh objects this cycle changed
    dry_run: bool = False  # spec.dryRun: nothing of this cycle was written, fallback included
    silent: dict[str, tuple[str, ...]] = field(default_factory=dict)  # service -> nodes no
    # request was reported from (counted as offering none)
    unmeasured: dict[str, tuple[str, ...]] = field(default_factory=dict)  # service -> nodes
    # that served requests no latency was reported for
    no_upstream: dict[str, dict[str, float]] = field(default_factory=dict)  # service ->
    # node -> requests/s its clients sent that found no ready endpoint (503 UH)
    links_over: dict[str, float] = field(default_factory=dict)  # "source/server" node ->
    # the mean ms the source's clients saw, below the link's declared one-way latency
    metrics_read: bool = True  # False: the cycle ended before it asked for the metrics
    unplaced: dict[str, dict[str, float]] = field(default_factory=dict)  # service ->
    # server workload -> requests/s it served that no edge node's label ends its name
    query_problems: dict[str, dict[str, str]] = field(default_factory=dict)  # service ->
    # query -> what its answer did wrong, so that its series were ignored
    catch_all: dict[str, dict[str, int]] | None = None  # service -> the weights of its
    # rule for clients on no edge node, as the mesh carries them; None: the mesh was not read
    failures: int | None = None  # cycles in a row without a usable decision (None: unknown)
    down: dict[str, str] | None = None  # edge node -> why it is down (its Kubernetes
    # nodes gone or not Ready), no route goes to it; None when the cycle did not ask
    liveness_unknown: str | None = None  # why whether nodes are up could not be read
    # service -> edge node that is up without a ready pod of it -> why; no route of the
    # service goes there; None when the cycle did not ask
    unserved: dict[str, dict[str, str]] | None = None
    # service -> why its pods could not be read (what was last read holds)
    pods_unknown: dict[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-compatible (enums as their values)."""
        out = dataclasses.asdict(self)
        out["outcome"] = self.outcome.value
        out["changed_agents"] = list(self.changed_agents)
        out["written"] = list(self.written)
        return out
