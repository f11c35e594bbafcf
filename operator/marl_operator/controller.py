"""One RoutingPolicy's control cycle: metrics -> telemetry -> model -> rollout -> guard -> mesh.

Nothing here talks to Kubernetes or Prometheus directly: the reader and the mesh client are
passed in, so the cycle runs the same under kopf, in the tests and in the benchmark. The kopf
handlers only build a :class:`PolicyController` per resource and call :meth:`cycle` on a timer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection, Mapping
from typing import Protocol

import numpy as np

from marl_operator.guard import (
    FailureCounter,
    evacuate,
    fallback_table,
    limit_table,
    up_routes,
)
from marl_operator.liveness import Liveness
from marl_operator.mesh.model import MeshError, MeshNode, MeshRoutes, MeshService
from marl_operator.mesh.naming import destination_names, destination_namespace
from marl_operator.mesh.routing import as_percentages, build_routes, integer_weights
from marl_operator.observer import InsufficientData, Observer, node_of
from marl_operator.problem import MeshProblem
from marl_operator.prometheus import MetricsUnavailable, QueryError, ServiceReadings
from marl_operator.report import CycleReport, Outcome, RouteTable
from marl_operator.spec import PolicySpec
from policies.adaptation import Adapter
from policies.model_env import RAMP_FROM_UTILISATION, SAFE_UTILISATION, ModelEnv
from policies.rollout import Decision, Policy, RolloutSettings
from policies.system_model import SystemModel

DEFAULT_REJECT_PENALTY = 4.0
"""Cost of a lost request in latency targets, as in the generic training scenarios."""


class MetricsSource(Protocol):
    def read(
        self,
        *,
        namespace: str,
        service: str,
        host: str,
        window: str,
        overrides: Mapping[str, str] | None = None,
        destinations: str = "",
    ) -> ServiceReadings: ...


class MeshClient(Protocol):
    """Reads and writes one service's routes in the cluster."""

    def read(self, service: MeshService, nodes: tuple[MeshNode, ...]) -> MeshRoutes | None:
        """The routes the live objects carry, or None when there are none yet."""
        ...

    def write(self, service: MeshService, routes: MeshRoutes) -> bool:
        """Bring the objects to ``routes``; True if anything was changed."""
        ...


def decision_table(
    problem: MeshProblem, weights: np.ndarray, min_weight: int, alive: Liveness | None = None
) -> RouteTable:
    """Integer mesh weights from a policy action ``(A, K+2)`` ([local, neighbours, reject]).

    A mesh cannot reject, so the reject share is spread over the node's routes in proportion
    (a node the policy wanted to shed load from still serves it, as it would without the
    operator); every route of the node and its neighbours is listed so ``minWeight`` applies,
    but for routes to nodes that cannot serve the service (``alive``: down, or without a
    ready pod of it; unless none can: a row needs a route).
    """
    alive = alive or Liveness()
    topo = problem.topology
    s = topo.num_services
    table: RouteTable = {service: {} for service in topo.services}
    for agent, row in enumerate(np.asarray(weights, dtype=float)):
        node, service = topo.nodes[agent // s], topo.services[agent % s]
        neighbours = problem.neighbours_of(node)
        fractions = {node: row[0]} | {nb: row[1 + m] for m, nb in enumerate(neighbours)}
        if not all(np.isfinite(v) and v >= 0 for v in fractions.values()):
            raise ValueError(f"the decision for {node}/{service} is not a distribution: {row}")
        routes = up_routes(problem, node, alive.cannot_serve(service))
        fractions = {n: fractions[n] for n in routes}
        if sum(fractions.values()) <= 0:
            fractions = {n: float(n == node) for n in fractions}
        table[service][node] = integer_weights(fractions, min_weight=min_weight)
    return table


def table_weights(problem: MeshProblem, table: RouteTable) -> np.ndarray:
    """The policy action ``(A, K+2)`` a route table carries (the inverse of
    :func:`decision_table` up to rounding): each source node's share to itself and to each
    neighbour, none rejected. Routes to other nodes are left out and the rest renormalised; a
    node with none of its own routes keeps everything local."""
    topo = problem.topology
    s = topo.num_services
    weights = np.zeros((topo.num_agents, topo.max_degree + 2))
    for agent in range(topo.num_agents):
        node, service = topo.nodes[agent // s], topo.services[agent % s]
        row = table.get(service, {}).get(node, {})
        targets = [node, *problem.neighbours_of(node)]
        shares = np.array([float(row.get(target, 0)) for target in targets])
        if shares.sum() <= 0:
            shares[0] = 1.0
        weights[agent, : len(targets)] = shares / shares.sum()
    return weights


def even_table(problem: MeshProblem) -> RouteTable:
    """What a plain Kubernetes Service does without route objects: every node equally."""
    names = problem.topology.nodes
    row = integer_weights(dict.fromkeys(names, 1.0))
    return {
        service: {source: dict(row) for source in names} for service in problem.topology.services
    }


class UnwrittenServices(MeshError):
    """The services whose write failed (``failed``: service -> error) in a write that went on
    to the others (``written``); the message names both."""

    def __init__(self, failed: Mapping[str, MeshError], written: Collection[str]):
        by_message: dict[str, list[str]] = {}
        for service, error in failed.items():
            by_message.setdefault(str(error), []).append(service)
        text = "; ".join(f"{', '.join(names)}: {message}" for message, names in by_message.items())
        if written:
            text += f" (written all the same: {', '.join(written)})"
        super().__init__(text)


class PolicyController:
    """The live state of one RoutingPolicy: its model, its failure count, its last report."""

    def __init__(
        self,
        key: str,
        spec: PolicySpec,
        generation: int,
        problem: MeshProblem,
        policy: Policy,
        reader: MetricsSource,
        mesh: MeshClient,
        *,
        meta: Mapping | None = None,
        clock: Callable[[], float] = time.time,
        seed: int = 0,
        checkpoint: Mapping[str, str] | None = None,
        built_from: str = "",
        liveness: Callable[[], Liveness] | None = None,
    ):
        self.key, self.spec, self.generation = key, spec, generation
        # Which of the policy's nodes are down, asked at every cycle (every node is up without)
        self.liveness = liveness or Liveness
        # What of the EdgeNodes and EdgeServices it was built from (inventory.fingerprint):
        # the runtime builds it again when that changes.
        self.built_from = built_from
        self.checkpoint = dict(checkpoint) if checkpoint is not None else None
        self.namespace = key.split("/", 1)[0]
        self.problem, self.reader, self.mesh, self.clock = problem, reader, mesh, clock
        # Service -> objects an earlier build wrote its routes to and this one does not (an
        # EdgeService's mesh names changed): the runtime gives them back once this build has
        # written the service's own (:attr:`synced`), so routes never name what is gone.
        self.releasing: dict[str, list[tuple[str, str]]] = {}
        self.synced: set[str] = set()  # services whose objects the running cycle wrote
        meta = meta or {}
        step = float(meta.get("step_seconds", 1.0))
        env = ModelEnv(
            problem.topology,
            work=np.ones(problem.topology.num_services),
            target_ms=problem.target_ms,
            reject_penalty=float(meta.get("reject_penalty", DEFAULT_REJECT_PENALTY)),
            step_seconds=step,
            can_reject=False,
            max_utilisation=SAFE_UTILISATION,
            ramp_from=RAMP_FROM_UTILISATION,
        )
        settings = RolloutSettings(
            horizon=spec.rollout.horizon,
            steps=spec.rollout.steps,
            margin=spec.rollout.margin,
            seed=seed,
        )
        self.adapter = Adapter(
            env,
            policy,
            SystemModel(interval_s=spec.interval_s, seed=seed),
            settings,
            interval_seconds=spec.interval_s,
            prior=True,
            reuse_tolerance=spec.rollout.reuse_tolerance,
        )
        self.observer = Observer(problem, step_seconds=step)
        self.failures = FailureCounter(spec.safety)
        self.last: CycleReport | None = None
        self._written: set[str] = set()  # services whose objects the running cycle changed
        self._asked = False  # whether the running cycle asked for the metrics
        self._observed = False  # and made the interval's telemetry of them
        self._unread: dict[str, str] = {}  # services whose live routes the cycle could not read
        self._catch_all: dict[str, dict[str, int]] = {}  # service -> its catch-all rule, as
        # the mesh carries it (read, then written), in percent
        self._alive: Liveness | None = None  # the running cycle's, once read
        self._known_down: dict[str, str] = {}  # as the liveness source last said
        self._known_unserved: dict[str, dict[str, str]] = {}  # likewise, per service
        self._down_seen: dict[str, float] = {}  # node -> when it was last known to be down
        # (service, node) -> when the node, up, was last known to have no ready pod of it
        self._unserved_seen: dict[tuple[str, str], float] = {}

    @property
    def mesh_objects(self) -> dict[str, tuple[str, ...]]:
        """What each service's routes live in, as Kind/name, those still to be given back
        included: the status keeps it, so that the policy's deletion, or its next build after
        a restart, finds them even when the policy can no longer be built."""
        return {
            service: tuple(
                f"{kind}/{name}" for kind, name in (*objects, *self.releasing.get(service, ()))
            )
            for service, objects in self.problem.mesh_objects.items()
        }

    # -- the cycle --------------------------------------------------------------------------

    def cycle(self) -> CycleReport:
        """Run one interval and return what happened (never raises for metrics or mesh
        trouble: those become the report's outcome)."""
        self._written, self.synced = set(), set()
        self._alive = None
        self._asked = self._observed = False
        if self.spec.suspend:
            return self._report(Outcome.SUSPENDED, "spec.suspend is true", self._live())
        live = self._live()
        nodes = self.problem.topology.nodes
        self._alive = self._ask_liveness()
        down = self._down
        if len(down) == len(nodes):
            return self._hold("no edge node of the policy is up, so no route could serve", live)
        nowhere = [
            s for s in self.problem.topology.services if self._alive.cannot_serve(s) >= set(nodes)
        ]
        if nowhere:
            # Its clients' requests all fail wherever they go, so they say nothing of the
            # routing: no decision is made on them, and no failure is counted.
            return self._hold(
                f"{', '.join(nowhere)} has no ready pod on any edge node of the policy, so no "
                "route could serve it (see PodsReady)",
                live,
            )
        self._asked = True
        try:
            readings = self._read()
            telemetry = self.observer.telemetry(readings, np.isin(nodes, list(down)))
        except (MetricsUnavailable, InsufficientData) as error:
            return self._failed(f"metrics: {error}", live)
        self._observed = True
        self.adapter.observe(telemetry)
        # What the mesh carries but for the routes that fail: where the decision starts
        # from, and what the guard steps from.
        serving = evacuate(live, self.problem, self._alive)
        decision = self._decide(serving)
        safety = self.spec.safety
        try:
            proposed = decision_table(
                self.problem, decision.weights, safety.min_weight, self._alive
            )
        except ValueError as error:
            return self._failed(f"inconsistent decision: {error}", live)
        limited = limit_table(serving, proposed, safety.max_weight_change, safety.min_weight_change)
        extra = dict(
            proposed=proposed,
            fallback=decision.fallback,
            changed_agents=self._agent_names(decision.changed_agents),
            predicted_p95_ms=self._predicted_p95(decision),
            observed_p95_ms=self.observer.observed_p95_ms,
            decision_ms=decision.decision_ms,
        )
        if self.spec.dry_run:
            self.failures.succeeded()
            return self._report(Outcome.DRY_RUN, "spec.dryRun: decided, not written", live, **extra)
        try:
            changed = self._write(limited, live)
        except MeshError as error:
            return self._failed(f"mesh: {error}", live)
        self.failures.succeeded()  # a failed write is a failed interval, as a failed read is
        outcome = Outcome.APPLIED if changed else Outcome.UNCHANGED
        if decision.fallback is not None:
            reason = f"base policy applied ({decision.fallback})"
        elif decision.reused:
            kept = self.adapter.kept_intervals
            reason = (
                f"previous rollout decision kept for {kept} interval{'s' if kept > 1 else ''}: "
                f"its predicted gain and the base routing moved less than "
                f"{self.spec.rollout.reuse_tolerance:.0%} (decided on: "
                f"{self.adapter.model_source})"
            )
        else:
            reason = f"rollout decision applied (model: {self.adapter.model_source})"
        return self._report(outcome, reason + self._no_route(), limited, **extra)

    def hold_invalid(
        self,
        reason: str,
        move: bool = True,
        gone_nodes: Collection[str] = (),
        gone_services: Collection[str] = (),
    ) -> CycleReport:
        """A cycle of this, the policy's last good build, while its spec or what the spec
        names no longer builds (``reason``): the weights in place hold, but routes still
        leave nodes that cannot serve (and ``gone_nodes``, whose EdgeNodes were deleted), as
        in any held cycle, unless this spec or the new one says hands off (``move`` False).
        Services in ``gone_services`` (their EdgeService deleted) are not written. Dropping
        the controller instead left a node that fails meanwhile with its share of the
        traffic until someone fixed an unrelated edit."""
        self._written, self.synced = set(), set()
        self._asked = self._observed = False
        live = self._live()
        kept = f"{reason}; its last valid spec holds the weights"
        if self.spec.suspend or not move:
            return self._report(Outcome.INVALID, kept, live)
        alive = self._ask_liveness()
        gone = {name: "its EdgeNode was deleted" for name in gone_nodes}
        self._alive = dataclasses.replace(alive, down={**alive.down, **gone})
        return self._hold(kept, live, Outcome.INVALID, leave=gone_services)

    def _ask_liveness(self) -> Liveness:
        """This cycle's nodes that are down, and nodes without a ready pod of a service, as
        the liveness source says; where it cannot say, as it last said (a node known not to
        serve stays so until known to serve)."""
        alive = self.liveness()
        nodes, services = self.problem.topology.nodes, self.problem.topology.services
        if alive.unknown is None:
            self._known_down = {n: why for n, why in alive.down.items() if n in nodes}
        for service in services:
            if service not in alive.pods_unknown:
                said = alive.unserved.get(service, {})
                self._known_unserved[service] = {n: w for n, w in said.items() if n in nodes}
        unserved = {
            service: {n: w for n, w in row.items() if n not in self._known_down}
            for service, row in self._known_unserved.items()
            if service in services
        }
        now = self.clock()
        self._down_seen |= dict.fromkeys(self._known_down, now)
        self._unserved_seen |= {(s, n): now for s, row in unserved.items() for n in row}
        return Liveness(
            self._known_down,
            alive.unknown,
            {service: row for service, row in unserved.items() if row},
            {s: why for s, why in alive.pods_unknown.items() if s in services},
        )

    def _read(self) -> dict[str, ServiceReadings]:
        """Every service's readings; stale ones hold the cycle, but for series that stopped
        with a node that is down (its clients' and its pods'), or with a service's pods on a
        node without a ready one (those pods' alone: the node's clients go on), now or
        within ``staleAfterSeconds``: that long they take to be current again once back."""
        prom = self.spec.prometheus
        labels = self.observer.labels
        since = self.clock() - self.spec.safety.stale_after_s
        index = {n.name: labels[n.label] for n in self.problem.nodes}
        gone = {index[n] for n, seen in self._down_seen.items() if seen >= since}
        out = {}
        for service in self.problem.services:
            unserved = {
                index[n]
                for (s, n), seen in self._unserved_seen.items()
                if s == service.name and seen >= since
            }

            def expected(pair: tuple[str, str], unserved: set[int] = unserved) -> bool:
                source, server = (node_of(workload, labels) for workload in pair)
                return source in gone or server in gone or server in unserved

            try:
                readings = self.reader.read(
                    namespace=destination_namespace(service),
                    service=service.name,
                    host=service.host,
                    window=prom.window,
                    overrides=prom.queries,
                    destinations="|".join(destination_names(service, self.problem.nodes)),
                )
            except QueryError as error:  # a template problem is a spec problem, not an outage
                raise MetricsUnavailable(str(error)) from error
            limit = self.spec.safety.stale_after_s
            out[service.name] = fresh = readings.fresh(limit)
            stale = sorted(p for p in set(readings.rate) - set(fresh.rate) if not expected(p))
            if stale:
                # Left out, a stale client would read as one offering nothing: the weights
                # would follow a load that is not there. Held instead, until it is fresh
                # again or gone from the window altogether.
                ages = [readings.age_s[pair] for pair in stale if pair in readings.age_s]
                old = [age for age in ages if age > 0]
                why = (
                    f"the newest sample is {min(old):.0f} s old"
                    if old
                    else f"the newest sample is {-max(ages):.0f} s ahead of Prometheus's clock "
                    "(the clock of the Prometheus that scraped it is ahead, or "
                    "spec.prometheus.queries.sampleAge has the wrong sign)"
                    if ages
                    # a template's mistake, when there is one, before a scrape's
                    else readings.problems.get("sampleAge")
                    or "no sample is current (their targets stopped answering scrapes)"
                )
                clients = ", ".join(sorted({source for source, _ in stale})[:3])
                raise MetricsUnavailable(
                    f"{service.name}'s metrics are stale for {len(stale)} of "
                    f"{len(readings.rate)} client/server pairs ({clients}): {why}; "
                    f"spec.safety.staleAfterSeconds is {limit}"
                )
        return out

    def _decide(self, live: RouteTable) -> Decision:
        adapter = self.adapter
        if not self.spec.rollout.enabled:
            return adapter.rollout.decide(adapter.state(), None, fallback="rollout disabled")
        # The routing in place, not this process's last decision: the guard may have written
        # less of it, and after a restart it is all there is to build on.
        return adapter.decide(applied=table_weights(self.problem, live))

    def _failed(self, reason: str, live: RouteTable) -> CycleReport:
        if not self.failures.failed():
            left = self.spec.safety.failure_threshold - self.failures.count
            return self._hold(f"{reason}; weights held ({left} more before the fallback)", live)
        kind = self.spec.safety.fallback
        table = fallback_table(kind, self.problem, self.spec.safety.min_weight, self._alive)
        if table is None:
            held = f"{reason}; {self.failures.count} failed intervals in a row, fallback {kind}"
            return self._hold(held, live, Outcome.FALLBACK, fallback=kind)
        if not self.spec.dry_run:
            try:
                self._write(table, live)
            except MeshError as error:
                # The weights in place hold where it failed (the error names the services
                # written all the same), and the report says so.
                return self._report(
                    Outcome.HELD,
                    f"{reason}; writing the {kind} fallback failed ({error}): weights held "
                    "where it failed",
                    live,
                )
        unwritten = " (spec.dryRun: not written)" if self.spec.dry_run else ""
        return self._report(
            Outcome.FALLBACK,
            f"{reason}; {self.failures.count} failed intervals in a row, fallback {kind}"
            f"{unwritten}",
            live,
            fallback=kind,
        )

    def _hold(
        self,
        reason: str,
        live: RouteTable,
        outcome: Outcome = Outcome.HELD,
        leave: Collection[str] = (),
        **extra,
    ) -> CycleReport:
        """Keep the weights in place, but for routes to nodes that cannot serve: those are
        moved to the source's other routes at once (no decision is needed to know they fail).
        A service whose routes could not be read is left alone: its table is a guess; so are
        the services in ``leave``."""
        moved = evacuate(live, self.problem, self._liveness_now)
        skip = set(self._unread) | set(leave)
        changed = {s for s, rows in moved.items() if rows != live[s] and s not in skip}
        if not changed:
            return self._report(outcome, reason, live, **extra)
        where = self._cannot_serve(changed)
        if self.spec.dry_run:
            why = f"{reason}; routes to {where} not moved (spec.dryRun)"
            return self._report(outcome, why, live, **extra)
        try:
            self._write(moved, live, only=changed)
        except MeshError as error:
            why = f"{reason}; moving routes off {where} failed: {error}"
            return self._report(outcome, why, live, **extra)
        why = f"{reason}, but for routes to {where}: moved"
        return self._report(outcome, why, live, **extra)

    @property
    def _liveness_now(self) -> Liveness:
        return self._alive if self._alive is not None else Liveness()

    @property
    def _down(self) -> Mapping[str, str]:
        return self._liveness_now.down

    def _cannot_serve(self, services: Collection[str]) -> str:
        """The nodes routes of ``services`` cannot go to, in words: ``nodes that are down
        (edge-1) or without a ready pod (edge-2 for fn)``."""
        alive = self._liveness_now
        pairs = [
            f"{node} for {service}"
            for service in sorted(services)
            for node in sorted(alive.unserved.get(service, {}))
        ]
        parts = [f"that are down ({', '.join(sorted(alive.down))})"] if alive.down else []
        parts += [f"without a ready pod ({', '.join(pairs)})"] if pairs else []
        return f"nodes {' or '.join(parts)}"

    def _down_for_report(self) -> dict[str, str] | None:
        """The nodes that are down, and why; with the nodes the spec lists that do not exist
        (known whether or not the cycle asked about the others)."""
        missing = {
            name: f"no EdgeNode {name} (listed in spec.nodes.names): create it or remove it"
            for name in self.problem.missing
        }
        if self._alive is None:
            return missing or None
        return {**self._alive.down, **missing}

    def _no_route(self) -> str:
        """What a cycle's reason adds when some routes cannot go where they would."""
        alive, said = self._liveness_now, ""
        if alive.down:
            said += f"; no route to {', '.join(sorted(alive.down))}: down (see NodesReady)"
        pairs = [
            f"{node} for {service}"
            for service, row in sorted(alive.unserved.items())
            for node in sorted(row)
        ]
        if pairs:
            said += f"; no route to {', '.join(pairs)}: no ready pod (see PodsReady)"
        return said

    # -- the mesh -----------------------------------------------------------------------------

    def _live(self) -> RouteTable:
        """What the mesh carries now, in percent of each source's traffic; an absent object
        counts as the even split, and so does one that cannot be read (edited beyond
        recognition): the next write replaces it whole, and the report says its steps were
        taken from a guess (:attr:`_unread`). A route to an EdgeNode the policy no longer
        governs reads as gone (``MeshWriter.read``): the rest of its row steps from what it
        carries. The clients of a node without a rule of their own (one that just joined the
        policy) get the catch-all rule, and so step from it."""
        table = even_table(self.problem)
        self._unread, self._catch_all = {}, {}
        for service in self.problem.services:
            try:
                routes = self.mesh.read(service, self.problem.nodes)
            except MeshError as error:
                routes, self._unread[service.name] = None, str(error)
            if routes is not None:
                followed = as_percentages(routes.default) if routes.default else None
                table[service.name] = {
                    src: as_percentages(routes.by_source[src])
                    if src in routes.by_source
                    else dict(followed or even)
                    for src, even in table[service.name].items()
                }
                self._catch_all[service.name] = followed or {}
        return table

    def _write(
        self, table: RouteTable, live: RouteTable, only: Collection[str] | None = None
    ) -> bool:
        """Write ``table`` service by service (those named in ``only``, if given), keeping
        ``live`` what the mesh carries and ``_written`` which services' objects changed.
        A service whose write fails does not stop the others (one EdgeService's broken
        object must not keep another's traffic on a node that is down): they are written,
        and then :class:`UnwrittenServices` names what failed. Clients on no edge node are not
        sent to nodes that are down either."""
        changed, failed, written = False, {}, []
        for service in self.problem.services:
            if only is not None and service.name not in only:
                continue
            down = self._liveness_now.cannot_serve(service.name)
            routes = build_routes(table[service.name], self.problem.nodes, down=down)
            try:
                if self.mesh.write(service, routes):
                    changed = True
                    self._written.add(service.name)
            except MeshError as error:
                failed[service.name] = error
                continue
            written.append(service.name)
            self.synced.add(service.name)
            self._catch_all[service.name] = dict(routes.default)  # once written, not before
            live[service.name] = table[service.name]
        if failed:
            raise UnwrittenServices(failed, written)
        return changed

    # -- reporting ----------------------------------------------------------------------------

    def _agent_names(self, agents: tuple[int, ...]) -> tuple[str, ...]:
        topo = self.problem.topology
        s = topo.num_services
        return tuple(f"{topo.nodes[a // s]}/{topo.services[a % s]}" for a in agents)

    def _predicted_p95(self, decision: Decision) -> dict[str, float]:
        """Server-side p95 the model expects under the decision, per service (rate-weighted
        over nodes), by the model the decision was made on."""
        adapter = self.adapter
        if decision.fallback is not None or adapter.table is None:
            return {}
        state = adapter.state()
        pred = adapter.env.step(state, decision.weights[None], adapter.table)
        load = np.asarray(adapter.last.incoming) if adapter.last is not None else None
        out = {}
        for k, service in enumerate(self.problem.topology.services):
            p95, w = pred.p95_ms[0, :, k], load[:, k] if load is not None else None
            ok = np.isfinite(p95) & (w > 0)
            if ok.any():
                out[service] = float((p95[ok] * w[ok]).sum() / w[ok].sum())
        return out

    def _report(self, outcome: Outcome, reason: str, weights: RouteTable, **extra) -> CycleReport:
        accuracy = self.adapter.model.accuracy()
        for service, error in sorted(self._unread.items()):
            reason += (
                f"; {service}'s routes could not be read ({error}): stepped from an even split"
            )
        report = CycleReport(
            policy=self.key,
            time=self.clock(),
            generation=self.generation,
            outcome=outcome,
            reason=reason,
            weights=weights,
            model=accuracy.as_dict() if accuracy is not None else None,
            # what this cycle's metrics said, not what the last read's did
            inputs=dict(self.observer.inputs) if self._observed else {},
            checkpoint=self.checkpoint,
            mesh_objects=self.mesh_objects,
            written=tuple(sorted(self._written)),
            dry_run=self.spec.dry_run,
            silent=dict(self.observer.silent) if self._observed else {},
            unmeasured=dict(self.observer.unmeasured) if self._observed else {},
            no_upstream=dict(self.observer.no_upstream) if self._observed else {},
            unplaced=dict(self.observer.unplaced) if self._observed else {},
            query_problems=dict(self.observer.query_problems) if self._observed else {},
            links_over=dict(self.observer.links_over) if self._observed else {},
            metrics_read=self._asked,
            catch_all=dict(self._catch_all),
            failures=self.failures.count,
            down=self._down_for_report(),
            liveness_unknown=self._alive.unknown if self._alive is not None else None,
            unserved=(
                {s: dict(row) for s, row in self._alive.unserved.items()}
                if self._alive is not None
                else None
            ),
            pods_unknown=dict(self._alive.pods_unknown) if self._alive is not None else None,
            **extra,
        )
        self.last = report
        return report
