"""The operator's live state across RoutingPolicies, independent of kopf.

A :class:`Runtime` owns one :class:`~marl_operator.controller.PolicyController` per policy,
rebuilds it when the spec's generation changes, turns unusable specs into an ``Invalid``
report (never into a write), and hands every report to the store and the instruments. The
kopf handlers call :meth:`Runtime.cycle` and :meth:`Runtime.delete`; tests and the benchmark
call them directly.

Cycles of different policies run in parallel (the handlers' worker threads), two cycles of one
policy never: a cycle that finds the policy's previous one still running (its daemon was
stopped and started again meanwhile, say, by a peering pause and resume) is skipped, counted
and logged, not queued. A mesh call the API server refuses (403) is recorded per cycle and
ends up in the report (``forbidden``), hence in the status and the events; so does a refused
read of what a policy is built from (its EdgeServices, the EdgeNodes, a ConfigMap checkpoint):
that cycle holds the weights without reading or writing the mesh, and the next one builds
again, so granting the rule is enough.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import urllib3
from kubernetes.client.rest import ApiException

from marl_operator.claims import conflict
from marl_operator.controller import MeshClient, MetricsSource, PolicyController
from marl_operator.instruments import Instruments
from marl_operator.inventory import Inventory, fingerprint
from marl_operator.kube import KINDS, Forbidden, Kube, KubeMesh, PodsUnreadable
from marl_operator.liveness import Liveness, edge_node_status, liveness, unserved, why_unready
from marl_operator.mesh.model import (
    MeshError,
    MeshNode,
    MeshRoutes,
    MeshService,
    RestoreIncomplete,
)
from marl_operator.mesh.naming import destination_names, destination_namespace
from marl_operator.problem import build_problem
from marl_operator.prometheus import PrometheusAccess, PrometheusReader, Silence, redact_url
from marl_operator.report import BUILD_FORBIDDEN, CYCLE_FAILED, CycleReport, Outcome
from marl_operator.spec import CheckpointSource, PolicySpec, SpecError, parse_policy_spec
from marl_operator.status import merge_conditions, timestamp
from marl_operator.store import ReportStore
from policies import checkpoint
from policies.checkpoint import CheckpointError, LoadedPolicy

log = logging.getLogger(__name__)

DEFAULT_PROMETHEUS_URL = "http://prometheus.istio-system.svc:9090"
"""Where Istio's Prometheus add-on listens; policies without ``spec.prometheus.url`` use the
operator's ``--prometheus-url``, which defaults to this."""

DELETE_WAIT_S = 120.0
"""How long restoring a deleted policy's routes waits for its running cycle to end."""


class RefusalRecorder:
    """The runtime's mesh client as one controller sees it: the same calls, and the refusals
    (403, :class:`~marl_operator.kube.Forbidden`) of the cycle running, by service, for its
    report. A later successful write of the service clears its refusal. Once ``closed`` (the
    policy deleted, or left to a peer, while a cycle of it still ran), writes are refused, so
    that the late cycle cannot take the routes over again from whoever has them now."""

    def __init__(self, mesh: MeshClient):
        self.mesh = mesh
        self.refused: dict[str, Forbidden] = {}
        self.closed = False

    def read(self, service: MeshService, nodes: tuple[MeshNode, ...]) -> MeshRoutes | None:
        try:
            return self.mesh.read(service, nodes)
        except Forbidden as error:
            self.refused[service.name] = error
            raise

    def write(self, service: MeshService, routes: MeshRoutes) -> bool:
        if self.closed:
            raise MeshError("the policy was deleted or left to a peer: its routes are not ours")
        try:
            changed = self.mesh.write(service, routes)
        except Forbidden as error:
            self.refused[service.name] = error
            raise
        self.refused.pop(service.name, None)
        return changed


def status_objects(body: Mapping[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """Service -> the mesh objects (kind, name) a policy's status says its routes live in;
    only kinds the operator writes (the status is anyone's to edit who may patch it)."""
    return {
        str(entry.get("name")): [
            (kind, name)
            for kind, _, name in (str(o).partition("/") for o in entry.get("meshObjects") or ())
            if kind in KINDS and name
        ]
        for entry in (body.get("status") or {}).get("services") or ()
    }


def written_before(
    controller: PolicyController | None, body: Mapping[str, Any]
) -> dict[str, list[tuple[str, str]]]:
    """Service -> the mesh objects the policy wrote before a build: its controller's, where
    this process still has it, or else what its status names (after a restart, an invalid
    spec or a stand-down, the controller is gone but the status still lists them)."""
    if controller is not None:
        return {
            s: [*objects, *controller.releasing.get(s, ())]
            for s, objects in controller.problem.mesh_objects.items()
        }
    return status_objects(body)


def failures_before(controller: PolicyController | None, body: Mapping[str, Any]) -> int:
    """How many intervals in a row had failed before a build: its controller's count, where
    this process still has it, or else what the status says (after a restart or a
    stand-down). An outage goes on through an edit of the spec or a restart, and counting
    again from zero would put off the fallback by ``failureThreshold`` intervals."""
    if controller is not None:
        return controller.failures.count
    count = (body.get("status") or {}).get("consecutiveFailures")
    return count if type(count) is int and count > 0 else 0  # anyone may patch the status


def _every(restores: Iterable[Callable[[], list[str]]]) -> list[str]:
    """Run every restore, even past one that could not give everything back; what was done,
    or RestoreIncomplete with what was done and every failure."""
    done: list[str] = []
    failed: list[str] = []
    for restore in restores:
        try:
            done += restore()
        except RestoreIncomplete as error:
            done += error.done
            failed += error.failed
    if failed:
        raise RestoreIncomplete(done, failed)
    return done


UNANSWERED = (Forbidden, ApiException, urllib3.exceptions.HTTPError, OSError)
"""What a call to the API server raises when refused or not answered."""


def _said(error: Exception) -> str:
    """An error in one line: an ApiException's own text carries its response headers and
    body, so only its status is kept."""
    if isinstance(error, ApiException):
        return f"ApiException: {error.status} {error.reason}"
    return f"{type(error).__name__}: {error}"


def _failure(what: str, error: Exception) -> str:
    """A failed call in one line; a refusal says what to grant."""
    if isinstance(error, Forbidden):
        return str(error)
    return f"{what} failed: {_said(error)}"


def _governs(controller: PolicyController, name: str, governed_by: Mapping[str, str]) -> bool:
    """Whether every service ``controller`` writes is still policy ``name``'s (another policy
    may govern one the new spec dropped)."""
    return all(governed_by.get(s.name, name) == name for s in controller.problem.services)


class Term:
    """A policy's time in this process's hands, from its first cycle to its deletion or its
    stand-down: a cycle asked for in one term does nothing in the next. Told apart by
    identity, so that an ended term leaves nothing behind."""

    __slots__ = ()


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
        inventory: Inventory | None = None,
        allowed_prometheus_urls: tuple[str, ...] = (),
        prometheus_access: PrometheusAccess | None = None,
        allow_query_overrides: bool = False,
        checkpoint_root: Path | None = None,
    ):
        self.kube = kube
        self.mesh = mesh or KubeMesh(kube)
        # One memory per Prometheus of its not answering, shared by every policy reading it.
        silences: dict[str, Silence] = {}
        self.reader_for = reader_for or (
            lambda url: PrometheusReader(
                url,
                access=prometheus_access,
                silence=silences.setdefault(url.rstrip("/"), Silence()),
            )
        )
        self.store = store or ReportStore()
        self.inventory = inventory or Inventory(kube)
        self.instruments = instruments or Instruments()
        self.clock = clock
        self.prometheus_url = prometheus_url
        # A policy's own spec.prometheus.url must be one of these: the operator fetches it
        # from inside the cluster, on behalf of whoever may create a RoutingPolicy.
        self.allowed_prometheus_urls = {
            url.rstrip("/") for url in (prometheus_url, *allowed_prometheus_urls)
        }
        # A policy's own PromQL runs with the operator's credentials and reads whatever that
        # Prometheus holds, any namespace's metrics among it, which the status then quotes.
        self.allow_query_overrides = allow_query_overrides
        # Where a policy's spec.checkpoint.path may point (None: anywhere): the chart's mount
        # of checkpoints, not the operator's whole filesystem, whose files' existence the
        # status would tell and whose other tenants' checkpoints a policy could load.
        self.checkpoint_root = checkpoint_root
        self.controllers: dict[str, PolicyController] = {}
        self.skipped: Counter[str] = Counter()  # policy -> cycles skipped (previous one ran)
        # sha256 of a checkpoint's two files -> its policy, while a controller still runs it:
        # keyed by content, so sources with the same bytes share one load, and weak, so a
        # policy rebuilt on a new checkpoint (a configMapGenerator's new name each rollout)
        # does not keep the old one alive for the life of the process.
        self._checkpoints: weakref.WeakValueDictionary[tuple[str, str], LoadedPolicy] = (
            weakref.WeakValueDictionary()
        )
        # EdgeNode -> (uid, status, conditions) last written, and the lock of those writes
        self._edge_node_status: dict[str, tuple[str, str, list[dict[str, Any]]]] = {}
        self._edge_node_lock = threading.Lock()
        self._running: dict[str, threading.Lock] = {}  # policy -> held while a cycle runs
        # policy -> its current term (see `term`): a cycle asked for in an earlier term, or
        # that outlasted its term, builds, stores and publishes nothing
        self._terms: dict[str, Term] = {}
        self._lock = threading.Lock()

    # -- building --------------------------------------------------------------------------

    def checkpoint(self, source: CheckpointSource, namespace: str) -> tuple[LoadedPolicy, str]:
        """The policy and the sha256 of its weights file (what ``sha256sum policy.pt``
        prints). The source is read again at every build, so a ConfigMap or a file changed
        in place is what the next build (a spec change, a restart) runs; a policy is loaded
        once per content, shared by every policy whose source holds the same bytes."""
        field = f"spec.checkpoint.{source.kind}"
        with tempfile.TemporaryDirectory(prefix="marl-checkpoint-") as private:
            copy = Path(private)
            try:
                self._fetch(source, namespace, copy)
                files = tuple(
                    (copy / name).read_bytes()
                    for name in (checkpoint.WEIGHTS_FILE, checkpoint.META_FILE)
                )
            except OSError as error:  # absent ConfigMap, missing or unreadable files
                raise SpecError(field, str(error)) from None
            digest = hashlib.sha256(files[0]).hexdigest()
            content = (digest, hashlib.sha256(files[1]).hexdigest())
            with self._lock:
                cached = self._checkpoints.get(content)
            if cached is not None:
                return cached, digest
            try:
                # Parsed from the private copy, so the digest names the bytes that decide.
                policy = checkpoint.load(copy)  # tensors only, read without torch
            except CheckpointError as error:
                raise SpecError(field, str(error)) from None
        if policy.meta.get("action", {}).get("mode") != "neighbours":
            raise SpecError(
                field,
                "the checkpoint's action mode is not 'neighbours' (per-neighbour weights); "
                "train one on a mesh scenario",
            )
        with self._lock:
            self._checkpoints[content] = policy
        return policy, digest

    def _fetch(self, source: CheckpointSource, namespace: str, into: Path) -> None:
        """Copy the checkpoint ``source`` names into the directory ``into``."""
        if source.kind == "configMap":
            self.kube.checkpoint_from_configmap(namespace, source.value, source.key, into)
            return
        directory = (
            checkpoint.BUNDLED / source.value if source.kind == "bundled" else Path(source.value)
        )
        if source.kind == "bundled" and not directory.is_dir():
            names = sorted(p.name for p in checkpoint.BUNDLED.iterdir() if p.is_dir())
            raise FileNotFoundError(
                f"no bundled checkpoint {source.value!r}; bundled: {', '.join(names)}"
            )
        for name in (checkpoint.WEIGHTS_FILE, checkpoint.META_FILE):
            shutil.copyfile(directory / name, into / name)

    def _check_admitted(self, spec: PolicySpec) -> None:
        """SpecError for what a policy asks the operator to do that its admin has not allowed:
        whoever may create a RoutingPolicy must not reach, through the operator's identity,
        other Prometheus servers, files or metrics than those allowed."""
        if spec.prometheus.url and spec.prometheus.url.rstrip("/") not in (
            self.allowed_prometheus_urls
        ):
            raise SpecError(
                "spec.prometheus.url",
                f"{redact_url(spec.prometheus.url)!r} is not a Prometheus this operator may "
                "query: it queries its --prometheus-url and those --allow-prometheus-url "
                "names (the chart's prometheus.url and prometheus.allowedUrls); unset it, or "
                "ask the operator's admin to allow it",
            )
        if spec.checkpoint.kind == "path" and self.checkpoint_root is not None:
            root = self.checkpoint_root.resolve()
            if not Path(spec.checkpoint.value).resolve().is_relative_to(root):
                raise SpecError(
                    "spec.checkpoint.path",
                    f"{spec.checkpoint.value!r} is not under {str(self.checkpoint_root)!r}, "
                    "where this operator's checkpoints are mounted (the chart's "
                    "checkpoints.mountPath): name a run directory there, or use "
                    "spec.checkpoint.configMap or bundled",
                )
        if spec.prometheus.queries and not self.allow_query_overrides:
            raise SpecError(
                f"spec.prometheus.queries.{min(spec.prometheus.queries)}",
                "this operator runs no policy's own queries (each would run with its "
                "Prometheus credentials and could read any namespace's metrics): remove "
                "spec.prometheus.queries, or ask the operator's admin to allow them "
                "(--allow-query-overrides, the chart's prometheus.allowQueryOverrides)",
            )

    def build(self, key: str, body: Mapping[str, Any]) -> PolicyController:
        namespace = key.split("/", 1)[0]
        spec = parse_policy_spec(body.get("spec"))
        self._check_admitted(spec)
        policy, digest = self.checkpoint(spec.checkpoint, namespace)
        max_degree = int(policy.meta["observation"]["max_degree"])
        # Read now: a build follows the user's change, which may have come with new objects.
        services = self.inventory.edge_services(namespace, spec.services, fresh=True)
        nodes = self.inventory.edge_nodes(fresh=True)
        problem = build_problem(spec, nodes, services, max_degree)
        meta = {"step_seconds": 1.0, **policy.meta.get("environment", {})}
        return PolicyController(
            key,
            spec,
            int(body.get("metadata", {}).get("generation", 0)),
            problem,
            policy,
            self.reader_for(spec.prometheus.url or self.prometheus_url),
            RefusalRecorder(self.mesh),
            meta=meta,
            clock=self.clock,
            checkpoint={"source": spec.checkpoint.describe(), "sha256": digest},
            built_from=fingerprint(spec, nodes, services),
            liveness=lambda: self._liveness(problem.nodes, problem.services),
        )

    def _liveness(
        self, mesh_nodes: Sequence[MeshNode], services: Sequence[MeshService]
    ) -> Liveness:
        """Which of the edge nodes are down, and which serve which service, from the
        inventory's reads: unknown (the controller keeps what it last knew, and the status
        says why) when the Nodes, or a service's pods, cannot be read."""
        names = [node.name for node in mesh_nodes]
        try:
            nodes = self.inventory.kubernetes_nodes()
        except UNANSWERED as error:
            alive = Liveness(unknown=_failure("listing the Kubernetes nodes", error))
        else:
            edge_nodes = [n for n in self.inventory.edge_nodes() if n["metadata"]["name"] in names]
            self._publish_edge_nodes(names)
            alive = liveness(edge_nodes, nodes)
        gaps, unknown = {}, {}
        for service in services:
            if service.provider != "gateway-api" and service.kubernetes_service is None:
                unknown[service.name] = (
                    f"its host {service.host} names no Kubernetes Service (name or "
                    "name.namespace.svc...)"
                )
                continue
            up = [node for node in mesh_nodes if node.name not in alive.down]
            try:
                gaps[service.name] = self._unserved(service, up)
            except PodsUnreadable as error:
                unknown[service.name] = str(error)
            except UNANSWERED as error:
                unknown[service.name] = _failure("listing the pods of its Service", error)
        return dataclasses.replace(alive, unserved=gaps, pods_unknown=unknown)

    def _unserved(self, service: MeshService, nodes: Sequence[MeshNode]) -> dict[str, str]:
        """Which of ``nodes`` have no ready pod of ``service`` where its routes go: the pods
        of each node's own Service for an HTTPRoute, those of the host's Service with the
        node's label value for a VirtualService's subsets."""
        if service.provider == "gateway-api":
            namespace, gaps = destination_namespace(service), {}
            for node, name in zip(nodes, destination_names(service, nodes), strict=True):
                why = why_unready(self.inventory.service_pods(namespace, name))
                if why is not None:
                    gaps[node.name] = f"{why} behind the Service {name}"
            return gaps
        namespace, name = service.kubernetes_service  # checked by the caller
        return unserved(nodes, service.node_label, self.inventory.service_pods(namespace, name))

    def _publish_edge_nodes(self, names: Sequence[str]) -> None:
        """Write the status of the EdgeNodes ``names`` (their Kubernetes nodes, Ready) where
        it changed: every policy over a node asks at every cycle, one write per change is
        enough. One writer at a time, from the inventory's newest reads, so that a cycle
        holding older ones cannot write an older state over a newer one. A refused or failed
        write is logged and tried again at the next cycle; it fails no cycle."""
        with self._edge_node_lock:
            try:
                nodes, edge_nodes = self.inventory.kubernetes_nodes(), self.inventory.edge_nodes()
            except UNANSWERED:
                return  # the liveness of the next cycle says so
            existing = {edge_node["metadata"]["name"] for edge_node in edge_nodes}
            for gone in self._edge_node_status.keys() - existing:  # remembered for nothing
                del self._edge_node_status[gone]
            for edge_node in edge_nodes:
                name, uid = edge_node["metadata"]["name"], edge_node["metadata"].get("uid", "")
                if name not in names:
                    continue
                status = edge_node_status(edge_node, nodes)
                said = json.dumps(status, sort_keys=True)
                written = self._edge_node_status.get(name)
                if written is not None and written[:2] == (uid, said):
                    continue
                # The conditions last written (the inventory's copy may predate that write),
                # or the object's own: their transition times are kept where nothing changed.
                previous = (
                    written[2]
                    if written is not None and written[0] == uid
                    else (edge_node.get("status") or {}).get("conditions") or []
                )
                when, generation = timestamp(self.clock()), status["observedGeneration"]
                conditions = merge_conditions(previous, status["conditions"], when, generation)
                try:
                    self.kube.patch_edge_node_status(name, {**status, "conditions": conditions})
                except UNANSWERED as error:
                    if getattr(error, "status", None) != 404:  # deleted since the inventory read
                        log.warning(
                            "the status of EdgeNode %s was not written: %s",
                            name,
                            _failure("writing it", error),
                            extra={"fields": {"edge_node": name}},
                        )
                    continue
                self._edge_node_status[name] = (uid, said, conditions)

    def _inventory_changed(self, key: str, controller: PolicyController) -> bool:
        """Whether the EdgeNodes or EdgeServices ``controller`` was built from changed."""
        namespace, spec = key.split("/", 1)[0], controller.spec
        services = self.inventory.edge_services(namespace, spec.services)
        now = fingerprint(spec, self.inventory.edge_nodes(), services)
        if now == controller.built_from:
            return False
        log.info(
            "policy %s is built again: its EdgeNodes or EdgeServices changed",
            key,
            extra={"fields": {"policy": key}},
        )
        return True

    # -- running -----------------------------------------------------------------------------

    def term(self, key: str) -> Term:
        """The policy ``key``'s term, which its deletion or stand-down ends. A daemon takes
        it when it starts and asks for every cycle in it (see :meth:`cycle`)."""
        with self._lock:
            return self._terms.setdefault(key, Term())

    def _ended(self, key: str, term: Term) -> bool:
        """Whether the policy's ``term`` is over (it was deleted or left to a peer since)."""
        with self._lock:
            return self._terms.get(key) is not term

    def cycle(
        self,
        key: str,
        body: Mapping[str, Any],
        governed_by: Mapping[str, str] | None = None,
        term: Term | None = None,
    ) -> CycleReport | None:
        """One interval of the policy ``key`` (``namespace/name``) as ``body`` now reads; None
        when the policy's previous cycle is still running: this one is skipped (counted in
        :attr:`skipped` and ``marl_operator_cycles_skipped_total``, logged), not queued.
        ``governed_by`` names the policy governing each service (:mod:`claims`): one that
        another policy governs makes this one Invalid.

        ``term`` (:meth:`term`, when the cycle was asked for): a cycle that waited for a
        worker past its policy's deletion or stand-down runs not at all (None), and one that
        is running then writes, keeps and publishes nothing more; without it, the term is the
        one the cycle starts in."""
        with self._lock:
            current = self._terms.setdefault(key, Term())
            if term is not None and term is not current:
                log.info(
                    "cycle %s dropped: the policy was deleted or left to a peer since it was "
                    "asked for",
                    key,
                    extra={"fields": {"policy": key}},
                )
                return None
            running = self._running.setdefault(key, threading.Lock())
            started = running.acquire(blocking=False)
        if not started:
            self.skipped[key] += 1
            self.instruments.skipped(key)
            log.warning(
                "cycle %s skipped: its previous cycle is still running",
                key,
                extra={"fields": {"policy": key, "skipped": self.skipped[key]}},
            )
            return None
        try:
            return self._cycle(key, body, governed_by or {}, current)
        except Exception as error:
            if self._ended(key, current):  # retired meanwhile: only the log is left
                log.exception("cycle %s of a retired policy failed", key)
                return None
            # The API server or the mesh failing in a way no handler expects (unreachable
            # mid-cycle, say), or a bug: the status says so, instead of the daemon dying with
            # a stale status. The controller is kept (its model's window is worth keeping
            # through a network error) and tries again next interval.
            log.exception("cycle %s failed", key, extra={"fields": {"policy": key}})
            generation = int(body.get("metadata", {}).get("generation", 0))
            failure = f"{CYCLE_FAILED}: {_said(error)}"[:900]
            reason = (
                f"{failure}; the mesh keeps the last weights reported, unless this cycle "
                "wrote some of its services before failing; tried again next interval"
            )
            return self._publish(self._held(key, generation, reason), current)
        finally:
            with self._lock:
                running.release()
                # A cycle that outlasted its policy's deletion is the last to hold the lock.
                if key not in self._terms and self._running.get(key) is running:
                    del self._running[key]

    def _cycle(
        self, key: str, body: Mapping[str, Any], governed_by: Mapping[str, str], term: Term
    ) -> CycleReport | None:
        generation = int(body.get("metadata", {}).get("generation", 0))
        controller = self.controllers.get(key)
        namespace, name = key.split("/", 1)
        try:
            named = set((body.get("spec") or {}).get("services") or ())
            claims = {s: owner for s, owner in governed_by.items() if s in named}
            if (taken := conflict(name, namespace, claims)) is not None:
                raise SpecError("spec.services", taken)
            if (
                controller is None
                or controller.generation != generation
                or self._inventory_changed(key, controller)
            ):
                rebuilt = self.build(key, body)
                if self._ended(key, term):
                    return None  # retired while building: nothing given back, kept or written
                self._release(key, written_before(controller, body), rebuilt, governed_by)
                with self._lock:  # kept only within the term, or a retirement closes it
                    if self._terms.get(key) is not term:
                        return None
                    rebuilt.failures.count = failures_before(controller, body)
                    controller = self.controllers[key] = rebuilt
        except SpecError as error:
            if controller is not None and _governs(controller, name, governed_by):
                # The last good build holds, and moves routes off nodes that cannot serve.
                hold = functools.partial(self._hold_invalid, key, controller, body, error)
                report = self._act(controller, hold)
                return self._publish(dataclasses.replace(report, generation=generation), term)
            self.controllers.pop(key, None)
            report = CycleReport(
                policy=key,
                time=self.clock(),
                generation=generation,
                outcome=Outcome.INVALID,
                reason=str(error),
            )
            return self._publish(report, term)
        except Forbidden as error:
            self.controllers.pop(key, None)  # the next cycle builds again
            log.warning("cycle %s: %s", key, error, extra={"fields": {"policy": key}})
            return self._publish(self._refused(key, generation, error), term)
        return self._publish(self._act(controller, controller.cycle), term)

    def _act(self, controller: PolicyController, act: Callable[[], CycleReport]) -> CycleReport:
        """``act``'s report, naming the first write the API server refused (403) in it; what
        the services it wrote were moved away from is given back after it (unless the policy
        was retired meanwhile: its mesh is closed)."""
        recorder = controller.mesh if isinstance(controller.mesh, RefusalRecorder) else None
        if recorder is not None:
            recorder.refused.clear()
        report = act()
        if recorder is not None and recorder.refused:
            refusal = next(iter(recorder.refused.values()))
            report = dataclasses.replace(report, forbidden=str(refusal))
            log.warning(
                "cycle %s: %s", report.policy, refusal, extra={"fields": {"policy": report.policy}}
            )
        if controller.releasing and not getattr(controller.mesh, "closed", False):
            self._give_back_moved(controller)
            report = dataclasses.replace(report, mesh_objects=controller.mesh_objects)
        return report

    def _hold_invalid(
        self, key: str, controller: PolicyController, body: Mapping[str, Any], error: SpecError
    ) -> CycleReport:
        """The held cycle of ``controller``, the last valid build of a policy that no longer
        builds: nothing moves if the new spec says hands off (``suspend``, ``dryRun``: the
        edit that broke the spec may be the one that said so); an EdgeNode since deleted is
        down, and a service whose EdgeService is gone is not written (its routes would be
        made again)."""
        spec = body.get("spec") or {}
        hands_off = spec.get("suspend") is True or spec.get("dryRun") is True
        namespace = key.split("/", 1)[0]
        nodes = {obj["metadata"]["name"] for obj in self.inventory.edge_nodes()}
        services = self.inventory.edge_services(namespace, controller.spec.services)
        return controller.hold_invalid(
            str(error),
            move=not hands_off,
            gone_nodes={n.name for n in controller.problem.nodes} - nodes,
            gone_services={s.name for s in controller.problem.services} - set(services),
        )

    def _release(
        self,
        key: str,
        before: Mapping[str, Sequence[tuple[str, str]]],
        new: PolicyController,
        governed_by: Mapping[str, str],
    ) -> None:
        """Give back the mesh objects the policy wrote ``before`` this build (service ->
        objects, :func:`written_before`) that ``new`` will not write. Those of a service
        taken out of ``spec.services`` go now, before ``new`` takes over, so that a failure
        here fails the cycle and the rebuild, release included, is tried again next interval
        (the status keeps listing the objects meanwhile). Those an EdgeService's routes
        moved away from are ``new``'s to give back once it has written the new ones
        (:meth:`_give_back_moved`): a DestinationRule deleted first leaves the routes naming
        subsets that are gone. A service another policy governs is that one's."""
        if not hasattr(self.mesh, "restore_objects"):
            return
        name = key.split("/", 1)[1]
        keep = new.problem.mesh_objects
        for service, objects in before.items():
            if governed_by.get(service, name) != name:
                continue
            kept = set(keep.get(service, ()))
            released = [o for o in objects if o not in kept]
            if released and service in keep:
                new.releasing[service] = released
            elif released:
                self._give_back(key, service, released)

    def _give_back_moved(self, controller: PolicyController) -> None:
        """Give back what ``controller``'s services were moved away from, for each service
        its running cycle wrote. What fails is tried again after the next write (the status
        keeps naming it), but for what the API server refuses for good."""
        for service in sorted(controller.synced & set(controller.releasing)):
            try:
                self._give_back(controller.key, service, controller.releasing[service])
            except Exception as error:  # the API server unreachable, a 403: next time
                log.warning(
                    "policy %s could not give back what %s moved away from yet: %s",
                    controller.key,
                    service,
                    _said(error),
                    extra={"fields": {"policy": controller.key, "service": service}},
                )
                continue
            del controller.releasing[service]

    def _give_back(self, key: str, service: str, objects: list[tuple[str, str]]) -> None:
        """Restore (or delete) ``objects`` of ``service`` that the policy ``key`` no longer
        writes. What the API server refuses for good (:class:`RestoreIncomplete`: a
        webhook's denial, a saved spec that no longer reads) is logged to be given back by
        hand, and counts as done: trying again would hold the policy for ever."""
        namespace = key.split("/", 1)[0]
        try:
            done = self.mesh.restore_objects(namespace, f"{namespace}/{service}", objects)
        except RestoreIncomplete as error:
            log.warning(
                "policy %s no longer writes %s/%s and could not give all of it back "
                "(restore it by hand): %s",
                key,
                namespace,
                service,
                error,
                extra={"fields": {"policy": key, "service": service}},
            )
            return
        log.info(
            "policy %s no longer writes %s/%s: %s",
            key,
            namespace,
            service,
            "; ".join(done) or "nothing of it was managed",
            extra={"fields": {"policy": key, "service": service}},
        )

    def _refused(self, key: str, generation: int, error: Forbidden) -> CycleReport:
        """The report of a cycle whose policy could not be built: the API server refused a
        read (403). Nothing was read from the mesh or written to it."""
        reason = f"{BUILD_FORBIDDEN}: the operator may not {error.call}; nothing read or written"
        return self._held(key, generation, f"{reason}, weights held", forbidden=str(error))

    def _held(
        self, key: str, generation: int, reason: str, forbidden: str | None = None
    ) -> CycleReport:
        """A held cycle without a controller to report it: the weights and the checkpoint as
        the last report saw them, the failures as the policy's controller (if it has one)
        counts them."""
        last, controller = self.store.latest(key), self.controllers.get(key)
        return CycleReport(
            policy=key,
            time=self.clock(),
            generation=generation,
            outcome=Outcome.HELD,
            reason=reason,
            weights=last.weights if last is not None else {},
            forbidden=forbidden,
            checkpoint=last.checkpoint if last is not None else None,
            failures=controller.failures.count if controller is not None else None,
        )

    def interval(self, key: str) -> float:
        """Seconds from one cycle's start to the next: the spec's interval (30 s, the CRD's
        default, for a policy without a controller)."""
        controller = self.controllers.get(key)
        if controller is None:
            return 30.0
        return float(controller.spec.interval_s)

    def delete(
        self,
        key: str,
        body: Mapping[str, Any],
        governed_by: Mapping[str, str] | None = None,
        wait_s: float | None = None,
    ) -> list[str]:
        """Restore the mesh objects of a deleted policy and forget it. A policy this process
        never ran (deleted right after a restart) is rebuilt from ``body`` to find its
        objects; of one that cannot be built, what its status names is given back. A cycle of
        the policy still running (its daemon already stopped) ends first, so that its write
        cannot take the restored objects over again; it waits ``wait_s`` at most (what is left
        of the deletion handler's wait, which shares one deadline with this; DELETE_WAIT_S
        without the handler). Services ``governed_by`` another policy are that one's: left as
        they are."""
        name = key.split("/", 1)[1]
        others = {s for s, other in (governed_by or {}).items() if other != name}
        with self._lock:
            running = self._running.setdefault(key, threading.Lock())
        if not running.acquire(timeout=DELETE_WAIT_S if wait_s is None else wait_s):
            log.warning("restoring %s while a cycle of it still runs", key)
            return self._delete(key, body, others)
        try:
            return self._delete(key, body, others)
        finally:
            with self._lock:
                if self._running.get(key) is running:
                    del self._running[key]
                running.release()

    def stand_down(self, key: str) -> None:
        """Leave the policy ``key`` to another replica (kopf paused this one for a peer of
        higher priority, or the process is exiting): a cycle still running writes and reports
        nothing more, and this process stops serving the policy's last report and metrics,
        which would otherwise stand frozen beside the new leader's. Should this replica lead
        again, the policy is built afresh from what the mesh carries then, and the EdgeNodes'
        statuses written again (the peer leading meanwhile wrote them)."""
        log.info("policy %s: standing down", key, extra={"fields": {"policy": key}})
        self._retire(key)
        with self._edge_node_lock:
            self._edge_node_status.clear()

    def _retire(self, key: str) -> PolicyController | None:
        """Stop everything this process does for ``key`` and begin its next term; returns its
        controller, if any."""
        with self._lock:
            self._terms.pop(key, None)
            controller = self.controllers.pop(key, None)
            if controller is not None and isinstance(controller.mesh, RefusalRecorder):
                controller.mesh.closed = True  # a cycle still running writes nothing more
            self.store.forget(key)
            self.instruments.forget(key)
            self.skipped.pop(key, None)
        return controller

    def _delete(self, key: str, body: Mapping[str, Any], others: set[str]) -> list[str]:
        """The deletion proper; ``others``: services another policy governs. Each service's
        objects go in one give-back, routes before the subsets they name: those it lives in
        now and those written before the build (its controller's, or what the status names:
        objects a renamed EdgeService moved away from, and the services of an edit that dropped
        them while no process ran the policy)."""
        controller = self._retire(key)
        before = written_before(controller, body)
        built: Mapping[str, Sequence[tuple[str, str]]] = {}
        if controller is None:
            try:
                controller = self.build(key, body)
            except Exception as error:  # whatever keeps it from being built, the status names
                log.info(  # the objects to give back
                    "deleting %s: it cannot be built (%s); restoring what its status names",
                    key,
                    error,
                    extra={"fields": {"policy": key}},
                )
                controller = None
        if controller is not None:
            built = controller.problem.mesh_objects
        listed = {
            service: list(dict.fromkeys([*built.get(service, ()), *before.get(service, ())]))
            for service in dict.fromkeys([*built, *before])
        }
        return _every(self._restores(key, listed, others))

    def _restores(
        self, key: str, listed: Mapping[str, Sequence[tuple[str, str]]], others: set[str]
    ) -> list[Callable[[], list[str]]]:
        """The restores of the ``listed`` objects of each service of the policy ``key`` but
        ``others``. Only objects the operator manages for that EdgeService are touched,
        whatever the list (a status, which anyone may edit) claims."""
        if not hasattr(self.mesh, "restore_objects"):
            return []
        namespace = key.split("/", 1)[0]
        return [
            lambda service=service, objects=objects: self.mesh.restore_objects(
                namespace, f"{namespace}/{service}", list(objects)
            )
            for service, objects in listed.items()
            if objects and service not in others
        ]

    def _publish(self, report: CycleReport, term: Term) -> CycleReport | None:
        """Serve and record ``report``, if its policy's ``term`` still lasts (None otherwise:
        nobody is left to tell, and a report kept would stand beside a new leader's)."""
        with self._lock:
            if self._terms.get(report.policy) is not term:
                return None
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
        return report
