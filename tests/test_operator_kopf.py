"""The operator as kopf runs it, against the emulated API server.

The handlers of :mod:`marl_operator.handlers` are registered as the operator registers them and
driven by kopf in-process (:mod:`kopf_harness`); every Kubernetes call goes through the real
:class:`~marl_operator.kube.Kube` and :class:`~marl_operator.kube.KubeMesh` over a
``kubernetes`` client configured from the emulator's kubeconfig, so VirtualServices, statuses,
events and finalizers really land in the emulator. Only Prometheus is a fake: the in-memory
M/M/1 mesh of :mod:`operator_fakes`, whose traffic follows the routes of the VirtualService
that is actually in the emulator (:class:`LiveRoutesReader`).

The daemon waits ``runtime.interval()`` between cycles; the tests shorten it to
:data:`FAST_INTERVAL_S` (the spec keeps its minimum of 5 s, which the model is built for).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kopf
import pytest
from kopf_harness import ApiError, eventually, kube, running_operator
from kubernetes import client
from kubernetes.client.rest import ApiException
from marl_operator import handlers
from marl_operator import runtime as runtime_module
from marl_operator.drain import drain
from marl_operator.handlers import register
from marl_operator.kube import (
    USER_AGENT,
    Forbidden,
    Kube,
    KubeMesh,
    TimedApiClient,
    client_configuration,
)
from marl_operator.mesh.istio import read_virtual_service
from marl_operator.mesh.model import (
    MeshError,
    MeshService,
    RestoreIncomplete,
    node_from_edge_node,
)
from marl_operator.mesh.ownership import (
    ADOPT_ANNOTATION,
    MANAGED_BY_LABEL,
    ORIGINAL_SPEC_ANNOTATION,
    SERVICE_ANNOTATION,
)
from marl_operator.mesh.routing import build_routes
from marl_operator.report import Outcome
from marl_operator.runtime import Runtime
from operator_fakes import QueueingMesh, Reader, example, example_mesh

from policies import checkpoint

NAMESPACE, POLICY, SERVICE = "edge", "edge-routing", "fn"
KEY = f"{NAMESPACE}/{POLICY}"
FAST_INTERVAL_S = 0.5

MARL = "/apis/marl.dev/v1alpha1"
EDGE_NODES = f"{MARL}/edgenodes"
EDGE_SERVICES = f"{MARL}/namespaces/{NAMESPACE}/edgeservices"
POLICIES = f"{MARL}/namespaces/{NAMESPACE}/routingpolicies"
ISTIO = f"/apis/networking.istio.io/v1/namespaces/{NAMESPACE}"
VIRTUAL_SERVICES, DESTINATION_RULES = f"{ISTIO}/virtualservices", f"{ISTIO}/destinationrules"
EVENTS = f"/api/v1/namespaces/{NAMESPACE}/events"

NODES = example("edgenodes.yaml")
EDGE_SERVICE = next(s for s in example("edgeservice.yaml") if s["metadata"]["name"] == SERVICE)
MESH_SERVICE = MeshService.from_edge_service(EDGE_SERVICE)
MESH_NODES = tuple(node_from_edge_node(n) for n in NODES)
NODE_NAMES = tuple(n.name for n in MESH_NODES)


class LiveRoutesReader(Reader):
    """The fake's metrics under the routes the emulator's VirtualService carries now (the
    equal split while there is none, or while it is the user's own), so its physics follow
    what the operator really wrote. While ``gate`` is closed (cleared), a read waits for it
    to open, and says so in ``held``."""

    def __init__(self, fake: QueueingMesh, kube: Kube):
        super().__init__(fake)
        self.live = KubeMesh(kube)
        self.gate = threading.Event()
        self.gate.set()
        self.held = threading.Event()

    def read(self, **kwargs: Any) -> Any:
        if not self.gate.is_set():
            self.held.set()
            self.gate.wait(timeout=30)
        routes = self.live.read(MESH_SERVICE, MESH_NODES)
        if routes is None:
            self.mesh.routes.pop(SERVICE, None)
        else:
            self.mesh.routes[SERVICE] = routes
        return super().read(**kwargs)


def new_runtime(kubeconfig: Path, fake: QueueingMesh) -> tuple[Runtime, LiveRoutesReader]:
    """A Runtime as ``python -m marl_operator`` builds it (from an explicit kubeconfig), with
    the queueing fake in place of Prometheus and a short interval between cycles."""
    cluster = Kube(TimedApiClient(client_configuration(kubeconfig)))
    reader = LiveRoutesReader(fake, cluster)
    runtime = Runtime(cluster, mesh=KubeMesh(cluster), reader_for=lambda url: reader)
    runtime.interval = lambda key: FAST_INTERVAL_S  # type: ignore[method-assign]
    return runtime, reader


@contextlib.asynccontextmanager
async def operating(url: str, runtime: Runtime) -> AsyncIterator[None]:
    """kopf running the operator's handlers over ``runtime`` (a fresh registry each time)."""
    registry = kopf.OperatorRegistry()
    register(registry, runtime)
    async with running_operator(registry, url):
        yield


@pytest.fixture()
def cluster(apiserver: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """The emulated API server; nothing may fall back to $KUBECONFIG."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    return apiserver


# --- talking to the emulator -------------------------------------------------------------------


def policy_body(**spec_changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(example("policy.yaml")[0])
    body["spec"]["intervalSeconds"] = 5
    body["spec"].update(spec_changes)
    return body


async def create_resources(
    url: str, policy: dict[str, Any] | None = None, *, user_routes: bool = False
) -> None:
    """The example EdgeNodes and EdgeService, with ``user_routes`` the user's own
    VirtualService (the one a policy takes over and gives back), then ``policy`` (if any),
    through the API."""
    with contextlib.suppress(ApiError):  # already there from an earlier step
        await kube(url, "POST", "/api/v1/namespaces", {"metadata": {"name": NAMESPACE}})
    for node in NODES:
        await kube(url, "POST", EDGE_NODES, node)
    await kube(url, "POST", EDGE_SERVICES, EDGE_SERVICE)
    if user_routes:
        await kube(url, "POST", VIRTUAL_SERVICES, USER_VIRTUAL_SERVICE)
    if policy is not None:
        await kube(url, "POST", POLICIES, policy)


async def get(url: str, path: str) -> dict[str, Any] | None:
    try:
        return await kube(url, "GET", path)
    except ApiError as error:
        if error.status == 404:
            return None
        raise


async def policy_status(url: str) -> dict[str, Any]:
    return ((await get(url, f"{POLICIES}/{POLICY}")) or {}).get("status") or {}


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions", [])}


async def phase_is(url: str, phase: str) -> dict[str, Any] | None:
    status = await policy_status(url)
    return status if status.get("phase") == phase else None


async def events(url: str, reason: str) -> list[dict[str, Any]]:
    """The policy's events with this reason (every one of them for ``""``)."""
    listed = await kube(url, "GET", EVENTS)
    return [
        e
        for e in listed["items"]
        if reason in ("", e.get("reason"))
        and e.get("involvedObject", {}).get("kind") == "RoutingPolicy"
        and e["involvedObject"].get("name") == POLICY
    ]


def route_table(vs: dict[str, Any]) -> dict[str, dict[str, int]]:
    routes = read_virtual_service(MESH_SERVICE, MESH_NODES, vs)
    return {source: dict(row) for source, row in routes.by_source.items()}


def positive(rows: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {s: {n: w for n, w in row.items() if w > 0} for s, row in rows.items()}


def gone(url: str, path: str) -> Any:
    async def probe() -> bool:
        return await get(url, path) is None

    return probe


def taken_over(url: str) -> Any:
    async def probe() -> bool:
        vs = await get(url, f"{VIRTUAL_SERVICES}/{SERVICE}")
        return vs is not None and MANAGED_BY_LABEL in (vs["metadata"].get("labels") or {})

    return probe


async def apply_policy_and_wait_for_the_takeover(url: str) -> None:
    """Create the policy; return once it took the user's VirtualService over and wrote the
    DestinationRule beside it."""
    await kube(url, "POST", POLICIES, policy_body())
    await eventually(taken_over(url), what="the takeover")
    await eventually(lambda: get(url, f"{DESTINATION_RULES}/{SERVICE}"), what="the DestinationRule")


def latest(runtime: Runtime) -> Any:
    async def probe() -> Any:
        return runtime.store.latest(KEY)

    return probe


def is_set(flag: threading.Event) -> Any:
    async def probe() -> bool:
        return flag.is_set()

    return probe


def outcome_is(runtime: Runtime, outcome: Outcome) -> Any:
    async def probe() -> bool:
        report = runtime.store.latest(KEY)
        return report is not None and report.outcome == outcome

    return probe


# --- the tests ---------------------------------------------------------------------------------


def test_applied_policy_writes_routes_status_and_an_event(cluster: Any) -> None:
    runtime, _ = new_runtime(cluster.kubeconfig, example_mesh())
    written: list[dict[str, Any]] = []  # every status the operator sent
    patch_status = runtime.kube.patch_policy_status

    def record(namespace: str, name: str, status: Any) -> None:
        written.append(copy.deepcopy(dict(status)))
        patch_status(namespace, name, status)

    runtime.kube.patch_policy_status = record  # type: ignore[method-assign]

    async def scenario() -> None:
        url = cluster.url
        async with operating(url, runtime):
            await create_resources(url, policy_body())
            vs = await eventually(
                lambda: get(url, f"{VIRTUAL_SERVICES}/{SERVICE}"), what="the VirtualService"
            )
            dr = await eventually(
                lambda: get(url, f"{DESTINATION_RULES}/{SERVICE}"), what="the DestinationRule"
            )
            for obj in (vs, dr):
                assert obj["metadata"]["labels"][MANAGED_BY_LABEL] == "marl-operator"
                assert obj["metadata"]["annotations"][SERVICE_ANNOTATION] == f"{NAMESPACE}/fn"
            assert [s["name"] for s in dr["spec"]["subsets"]] == [f"node-{n}" for n in NODE_NAMES]
            rules = vs["spec"]["http"]
            assert [r["name"] for r in rules] == [*(f"from-{n}" for n in NODE_NAMES), "default"]
            for rule in rules:
                assert sum(route["weight"] for route in rule["route"]) == 100, rule

            # The status reports the routes the mesh carries: compare them once both settled.
            async def settled() -> dict[str, Any] | None:
                status = await policy_status(url)
                vs = await get(url, f"{VIRTUAL_SERVICES}/{SERVICE}")
                routes = {
                    r["sourceNode"]: r["weights"]
                    for r in (status.get("services") or [{}])[0].get("routes", [])
                }
                return status if vs and positive(routes) == route_table(vs) else None

            status = await eventually(settled, what="status routes equal to the VirtualService")
            policy = await kube(url, "GET", f"{POLICIES}/{POLICY}")
            generation = policy["metadata"]["generation"]
            assert "marl.dev/finalizer" in policy["metadata"]["finalizers"]
            assert status["phase"] == "Active"
            assert status["observedGeneration"] == generation
            assert status["services"][0]["name"] == SERVICE
            assert {r["sourceNode"] for r in status["services"][0]["routes"]} == set(NODE_NAMES)
            found = conditions(status)
            for kind in ("Ready", "MetricsAvailable", "WeightsApplied"):
                assert found[kind]["status"] == "True", found[kind]
                assert found[kind]["observedGeneration"] == generation
            assert found["Fallback"]["status"] == "False"
            assert status["lastDecision"]["observedLatencyMs"] > 0

            applied = await eventually(lambda: events(url, "WeightsApplied"), what="the event")
            assert applied[0]["type"] == "Normal"
            assert applied[0]["involvedObject"]["uid"] == policy["metadata"]["uid"]

            # Once the decision is steady (Unchanged), the policy is still Active, and every
            # event it got says that its weights are applied.
            await eventually(outcome_is(runtime, Outcome.UNCHANGED), what="a steady decision")
            history = runtime.store.history(KEY)
            await eventually(
                lambda: asyncio.sleep(0, len(written) >= len(history)), what="every status"
            )
            assert {w["phase"] for w in written} == {"Active"}
            assert {e["reason"] for e in await events(url, "")} == {"WeightsApplied"}

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"services": ["missing"]}, "spec.services"),
        ({"safety": {"fallback": "panic"}}, "spec.safety.fallback"),
    ],
    ids=["unknown-service", "unknown-fallback"],
)
def test_invalid_policy_fails_naming_the_field_and_writes_nothing(
    cluster: Any, change: dict[str, Any], field: str
) -> None:
    runtime, _ = new_runtime(cluster.kubeconfig, example_mesh())

    async def scenario() -> None:
        url = cluster.url
        async with operating(url, runtime):
            # The emulator validates no schema, so the operator's own checks must catch it.
            await create_resources(url, policy_body(**change))
            status = await eventually(lambda: phase_is(url, "Failed"), what="phase Failed")
            ready = conditions(status)["Ready"]
            assert ready["status"] == "False" and ready["message"].startswith(field), ready
            assert conditions(status)["WeightsApplied"]["status"] == "False"
            invalid = await eventually(lambda: events(url, "InvalidSpec"), what="the event")
            assert invalid[0]["type"] == "Warning" and field in invalid[0]["message"]
            assert runtime.store.latest(KEY).outcome == Outcome.INVALID
        for plural in (VIRTUAL_SERVICES, DESTINATION_RULES):
            assert (await kube(url, "GET", plural))["items"] == []

    asyncio.run(scenario())


USER_VIRTUAL_SERVICE = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {
        "name": SERVICE,
        "namespace": NAMESPACE,
        "labels": {"app": "fn"},
        "annotations": {"owner": "the user", ADOPT_ANNOTATION: "true"},
    },
    "spec": {
        "hosts": [MESH_SERVICE.host],
        "gateways": ["mesh"],  # a field the Istio writer does not generate
        "http": [{"route": [{"destination": {"host": MESH_SERVICE.host}}], "timeout": "3s"}],
    },
}


class CycleCounter:
    """Wraps a Runtime's cycle and delete: how many cycles run now, and whether a delete
    has begun."""

    def __init__(self, runtime: Runtime):
        self.running = 0
        self.lock = threading.Lock()
        self.deleting = threading.Event()
        cycle, delete = runtime.cycle, runtime.delete

        def counted_cycle(key: str, body: Any, *args: Any) -> Any:
            with self.lock:
                self.running += 1
            try:
                return cycle(key, body, *args)
            finally:
                with self.lock:
                    self.running -= 1

        def announced_delete(key: str, body: Any, *args: Any) -> list[str]:
            self.deleting.set()
            return delete(key, body, *args)

        runtime.cycle = counted_cycle  # type: ignore[method-assign]
        runtime.delete = announced_delete  # type: ignore[method-assign]

    async def idle(self) -> bool:
        with self.lock:
            return self.running == 0


async def take_over_then_delete(
    url: str, runtime: Runtime, reader: LiveRoutesReader, *, mid_cycle: bool = False
) -> list[dict[str, Any]]:
    """Create the user's VirtualService and the policy, wait for the operator's takeover,
    delete the policy (``mid_cycle``: while a cycle is held reading metrics) and wait until
    it is gone; returns the policy's RoutesRestored events."""
    await create_resources(url, user_routes=True)
    in_flight = CycleCounter(runtime)
    async with operating(url, runtime):
        await apply_policy_and_wait_for_the_takeover(url)
        try:
            if mid_cycle:
                reader.gate.clear()
                reader.held.clear()
                await eventually(is_set(reader.held), what="a cycle held at the gate")
            await kube(url, "DELETE", f"{POLICIES}/{POLICY}")
            if mid_cycle:
                # A delete handler that does not wait for the held cycle restores the routes
                # now; one that waits does not reach runtime.delete before the cycle ends.
                with contextlib.suppress(TimeoutError):
                    await eventually(is_set(in_flight.deleting), timeout=1.5)
                    await asyncio.sleep(0.3)  # time for that restore to finish
        finally:
            reader.gate.set()  # the held cycle goes on

        await eventually(
            gone(url, f"{POLICIES}/{POLICY}"), timeout=20, what="the policy's deletion"
        )
        # kopf may have cancelled the daemon, but not the thread running its cycle.
        await eventually(in_flight.idle, what="the end of every cycle")
        return await eventually(
            lambda: events(url, "RoutesRestored"), what="the RoutesRestored event"
        )


def assert_restored(vs: dict[str, Any]) -> None:
    meta, user = vs["metadata"], USER_VIRTUAL_SERVICE["metadata"]
    assert vs["spec"] == USER_VIRTUAL_SERVICE["spec"]
    assert meta.get("labels") == user["labels"]  # marl.dev/managed-by is gone, the user's kept
    assert meta.get("annotations") == user["annotations"]
    for key in (SERVICE_ANNOTATION, ORIGINAL_SPEC_ANNOTATION):
        assert key not in (meta.get("annotations") or {})


def test_deleting_the_policy_restores_the_users_routes(cluster: Any) -> None:
    runtime, reader = new_runtime(cluster.kubeconfig, example_mesh())

    async def scenario() -> None:
        url = cluster.url
        restored = await take_over_then_delete(url, runtime, reader)
        assert_restored(await kube(url, "GET", f"{VIRTUAL_SERVICES}/{SERVICE}"))
        # The DestinationRule was the operator's own: gone with the policy.
        assert await get(url, f"{DESTINATION_RULES}/{SERVICE}") is None
        assert restored[0]["type"] == "Normal"
        assert "restored VirtualService/fn" in restored[0]["message"]
        assert "deleted DestinationRule/fn" in restored[0]["message"]
        assert KEY not in runtime.controllers and runtime.store.latest(KEY) is None

    asyncio.run(scenario())


def test_a_spec_that_cannot_be_given_back_does_not_hold_the_deletion(cluster: Any) -> None:
    """The user's spec, kept in an annotation, became unreadable (an edit by hand): kopf
    retried the deletion for ever and the policy stayed Terminating. Now a Warning event
    names what could not be given back and what to do, and the policy goes. The
    DestinationRule stays: the VirtualService left as it is still routes to its subsets."""
    runtime, _ = new_runtime(cluster.kubeconfig, example_mesh())

    async def scenario() -> None:
        url = cluster.url
        await create_resources(url, user_routes=True)
        async with operating(url, runtime):
            await apply_policy_and_wait_for_the_takeover(url)
            corrupt = {"metadata": {"annotations": {ORIGINAL_SPEC_ANNOTATION: "{not json"}}}
            await kube(url, "PATCH", f"{VIRTUAL_SERVICES}/{SERVICE}", corrupt)
            await kube(url, "DELETE", f"{POLICIES}/{POLICY}")
            await eventually(
                gone(url, f"{POLICIES}/{POLICY}"), timeout=20, what="the policy's deletion"
            )
            (warning,) = await eventually(
                lambda: events(url, "RoutesNotRestored"), what="the warning"
            )
        assert warning["type"] == "Warning"
        assert "VirtualService/fn" in warning["message"] and "by hand" in warning["message"]
        assert (
            "DestinationRule/fn: kept, since VirtualService/fn still routes to"
            in (warning["message"])
        )
        assert await events(url, "RoutesRestored") == []
        assert await get(url, f"{DESTINATION_RULES}/{SERVICE}") is not None

    asyncio.run(scenario())


def test_drain_deletes_every_policy_and_waits_for_its_routes_to_come_back(cluster: Any) -> None:
    """The chart's uninstall hook. With the operator stopped, the policy's finalizer holds it
    and drain names it at the timeout; with the operator back, the policy goes and the
    user's routes are restored."""
    runtime, _ = new_runtime(cluster.kubeconfig, example_mesh())
    drainer = Kube(TimedApiClient(client_configuration(cluster.kubeconfig)))

    async def scenario() -> None:
        url = cluster.url
        await create_resources(url, user_routes=True)
        async with operating(url, runtime):
            await kube(url, "POST", POLICIES, policy_body())
            await eventually(taken_over(url), what="the takeover")
        assert await asyncio.to_thread(drain, drainer, ("elsewhere",), 1.0, 0.1) == []
        assert not (await get(url, f"{POLICIES}/{POLICY}"))["metadata"].get("deletionTimestamp")
        assert await asyncio.to_thread(drain, drainer, (), 1.0, 0.1) == [KEY]
        assert (await get(url, f"{POLICIES}/{POLICY}"))["metadata"].get("deletionTimestamp")
        again, _ = new_runtime(cluster.kubeconfig, example_mesh())
        async with operating(url, again):
            assert await asyncio.to_thread(drain, drainer, (NAMESPACE,), 20.0, 0.2) == []
        assert_restored(await kube(url, "GET", f"{VIRTUAL_SERVICES}/{SERVICE}"))
        assert await get(url, f"{DESTINATION_RULES}/{SERVICE}") is None

    asyncio.run(scenario())


def test_a_second_policy_naming_a_governed_service_is_invalid_and_touches_nothing(
    cluster: Any,
) -> None:
    """Two policies naming one EdgeService would fight over its weights. The older one
    governs it (``a-rival`` sorts first by name: only its age makes it the second); the
    other is Invalid, and its deletion gives back nothing. Once the first is deleted, the
    second takes the service over."""
    runtime, _ = new_runtime(cluster.kubeconfig, example_mesh())
    rival = policy_body()
    rival["metadata"]["name"] = "a-rival"
    rival_key = f"{NAMESPACE}/a-rival"

    async def scenario() -> None:
        url = cluster.url
        await create_resources(url)
        async with operating(url, runtime):
            await kube(url, "POST", POLICIES, policy_body())
            await eventually(outcome_is(runtime, Outcome.APPLIED), what="a first cycle")
            await asyncio.sleep(1.1)  # creation times are in whole seconds
            await kube(url, "POST", POLICIES, rival)

            async def rival_invalid() -> bool:
                report = runtime.store.latest(rival_key)
                return report is not None and report.outcome == Outcome.INVALID

            await eventually(rival_invalid, what="the rival refused")
            reason = runtime.store.latest(rival_key).reason
            assert reason.startswith("spec.services: already governed") and KEY in reason
            status = (await kube(url, "GET", f"{POLICIES}/a-rival"))["status"]
            assert status["phase"] == "Failed" and not status.get("services")
            vs = await kube(url, "GET", f"{VIRTUAL_SERVICES}/{SERVICE}")

            await kube(url, "DELETE", f"{POLICIES}/a-rival")

            await eventually(gone(url, f"{POLICIES}/a-rival"), what="the rival's deletion")
            after = await kube(url, "GET", f"{VIRTUAL_SERVICES}/{SERVICE}")
            # Still the first policy's: a restore would have taken the operator's marks off.
            assert after["metadata"]["labels"] == vs["metadata"]["labels"]
            assert SERVICE_ANNOTATION in after["metadata"]["annotations"]

            await kube(url, "POST", POLICIES, rival)
            await eventually(rival_invalid, what="the rival refused again")
            await kube(url, "DELETE", f"{POLICIES}/{POLICY}")

            async def rival_governs() -> bool:
                report = runtime.store.latest(rival_key)
                return report is not None and report.outcome in (
                    Outcome.APPLIED,
                    Outcome.UNCHANGED,
                )

            await eventually(rival_governs, timeout=30, what="the rival taking over")

    asyncio.run(scenario())


def test_deleting_the_policy_during_a_cycle_still_restores(cluster: Any) -> None:
    """kopf stops a deleted policy's daemon and runs the delete handler at the same time, so a
    cycle may still be running (here: held while reading metrics) when the routes are
    restored; what it writes afterwards must not take the user's object over again."""
    runtime, reader = new_runtime(cluster.kubeconfig, example_mesh())

    async def scenario() -> None:
        url = cluster.url
        await take_over_then_delete(url, runtime, reader, mid_cycle=True)
        assert_restored(await kube(url, "GET", f"{VIRTUAL_SERVICES}/{SERVICE}"))
        assert await get(url, f"{DESTINATION_RULES}/{SERVICE}") is None
        assert KEY not in runtime.controllers

    asyncio.run(scenario())


def test_a_cycle_that_does_not_end_holds_a_deletion_only_so_long(
    cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cycle stuck past DELETE_WAIT_S (here 1 s) must not keep the policy's finalizer, and
    so the policy, for ever: the delete handler and the runtime each wait that long."""
    monkeypatch.setattr(handlers, "DELETE_WAIT_S", 1.0)
    monkeypatch.setattr(runtime_module, "DELETE_WAIT_S", 1.0)
    runtime, reader = new_runtime(cluster.kubeconfig, example_mesh())

    async def scenario() -> None:
        url = cluster.url
        await create_resources(url)
        async with operating(url, runtime):
            await kube(url, "POST", POLICIES, policy_body())
            await eventually(outcome_is(runtime, Outcome.APPLIED), what="a first cycle")
            reader.gate.clear()
            reader.held.clear()
            try:
                await eventually(is_set(reader.held), what="a cycle held at the gate")
                await kube(url, "DELETE", f"{POLICIES}/{POLICY}")

                await eventually(
                    gone(url, f"{POLICIES}/{POLICY}"), timeout=15, what="the policy's deletion"
                )
                assert not reader.gate.is_set()  # while the cycle is still held
            finally:
                reader.gate.set()

    asyncio.run(scenario())


def test_a_policy_that_cannot_be_built_any_more_still_gives_its_routes_back(
    cluster: Any,
) -> None:
    """``kubectl delete -f examples/`` deletes the EdgeService before the policy. A restarted
    operator can then not build the policy to find its objects: the status names them."""
    runtime, _ = new_runtime(cluster.kubeconfig, example_mesh())

    async def scenario() -> None:
        url = cluster.url
        await create_resources(url, user_routes=True)
        async with operating(url, runtime):
            await kube(url, "POST", POLICIES, policy_body())

            async def recorded() -> list[str]:
                services = (await policy_status(url)).get("services") or [{}]
                return services[0].get("meshObjects") or []

            objects = await eventually(recorded, what="the mesh objects in the status")
        assert sorted(objects) == [f"DestinationRule/{SERVICE}", f"VirtualService/{SERVICE}"]
        await kube(url, "DELETE", f"{EDGE_SERVICES}/{SERVICE}")
        restarted, _ = new_runtime(cluster.kubeconfig, example_mesh())
        async with operating(url, restarted):
            await kube(url, "DELETE", f"{POLICIES}/{POLICY}")

            await eventually(
                gone(url, f"{POLICIES}/{POLICY}"), timeout=20, what="the policy's deletion"
            )
        assert_restored(await kube(url, "GET", f"{VIRTUAL_SERVICES}/{SERVICE}"))
        assert await get(url, f"{DESTINATION_RULES}/{SERVICE}") is None

    asyncio.run(scenario())


def test_metrics_outage_holds_falls_back_and_recovers(cluster: Any) -> None:
    fake = example_mesh()
    runtime, _ = new_runtime(cluster.kubeconfig, fake)
    body = policy_body(safety={"failureThreshold": 2, "fallback": "local"})

    async def scenario() -> None:
        url = cluster.url
        async with operating(url, runtime):
            await create_resources(url, body)
            await eventually(lambda: phase_is(url, "Active"), what="phase Active")
            fake.down = True
            held = await eventually(lambda: phase_is(url, "Holding"), what="phase Holding")
            assert conditions(held)["MetricsAvailable"]["status"] == "False"
            assert "unreachable" in conditions(held)["MetricsAvailable"]["message"]
            assert conditions(held)["Fallback"]["status"] == "False"
            fallen = await eventually(lambda: phase_is(url, "Fallback"), what="phase Fallback")
            assert conditions(fallen)["Fallback"]["status"] == "True"
            assert conditions(fallen)["MetricsAvailable"]["status"] == "False"
            # The local fallback keeps every node's traffic on the node.
            vs = await kube(url, "GET", f"{VIRTUAL_SERVICES}/{SERVICE}")
            assert route_table(vs) == {n: {n: 100} for n in NODE_NAMES}
            assert await eventually(lambda: events(url, "WeightsHeld"), what="WeightsHeld")
            assert await eventually(lambda: events(url, "FallbackActivated"), what="the event")
            fake.down = False
            back = await eventually(lambda: phase_is(url, "Active"), what="Active again")
            assert conditions(back)["MetricsAvailable"]["status"] == "True"
            assert conditions(back)["Fallback"]["status"] == "False"
            # Read before kopf exits: the runtime then forgets the policy (it stands down).
            outcomes = [r.outcome for r in runtime.store.history(KEY)]
        first_held = outcomes.index(Outcome.HELD)
        assert outcomes[first_held : first_held + 2] == [Outcome.HELD, Outcome.FALLBACK]

    asyncio.run(scenario())


def test_a_restarted_operator_counts_on_the_failed_intervals_of_an_outage(cluster: Any) -> None:
    """The status carries how many intervals failed in a row, and the daemon hands it to the
    first build after a restart: the outage is not forgotten with the process."""
    fake = example_mesh()
    body = policy_body(safety={"failureThreshold": 50, "fallback": "local"})

    async def failing(url: str) -> int | None:
        count = (await policy_status(url)).get("consecutiveFailures") or 0
        return count if count >= 2 else None

    async def scenario() -> None:
        url = cluster.url
        first, _ = new_runtime(cluster.kubeconfig, fake)
        async with operating(url, first):
            await create_resources(url, body)
            await eventually(lambda: phase_is(url, "Active"), what="phase Active")
            fake.down = True
            await eventually(lambda: failing(url), what="failed intervals in the status")
        before = (await policy_status(url))["consecutiveFailures"]

        restarted, _ = new_runtime(cluster.kubeconfig, fake)
        async with operating(url, restarted):
            report = await eventually(latest(restarted), what="the first cycle after restart")
        assert report.outcome == Outcome.HELD, report.reason
        assert report.failures == before + 1

    asyncio.run(scenario())


def test_routes_leave_an_edge_node_whose_kubernetes_node_is_not_ready(cluster: Any) -> None:
    """The Node's Ready condition, read from the API server, takes the edge node out of every
    route within a cycle of the inventory's next read, and the status names it."""
    fake = example_mesh()
    runtime, _ = new_runtime(cluster.kubeconfig, fake)
    runtime.inventory.refresh_s = 0.5

    async def scenario() -> None:
        url = cluster.url
        async with operating(url, runtime):
            await create_resources(url, policy_body())
            active = await eventually(lambda: phase_is(url, "Active"), what="phase Active")
            assert conditions(active)["NodesReady"]["status"] == "True"
            not_ready = {"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown"}
            await kube(
                url,
                "PATCH",
                "/api/v1/nodes/kind-worker2/status",
                {"status": {"conditions": [not_ready]}},
            )

            async def down() -> dict[str, Any] | None:
                status = await policy_status(url)
                ready = conditions(status).get("NodesReady", {})
                return status if ready.get("status") == "False" else None

            status = await eventually(down, what="NodesReady False")
            message = conditions(status)["NodesReady"]["message"]
            assert "edge-1: none of its Kubernetes nodes is Ready (kind-worker2" in message
            vs = await kube(url, "GET", f"{VIRTUAL_SERVICES}/{SERVICE}")
            table = route_table(vs)
            assert set(table) == set(NODE_NAMES)
            assert all(row.get("edge-1", 0) == 0 for row in table.values()), table
            catch_all = read_virtual_service(MESH_SERVICE, MESH_NODES, vs).default
            assert catch_all and catch_all.get("edge-1", 0) == 0, catch_all
            edge_node = await kube(url, "GET", f"{EDGE_NODES}/edge-1")
            (ready,) = edge_node["status"]["conditions"]
            assert ready["status"] == "False" and edge_node["status"]["kubernetesNodes"] == [
                "kind-worker2"
            ]

    asyncio.run(scenario())


def test_a_service_leaves_an_edge_node_without_a_ready_pod_of_it(cluster: Any) -> None:
    """The node stays up, but its pod of fn stops being ready (read through the Service fn's
    selector): fn's routes leave it, its catch-all too, and PodsReady names it; once the pod
    is ready again, routes come back."""
    fake = example_mesh()
    runtime, _ = new_runtime(cluster.kubeconfig, fake)
    runtime.inventory.refresh_s = 0.5
    pod = "/api/v1/namespaces/edge/pods/fn-edge-1-0/status"

    async def pods_ready(url: str, status: str) -> dict[str, Any] | None:
        status_now = await policy_status(url)
        ready = conditions(status_now).get("PodsReady", {})
        return status_now if ready.get("status") == status else None

    async def scenario() -> None:
        url = cluster.url
        async with operating(url, runtime):
            await create_resources(url, policy_body())
            await eventually(lambda: phase_is(url, "Active"), what="phase Active")
            await eventually(lambda: pods_ready(url, "True"), what="PodsReady True")
            not_ready = {"type": "Ready", "status": "False", "reason": "ContainersNotReady"}
            await kube(url, "PATCH", pod, {"status": {"conditions": [not_ready]}})
            status = await eventually(lambda: pods_ready(url, "False"), what="PodsReady False")
            message = conditions(status)["PodsReady"]["message"]
            assert "fn on edge-1: none of its 1 pods is ready (fn-edge-1-0: Ready is False" in (
                message
            )
            assert conditions(status)["NodesReady"]["status"] == "True"
            vs = await kube(url, "GET", f"{VIRTUAL_SERVICES}/{SERVICE}")
            table = route_table(vs)
            assert all(row.get("edge-1", 0) == 0 for row in table.values()), table
            catch_all = read_virtual_service(MESH_SERVICE, MESH_NODES, vs).default
            assert catch_all and catch_all.get("edge-1", 0) == 0, catch_all
            ready = {"type": "Ready", "status": "True"}
            await kube(url, "PATCH", pod, {"status": {"conditions": [ready]}})
            await eventually(lambda: pods_ready(url, "True"), what="PodsReady True again")

    asyncio.run(scenario())


class ConflictingKube(Kube):
    """Kube where another writer changes the VirtualService between KubeMesh's read and its
    first patch of it (once), so that patch carries a stale resourceVersion."""

    def __init__(self, api: client.ApiClient):
        super().__init__(api)
        self.interfered = False
        self.conflicts = 0

    def patch(self, namespace: str, kind: str, name: str, patch: Any) -> None:
        if kind == "VirtualService" and not self.interfered:
            self.interfered = True
            other = {"metadata": {"annotations": {"other-writer": "was here"}}}
            super().patch(namespace, kind, name, other)
        try:
            super().patch(namespace, kind, name, patch)
        except client.ApiException as error:
            self.conflicts += error.status == 409
            raise


class SubsetWatchingKube(Kube):
    """Kube that checks, after every write, what a sidecar would meet at that moment: each
    subset the live VirtualService routes to is defined in the live DestinationRule."""

    def __init__(self, api: client.ApiClient):
        super().__init__(api)
        self.dangling: list[set[str]] = []

    def _check(self) -> None:
        vs = self.get(NAMESPACE, "VirtualService", SERVICE) or {"spec": {}}
        dr = self.get(NAMESPACE, "DestinationRule", SERVICE) or {"spec": {}}
        routed = {
            route["destination"].get("subset")
            for rule in vs["spec"].get("http") or []
            for route in rule.get("route") or []
        } - {None}  # a route to the whole service needs no subset
        if missing := routed - {s["name"] for s in dr["spec"].get("subsets") or []}:
            self.dangling.append(missing)

    def create(self, manifest: Any, *, dry_run: bool = False) -> None:
        super().create(manifest, dry_run=dry_run)
        if not dry_run:
            self._check()

    def patch(self, *args: Any, dry_run: bool = False) -> None:
        super().patch(*args, dry_run=dry_run)
        if not dry_run:
            self._check()

    def delete(self, *args: Any) -> None:
        super().delete(*args)
        self._check()


def test_no_write_leaves_a_route_to_a_subset_that_is_gone(cluster: Any) -> None:
    """Through the API server: a node leaving the policy keeps its subset until the write
    after the one that moved its routes away, a node joining has its subset before a route
    names it, and deleting the policy removes the routes before the subsets."""
    watching = SubsetWatchingKube(client.ApiClient(client_configuration(cluster.kubeconfig)))
    mesh = KubeMesh(watching)
    two = MESH_NODES[:2]
    even = {n: {m: w for m, w in zip(NODE_NAMES, (34, 33, 33), strict=True)} for n in NODE_NAMES}
    assert mesh.write(MESH_SERVICE, build_routes({}, two))
    assert mesh.write(MESH_SERVICE, build_routes(even, MESH_NODES))  # edge-2 joins
    only_two = build_routes({n: {m: 50 for m in NODE_NAMES[:2]} for n in NODE_NAMES[:2]}, two)

    assert mesh.write(MESH_SERVICE, only_two)  # edge-2 leaves

    subsets = watching.get(NAMESPACE, "DestinationRule", SERVICE)["spec"]["subsets"]
    assert [s["name"] for s in subsets] == ["node-edge-0", "node-edge-1", "node-edge-2"]
    assert mesh.read(MESH_SERVICE, two) == only_two
    assert mesh.write(MESH_SERVICE, only_two)  # the subset goes now
    subsets = watching.get(NAMESPACE, "DestinationRule", SERVICE)["spec"]["subsets"]
    assert [s["name"] for s in subsets] == ["node-edge-0", "node-edge-1"]
    assert not mesh.write(MESH_SERVICE, only_two)
    done = mesh.restore(MESH_SERVICE, two)
    assert done == [f"deleted VirtualService/{SERVICE}", f"deleted DestinationRule/{SERVICE}"]
    assert watching.dangling == []


def test_the_api_server_sees_the_operator_by_name() -> None:
    """The API server names the field manager of a write after the caller's user agent: the
    client's own default ("OpenAPI-Generator/...") told no one who rewrote a route."""
    agents: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            agents.append(self.headers.get("User-Agent", ""))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        configuration = client.Configuration()
        configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
        assert Kube(TimedApiClient(configuration)).get(NAMESPACE, "VirtualService", "fn") is None
    finally:
        server.shutdown()
        server.server_close()
    assert agents == [USER_AGENT] and USER_AGENT.startswith("marl-operator/")


def test_an_api_server_that_never_answers_times_out() -> None:
    """A connection the API server accepts and never answers (a half-open connection after a
    control-plane failover) fails the call after the client's timeout, as a cycle's failure,
    instead of holding the cycle's worker for ever."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        configuration = client.Configuration()
        configuration.host = f"http://127.0.0.1:{silent.getsockname()[1]}"
        configuration.retries = 0
        cluster = Kube(TimedApiClient(configuration, timeout=(1.0, 0.5)))
        outcome: list[BaseException] = []

        def call() -> None:
            try:
                cluster.edge_nodes()
            except Exception as error:  # what the runtime's cycle catches
                outcome.append(error)

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(timeout=20)
        assert not worker.is_alive(), "the call is still waiting for an answer"
    assert outcome and "timed out" in str(outcome[0]).lower()


def test_restoring_by_name_touches_only_what_the_operator_manages_for_that_service(
    cluster: Any,
) -> None:
    """The names come from a status anyone allowed to patch it could edit: an object is
    only given back if the operator manages it for the EdgeService named."""
    cluster_kube = Kube(TimedApiClient(client_configuration(cluster.kubeconfig)))
    mesh = KubeMesh(cluster_kube)
    even = {n: {m: w for m, w in zip(NODE_NAMES, (34, 33, 33), strict=True)} for n in NODE_NAMES}
    assert mesh.write(MESH_SERVICE, build_routes(even, MESH_NODES))
    objects = [("VirtualService", SERVICE), ("DestinationRule", SERVICE)]
    assert mesh.restore_objects(NAMESPACE, f"{NAMESPACE}/other", objects) == []
    assert mesh.read(MESH_SERVICE, MESH_NODES).by_source == even
    done = mesh.restore_objects(NAMESPACE, MESH_SERVICE.ref, objects)
    assert done == [f"deleted VirtualService/{SERVICE}", f"deleted DestinationRule/{SERVICE}"]
    assert mesh.read(MESH_SERVICE, MESH_NODES) is None


def test_a_conflicting_write_is_retried(cluster: Any) -> None:
    cluster_kube = ConflictingKube(client.ApiClient(client_configuration(cluster.kubeconfig)))
    mesh = KubeMesh(cluster_kube)
    even = {n: {m: w for m, w in zip(NODE_NAMES, (34, 33, 33), strict=True)} for n in NODE_NAMES}
    assert mesh.write(MESH_SERVICE, build_routes(even, MESH_NODES))  # creates both objects
    before = cluster_kube.get(NAMESPACE, "VirtualService", SERVICE)
    assert not cluster_kube.interfered  # creates are not patches
    local = {n: {n: 80, **{m: 10 for m in NODE_NAMES if m != n}} for n in NODE_NAMES}

    assert mesh.write(MESH_SERVICE, build_routes(local, MESH_NODES))

    assert cluster_kube.interfered and cluster_kube.conflicts == 1
    after = cluster_kube.get(NAMESPACE, "VirtualService", SERVICE)
    assert route_table(after) == local
    assert after["metadata"]["annotations"]["other-writer"] == "was here"  # not undone
    assert int(after["metadata"]["resourceVersion"]) > int(before["metadata"]["resourceVersion"])
    assert mesh.read(MESH_SERVICE, MESH_NODES).by_source == local


def test_an_edit_is_acted_on_without_waiting_out_the_old_interval(cluster: Any) -> None:
    """The daemon slept the whole interval of the spec it last ran (up to an hour) before it
    read the policy again: shortening it, or suspending the policy, waited as long."""
    runtime, _ = new_runtime(cluster.kubeconfig, example_mesh())
    runtime.interval = lambda key: Runtime.interval(runtime, key)  # type: ignore[method-assign]

    async def scenario() -> None:
        url = cluster.url
        async with operating(url, runtime):
            await create_resources(url, policy_body(intervalSeconds=3600))
            await eventually(lambda: phase_is(url, "Active"), timeout=20, what="phase Active")
            edit = {"spec": {"intervalSeconds": 5, "suspend": True}}
            await kube(url, "PATCH", f"{POLICIES}/{POLICY}", edit)
            await eventually(lambda: phase_is(url, "Suspended"), timeout=10, what="phase Suspended")

    asyncio.run(scenario())


def test_a_refused_status_write_does_not_stop_the_control_loop(
    cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The API server refusing a status patch for a moment (503) costs that status, not the
    daemon: kopf would restart a failed daemon only after a minute."""
    runtime, _ = new_runtime(cluster.kubeconfig, example_mesh())
    patch_status = runtime.kube.patch_policy_status
    refusals = [client.ApiException(status=503, reason="Service Unavailable")] * 2

    def flaky(namespace: str, name: str, status: Any) -> None:
        if refusals:
            raise refusals.pop()
        patch_status(namespace, name, status)

    runtime.kube.patch_policy_status = flaky  # type: ignore[method-assign]

    async def scenario() -> None:
        url = cluster.url
        async with operating(url, runtime):
            await create_resources(url, policy_body())
            status = await eventually(
                lambda: phase_is(url, "Active"), timeout=20, what="a status after the refusals"
            )
            assert not refusals and len(runtime.store.history(KEY)) >= 3
        assert status["observedGeneration"] >= 1

    caplog.set_level(logging.WARNING, logger="marl_operator.handlers")
    asyncio.run(scenario())
    refused = [r for r in caplog.records if r.getMessage().startswith(f"status of {KEY} not")]
    assert len(refused) == 2 and "503" in refused[0].getMessage()


def test_a_restarted_operator_rewrites_nothing(cluster: Any) -> None:
    """After a restart the model is fresh, so a rollout decision could legitimately differ
    from the last one before it. Here it cannot: the fake's load and capacity do not change,
    the first operator runs until its decision is a fixed point (outcome Unchanged: the
    decision equals what the mesh carries), and both its model and the fresh one decide on the
    queueing prior (too few intervals for a learned model) from the same readings; with
    controller seed 0 that decision is deterministic. So the restarted operator's first
    cycle must be Unchanged and must not write: same resourceVersions."""
    fake = example_mesh()

    async def scenario() -> None:
        url = cluster.url
        first, _ = new_runtime(cluster.kubeconfig, fake)
        async with operating(url, first):
            await create_resources(url, policy_body())
            await eventually(outcome_is(first, Outcome.UNCHANGED), timeout=20, what="a fixed point")
            assert "queueing prior" in first.store.latest(KEY).reason
            weights = first.store.latest(KEY).weights
        versions = {
            path: (await kube(url, "GET", f"{path}/{SERVICE}"))["metadata"]["resourceVersion"]
            for path in (VIRTUAL_SERVICES, DESTINATION_RULES)
        }

        restarted, _ = new_runtime(cluster.kubeconfig, fake)
        async with operating(url, restarted):
            report = await eventually(latest(restarted), what="the first cycle after restart")
            assert report.outcome == Outcome.UNCHANGED, report.reason
            assert "queueing prior" in report.reason
            assert report.weights == weights
            for path, version in versions.items():
                now = await kube(url, "GET", f"{path}/{SERVICE}")
                assert now["metadata"]["resourceVersion"] == version, path

    asyncio.run(scenario())


# --- refused by RBAC (403) ----------------------------------------------------------------------

VS_RESOURCE = "virtualservices.networking.istio.io"


def test_a_refused_write_leaves_every_object_of_the_service_as_it_was(cluster: Any) -> None:
    """KubeMesh against the emulator refusing verbs as a real API server does: a write that
    would change two objects is rehearsed (server-side dry run) first, so a 403 on the second
    one leaves the first untouched, and the error names the verb, resource and namespace."""
    cluster_kube = Kube(client.ApiClient(client_configuration(cluster.kubeconfig)))
    mesh = KubeMesh(cluster_kube)
    even = {n: {m: w for m, w in zip(NODE_NAMES, (34, 33, 33), strict=True)} for n in NODE_NAMES}
    local = {n: {n: 80, **{m: 10 for m in NODE_NAMES if m != n}} for n in NODE_NAMES}

    # Nothing yet: the DestinationRule (created first) must not appear without its route.
    cluster.api.deny("create", VS_RESOURCE, NAMESPACE)
    with pytest.raises(Forbidden) as refused:
        mesh.write(MESH_SERVICE, build_routes(even, MESH_NODES))
    error = refused.value
    assert (error.verb, error.resource, error.group, error.namespace) == (
        "create",
        "virtualservices",
        "networking.istio.io",
        NAMESPACE,
    )
    assert f"may not create {VS_RESOURCE} in namespace {NAMESPACE}" in str(error)
    assert cluster_kube.get(NAMESPACE, "DestinationRule", SERVICE) is None
    assert cluster_kube.get(NAMESPACE, "VirtualService", SERVICE) is None
    cluster.api.allow("create", VS_RESOURCE, NAMESPACE)
    assert mesh.write(MESH_SERVICE, build_routes(even, MESH_NODES))

    # Both objects to patch (someone emptied the subsets, and the weights change): the
    # refused VirtualService patch leaves the DestinationRule as it was found, too.
    cluster_kube.patch(NAMESPACE, "DestinationRule", SERVICE, {"spec": {"subsets": []}})
    edited = cluster_kube.get(NAMESPACE, "DestinationRule", SERVICE)
    vs = cluster_kube.get(NAMESPACE, "VirtualService", SERVICE)
    cluster.api.deny("patch", VS_RESOURCE)
    with pytest.raises(Forbidden, match=f"may not patch {VS_RESOURCE} in namespace {NAMESPACE}"):
        mesh.write(MESH_SERVICE, build_routes(local, MESH_NODES))
    assert cluster_kube.get(NAMESPACE, "DestinationRule", SERVICE) == edited
    assert cluster_kube.get(NAMESPACE, "VirtualService", SERVICE) == vs
    cluster.api.allow("patch", VS_RESOURCE)
    assert mesh.write(MESH_SERVICE, build_routes(local, MESH_NODES))
    assert mesh.read(MESH_SERVICE, MESH_NODES).by_source == local
    dr = cluster_kube.get(NAMESPACE, "DestinationRule", SERVICE)
    assert [s["name"] for s in dr["spec"]["subsets"]] == [f"node-{n}" for n in NODE_NAMES]

    # Not even allowed to read: the same error, for get.
    cluster.api.deny("get", VS_RESOURCE, NAMESPACE)
    with pytest.raises(Forbidden, match=f"may not get {VS_RESOURCE}"):
        mesh.read(MESH_SERVICE, MESH_NODES)
    with pytest.raises(Forbidden, match=f"may not get {VS_RESOURCE}"):
        mesh.write(MESH_SERVICE, build_routes(even, MESH_NODES))


def test_a_users_object_is_taken_over_only_once_its_owner_opts_in(cluster: Any) -> None:
    """Without the adopt annotation the write is refused naming it, and nothing is written:
    neither the user's VirtualService nor the DestinationRule beside it. Annotated, the
    same write takes the object over."""
    cluster_kube = Kube(client.ApiClient(client_configuration(cluster.kubeconfig)))
    mesh = KubeMesh(cluster_kube)
    user = copy.deepcopy(USER_VIRTUAL_SERVICE)
    del user["metadata"]["annotations"][ADOPT_ANNOTATION]
    cluster_kube.create(user)
    before = cluster_kube.get(NAMESPACE, "VirtualService", SERVICE)
    local = build_routes({n: {n: 100} for n in NODE_NAMES}, MESH_NODES)
    with pytest.raises(MeshError, match=f"{ADOPT_ANNOTATION}=true"):
        mesh.write(MESH_SERVICE, local)
    assert cluster_kube.get(NAMESPACE, "VirtualService", SERVICE) == before
    assert cluster_kube.get(NAMESPACE, "DestinationRule", SERVICE) is None

    cluster_kube.patch(
        NAMESPACE,
        "VirtualService",
        SERVICE,
        {"metadata": {"annotations": {ADOPT_ANNOTATION: "true"}}},
    )
    assert mesh.write(MESH_SERVICE, local)
    assert mesh.read(MESH_SERVICE, MESH_NODES).by_source == {n: {n: 100} for n in NODE_NAMES}


def test_a_taken_over_object_keeps_its_owners_rules_through_writes_and_is_given_back(
    cluster: Any,
) -> None:
    """Through the API server: the owner's canary rule and second host survive the takeover
    and every later write, a write that changes nothing sends nothing, and deleting gives
    the routes back while an edit of the owner's made meanwhile elsewhere stays."""
    cluster_kube = Kube(client.ApiClient(client_configuration(cluster.kubeconfig)))
    mesh = KubeMesh(cluster_kube)
    user = copy.deepcopy(USER_VIRTUAL_SERVICE)
    canary = {
        "name": "canary",
        "match": [{"headers": {"x-canary": {"exact": "1"}}}],
        "route": [{"destination": {"host": MESH_SERVICE.host, "subset": "v2"}}],
    }
    user["spec"]["hosts"].append("fn.example.com")
    user["spec"]["http"].insert(0, canary)
    cluster_kube.create(user)
    local = build_routes({n: {n: 100} for n in NODE_NAMES}, MESH_NODES)
    even = {n: {m: w for m, w in zip(NODE_NAMES, (34, 33, 33), strict=True)} for n in NODE_NAMES}

    for table in (local, build_routes(even, MESH_NODES)):
        assert mesh.write(MESH_SERVICE, table)
        vs = cluster_kube.get(NAMESPACE, "VirtualService", SERVICE)
        assert vs["spec"]["http"][0] == canary
        assert vs["spec"]["hosts"] == [MESH_SERVICE.host, "fn.example.com"]
        assert all(rule["timeout"] == "3s" for rule in vs["spec"]["http"][1:])
        assert mesh.read(MESH_SERVICE, MESH_NODES) == table
    assert not mesh.write(MESH_SERVICE, build_routes(even, MESH_NODES))

    cluster_kube.patch(NAMESPACE, "VirtualService", SERVICE, {"spec": {"exportTo": ["."]}})
    done = mesh.restore(MESH_SERVICE, MESH_NODES)
    assert done == [f"restored VirtualService/{SERVICE}", f"deleted DestinationRule/{SERVICE}"]
    back = cluster_kube.get(NAMESPACE, "VirtualService", SERVICE)
    assert back["spec"] == user["spec"] | {"exportTo": ["."]}


def test_a_restore_the_api_refuses_for_good_is_reported_and_the_rest_given_back(
    cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admission webhook denying the restored VirtualService (400/422) failed the whole
    restore, and kopf retried the deletion for ever; now the refusal is named and the
    restore ends (the DestinationRule stays while the VirtualService routes to its
    subsets). A conflict is retried as before."""
    cluster_kube = Kube(client.ApiClient(client_configuration(cluster.kubeconfig)))
    mesh = KubeMesh(cluster_kube)
    cluster_kube.create(copy.deepcopy(USER_VIRTUAL_SERVICE))
    assert mesh.write(MESH_SERVICE, build_routes({n: {n: 100} for n in NODE_NAMES}, MESH_NODES))
    answer = {"status": 422}
    patch = cluster_kube.patch

    def refusing(namespace, kind, name, body, **options):
        if kind == "VirtualService":
            raise ApiException(status=answer["status"], reason="denied by a webhook")
        return patch(namespace, kind, name, body, **options)

    monkeypatch.setattr(cluster_kube, "patch", refusing)
    with pytest.raises(RestoreIncomplete) as incomplete:
        mesh.restore(MESH_SERVICE, MESH_NODES)
    assert incomplete.value.done == []
    assert incomplete.value.failed == [
        "VirtualService/fn: the API server refused it: 422 denied by a webhook",
        "DestinationRule/fn: kept, since VirtualService/fn still routes to node-edge-0, "
        "node-edge-1, node-edge-2: give it back after them",
    ]
    answer["status"] = 409  # the object changed meanwhile: worth another attempt
    with pytest.raises(ApiException):
        mesh.restore(MESH_SERVICE, MESH_NODES)


@pytest.mark.parametrize(
    ("refusal", "said"),
    [
        # A webhook's 422, refused for good.
        (lambda kind: ApiException(status=422, reason="denied by a webhook"),
         "the API server refused it: 422 denied by a webhook"),
        # A 403 escaped as Forbidden: kopf retried the deletion every minute for good, the
        # policy stayed Terminating and no event said why.
        (lambda kind: Forbidden("patch", kind, NAMESPACE, SERVICE, "denied by a webhook"),
         "forbidden: the operator may not patch virtualservices.networking.istio.io"),
    ],
    ids=["422", "403"],
)  # fmt: skip
def test_routes_that_could_not_be_given_back_keep_the_subsets_they_name(
    cluster: Any, monkeypatch: pytest.MonkeyPatch, refusal: Any, said: str
) -> None:
    """The API server refusing the restored VirtualService for good (a webhook's 422) left
    it carrying the operator's routes to node-<name>, and the DestinationRule defining those
    subsets was deleted all the same: every request to the service met a subset that no
    longer exists (503 NC) until someone restored the VirtualService by hand."""
    watching = SubsetWatchingKube(client.ApiClient(client_configuration(cluster.kubeconfig)))
    mesh = KubeMesh(watching)
    watching.create(copy.deepcopy(USER_VIRTUAL_SERVICE))
    assert mesh.write(MESH_SERVICE, build_routes({n: {n: 100} for n in NODE_NAMES}, MESH_NODES))
    patch = watching.patch

    def refusing(namespace, kind, name, body, **options):
        if kind == "VirtualService":
            raise refusal(kind)
        return patch(namespace, kind, name, body, **options)

    monkeypatch.setattr(watching, "patch", refusing)
    with pytest.raises(RestoreIncomplete) as incomplete:
        mesh.restore(MESH_SERVICE, MESH_NODES)

    assert watching.dangling == []
    assert watching.get(NAMESPACE, "DestinationRule", SERVICE) is not None
    assert incomplete.value.failed[0].startswith(f"VirtualService/fn: {said}")
    assert any("DestinationRule/fn" in failed for failed in incomplete.value.failed)


def test_a_refused_write_carries_what_the_api_server_said(
    cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write a webhook refused was reported as "422 Unprocessable Entity", without the
    webhook's message, the one thing that says what to fix. It is not sent again: a
    refusal of the object itself stays one (a 409 conflict is retried on a fresh read)."""
    cluster_kube = Kube(client.ApiClient(client_configuration(cluster.kubeconfig)))
    mesh = KubeMesh(cluster_kube)
    sent = []

    def refusing(manifest, **options):
        sent.append(manifest["kind"])
        error = ApiException(status=422, reason="Unprocessable Entity")
        error.body = json.dumps(
            {"kind": "Status", "message": 'admission webhook "validation.istio.io" denied the '
             "request: configuration is invalid: weight 101 exceeds 100"}
        )  # fmt: skip
        raise error

    monkeypatch.setattr(cluster_kube, "create", refusing)
    routes = build_routes({n: {n: 100} for n in NODE_NAMES}, MESH_NODES)
    with pytest.raises(MeshError, match=r"422 Unprocessable Entity: admission webhook .* 101"):
        mesh.write(MESH_SERVICE, routes)
    assert len(sent) == 1


def test_an_object_carrying_another_edge_services_routes_is_not_written(cluster: Any) -> None:
    """Two policies' EdgeServices named the same VirtualService (one policy cannot: its
    problem refuses that): the second write is refused naming the owner, and the first
    service's objects stay as they were, instead of the two overwriting each other."""
    cluster_kube = Kube(client.ApiClient(client_configuration(cluster.kubeconfig)))
    mesh = KubeMesh(cluster_kube)
    even = {n: {m: w for m, w in zip(NODE_NAMES, (34, 33, 33), strict=True)} for n in NODE_NAMES}
    assert mesh.write(MESH_SERVICE, build_routes(even, MESH_NODES))
    kinds = ("VirtualService", "DestinationRule")
    before = [cluster_kube.get(NAMESPACE, kind, SERVICE) for kind in kinds]
    copied = dataclasses.replace(MESH_SERVICE, name="fn2", host=f"fn2.{NAMESPACE}.svc")
    local = {n: {n: 100} for n in NODE_NAMES}
    with pytest.raises(MeshError, match=f"carries the routes of EdgeService {MESH_SERVICE.ref}"):
        mesh.write(copied, build_routes(local, MESH_NODES))
    assert [cluster_kube.get(NAMESPACE, kind, SERVICE) for kind in kinds] == before


def test_another_service_s_object_created_during_a_write_is_not_taken_over(cluster: Any) -> None:
    """The same race as above: the other policy creates the objects between this write's
    read and its create. The create's conflict was retried on a fresh read without the
    owner's check, so the second service's routes replaced the first's."""
    cluster_kube = Kube(client.ApiClient(client_configuration(cluster.kubeconfig)))
    first = KubeMesh(cluster_kube)
    even = {n: {m: w for m, w in zip(NODE_NAMES, (34, 33, 33), strict=True)} for n in NODE_NAMES}

    class Racing(Kube):
        raced = False

        def create(self, manifest, *, dry_run=False):
            if not dry_run and not Racing.raced:
                Racing.raced = True
                assert first.write(MESH_SERVICE, build_routes(even, MESH_NODES))
            return super().create(manifest, dry_run=dry_run)

    second = KubeMesh(Racing(client.ApiClient(client_configuration(cluster.kubeconfig))))
    copied = dataclasses.replace(MESH_SERVICE, name="fn2", host=f"fn2.{NAMESPACE}.svc")
    local = {n: {n: 100} for n in NODE_NAMES}
    with pytest.raises(MeshError, match=f"carries the routes of EdgeService {MESH_SERVICE.ref}"):
        second.write(copied, build_routes(local, MESH_NODES))
    assert Racing.raced
    written = cluster_kube.get(NAMESPACE, "VirtualService", SERVICE)
    assert written["metadata"]["annotations"][SERVICE_ANNOTATION] == MESH_SERVICE.ref
    assert first.write(MESH_SERVICE, build_routes(even, MESH_NODES)) is False  # as it wrote


async def forbidden_message(url: str) -> str:
    """The message of the policy's WeightsApplied condition, once it is False for the reason
    Forbidden."""

    async def forbidden() -> dict[str, Any] | None:
        applied = conditions(await policy_status(url)).get("WeightsApplied", {})
        return applied if applied.get("reason") == "Forbidden" else None

    applied = await eventually(forbidden, what="Forbidden")
    assert applied["status"] == "False"
    return applied["message"]


def test_a_forbidden_mesh_write_is_a_condition_and_an_event(cluster: Any) -> None:
    """The operator without the rule to create VirtualServices: the policy's status says
    WeightsApplied=False (Forbidden) with what to grant, a Warning event says it too, nothing
    is written (not even the DestinationRule), and granting the rule lets the next cycle
    apply."""
    runtime, _ = new_runtime(cluster.kubeconfig, example_mesh())
    cluster.api.deny("create", VS_RESOURCE, NAMESPACE)

    async def scenario() -> None:
        url = cluster.url
        async with operating(url, runtime):
            await create_resources(url, policy_body())
            message = await forbidden_message(url)
            for words in (f"may not create {VS_RESOURCE}", f"namespace {NAMESPACE}", "RBAC"):
                assert words in message, words
            assert "ClusterRole" in message
            (event,) = await eventually(lambda: events(url, "Forbidden"), what="the event")
            assert event["type"] == "Warning" and event["message"] == message
            await eventually(lambda: events(url, "WeightsHeld"), what="WeightsHeld")
            for plural in (VIRTUAL_SERVICES, DESTINATION_RULES):
                assert (await kube(url, "GET", plural))["items"] == []
            # Retried every interval, but announced once.
            await eventually(
                lambda: asyncio.sleep(0, len(runtime.store.history(KEY)) >= 3), what="3 cycles"
            )
            assert len(await events(url, "Forbidden")) == 1

            cluster.api.allow("create", VS_RESOURCE, NAMESPACE)
            status = await eventually(lambda: phase_is(url, "Active"), what="phase Active")
            applied = conditions(status)["WeightsApplied"]
            assert applied["status"] == "True" and applied["reason"] == "Written"
            assert await get(url, f"{VIRTUAL_SERVICES}/{SERVICE}")
            assert await get(url, f"{DESTINATION_RULES}/{SERVICE}")

    asyncio.run(scenario())


def test_refused_reads_of_what_a_policy_is_built_from_raise_forbidden(
    cluster: Any, tmp_path: Path
) -> None:
    """Kube's reads of EdgeNodes, EdgeServices and ConfigMap checkpoints turn the emulator's
    403 into Forbidden naming the verb, the resource and its scope (a namespace, or the cluster
    for EdgeNodes); granted, they read as before."""
    api = client.ApiClient(client_configuration(cluster.kubeconfig))
    cluster_kube = Kube(api)
    for node in NODES:
        cluster_kube.custom.create_cluster_custom_object("marl.dev", "v1alpha1", "edgenodes", node)
    cluster_kube.custom.create_namespaced_custom_object(
        "marl.dev", "v1alpha1", NAMESPACE, "edgeservices", EDGE_SERVICE
    )
    bundled = checkpoint.BUNDLED / "mesh-10x3"
    client.CoreV1Api(api).create_namespaced_config_map(
        NAMESPACE,
        {
            "metadata": {"name": "my-policy"},
            "binaryData": {
                "policy.pt": base64.b64encode((bundled / "policy.pt").read_bytes()).decode()
            },
            "data": {"policy.json": (bundled / "policy.json").read_text()},
        },
    )

    cluster.api.deny("list", "edgenodes.marl.dev")
    with pytest.raises(Forbidden) as refused:
        cluster_kube.edge_nodes()
    error = refused.value
    assert (error.verb, error.group, error.resource, error.namespace) == (
        "list",
        "marl.dev",
        "edgenodes",
        "",
    )
    assert str(error).startswith(
        "forbidden: the operator may not list edgenodes.marl.dev at the cluster scope; "
    )
    assert "ClusterRole" in str(error) and "in namespace" not in str(error)
    cluster.api.allow("list", "edgenodes.marl.dev")
    assert {n["metadata"]["name"] for n in cluster_kube.edge_nodes()} == set(NODE_NAMES)

    cluster.api.deny("get", "edgeservices.marl.dev", NAMESPACE)
    with pytest.raises(Forbidden) as refused:
        cluster_kube.edge_services(NAMESPACE, (SERVICE,))
    assert (refused.value.resource, refused.value.namespace) == ("edgeservices", NAMESPACE)
    called = f"get edgeservices.marl.dev in namespace {NAMESPACE} (EdgeService {SERVICE})"
    assert f"may not {called}; " in str(refused.value)
    cluster.api.allow("get", "edgeservices.marl.dev", NAMESPACE)
    assert list(cluster_kube.edge_services(NAMESPACE, (SERVICE, "absent"))) == [SERVICE]

    cluster.api.deny("get", "configmaps", NAMESPACE)
    with pytest.raises(Forbidden) as refused:
        cluster_kube.checkpoint_from_configmap(NAMESPACE, "my-policy", "policy", tmp_path)
    assert (refused.value.group, refused.value.resource) == ("", "configmaps")
    assert f"may not get configmaps in namespace {NAMESPACE} (ConfigMap my-policy)" in str(
        refused.value
    )
    assert 'apiGroups [""], resources [configmaps], verbs [get]' in str(refused.value)
    cluster.api.allow("get", "configmaps", NAMESPACE)
    cluster_kube.checkpoint_from_configmap(NAMESPACE, "my-policy", "policy", tmp_path)
    assert (tmp_path / "policy.pt").read_bytes() == (bundled / "policy.pt").read_bytes()
    # An absent ConfigMap is the spec's mistake (a condition naming the field), not a crash.
    with pytest.raises(FileNotFoundError, match=f"no ConfigMap {NAMESPACE}/absent"):
        cluster_kube.checkpoint_from_configmap(NAMESPACE, "absent", "policy", tmp_path)


def test_a_forbidden_edge_service_read_is_a_condition_and_an_event(cluster: Any) -> None:
    """The operator without the rule to get EdgeServices cannot build the policy: its status
    says WeightsApplied=False (Forbidden) naming edgeservices and the rule, Ready=False, a
    Warning event says it too, nothing is written to the mesh, and granting the rule lets the
    next cycle build the policy and apply its weights (no restart)."""
    runtime, _ = new_runtime(cluster.kubeconfig, example_mesh())
    cluster.api.deny("get", "edgeservices.marl.dev", NAMESPACE)

    async def scenario() -> None:
        url = cluster.url
        async with operating(url, runtime):
            await create_resources(url, policy_body())
            message = await forbidden_message(url)
            for words in (
                f"may not get edgeservices.marl.dev in namespace {NAMESPACE}",
                "RBAC rule (apiGroups [marl.dev], resources [edgeservices], verbs [get])",
                "rbac.create=true",
            ):
                assert words in message, words
            status = await policy_status(url)
            assert status["phase"] == "Holding"
            ready = conditions(status)["Ready"]
            assert ready["status"] == "False" and ready["message"].startswith("forbidden")
            (event,) = await eventually(lambda: events(url, "Forbidden"), what="the event")
            assert event["type"] == "Warning" and event["message"] == message
            await eventually(lambda: events(url, "WeightsHeld"), what="WeightsHeld")
            # Retried every interval, but announced once; nothing reaches the mesh.
            await eventually(
                lambda: asyncio.sleep(0, len(runtime.store.history(KEY)) >= 3), what="3 cycles"
            )
            assert len(await events(url, "Forbidden")) == 1
            for plural in (VIRTUAL_SERVICES, DESTINATION_RULES):
                assert (await kube(url, "GET", plural))["items"] == []

            cluster.api.allow("get", "edgeservices.marl.dev", NAMESPACE)
            status = await eventually(lambda: phase_is(url, "Active"), what="phase Active")
            applied = conditions(status)["WeightsApplied"]
            assert applied["status"] == "True" and applied["reason"] == "Written"
            assert conditions(status)["Ready"]["status"] == "True"
            assert await get(url, f"{VIRTUAL_SERVICES}/{SERVICE}")
            assert await get(url, f"{DESTINATION_RULES}/{SERVICE}")

    asyncio.run(scenario())


# --- one cycle per policy at a time -------------------------------------------------------------


def test_a_daemon_skips_cycles_while_an_earlier_cycle_of_its_policy_runs(cluster: Any) -> None:
    """A cycle started before this daemon (by a daemon kopf has since stopped, say, on a
    peering pause) is still held reading metrics when the daemon starts: the daemon's cycles
    are skipped (counted, no status written), never run alongside it, and once it ends the
    daemon's next cycle runs as usual."""
    runtime, reader = new_runtime(cluster.kubeconfig, example_mesh())
    overlap = {"now": 0, "most": 0}
    guard = threading.Lock()
    build = runtime.build

    def counting_build(key: str, body: Any) -> Any:
        controller = build(key, body)
        cycle = controller.cycle

        def counted() -> Any:
            with guard:
                overlap["now"] += 1
                overlap["most"] = max(overlap["most"], overlap["now"])
            try:
                return cycle()
            finally:
                with guard:
                    overlap["now"] -= 1

        controller.cycle = counted
        return controller

    runtime.build = counting_build  # type: ignore[method-assign]

    async def scenario() -> None:
        url = cluster.url
        await create_resources(url, policy_body())
        policy = await kube(url, "GET", f"{POLICIES}/{POLICY}")
        reader.gate.clear()
        earlier = threading.Thread(
            target=runtime.cycle, args=(KEY, {"metadata": policy["metadata"], **policy})
        )
        earlier.start()
        try:
            await eventually(is_set(reader.held), what="the earlier cycle held at the gate")
            async with operating(url, runtime):
                await eventually(
                    lambda: asyncio.sleep(0, runtime.skipped[KEY] >= 2), what="skipped cycles"
                )
                assert await policy_status(url) == {}  # a skipped cycle reports nothing
                reader.gate.set()
                await eventually(lambda: phase_is(url, "Active"), what="phase Active")
                # the earlier cycle's and the daemon's
                assert len(runtime.store.history(KEY)) >= 2
        finally:
            reader.gate.set()
            await asyncio.to_thread(earlier.join, 30)
        assert overlap["most"] == 1

    asyncio.run(scenario())


def test_standing_down_at_exit_leaves_the_event_loop_free(cluster: Any) -> None:
    """Each daemon stood down on the event loop, waiting for the lock that the EdgeNode
    statuses hold across API calls (30 s each at worst): kopf's keep-alives, watches and
    shutdown froze meanwhile, one daemon after another."""
    runtime, _ = new_runtime(cluster.kubeconfig, example_mesh())
    stand_down = runtime.stand_down

    def slow_stand_down(key: str) -> None:
        time.sleep(1.5)  # as while a slow API call holds the lock
        stand_down(key)

    runtime.stand_down = slow_stand_down  # type: ignore[method-assign]

    async def scenario() -> list[float]:
        loop, gaps = asyncio.get_running_loop(), []

        async def ticker() -> None:
            last = loop.time()
            while True:
                await asyncio.sleep(0.05)
                gaps.append(loop.time() - last)
                last = loop.time()

        await create_resources(cluster.url, policy_body())
        async with operating(cluster.url, runtime):
            await eventually(outcome_is(runtime, Outcome.APPLIED), what="a first cycle")
            ticking = asyncio.create_task(ticker())
        ticking.cancel()
        return gaps

    gaps = asyncio.run(scenario())
    assert runtime.store.latest(KEY) is None  # it did stand down
    assert max(gaps) < 1.0, max(gaps)


def test_a_cycle_in_flight_when_the_operator_exits_writes_nothing(cluster: Any) -> None:
    """On exit (SIGTERM, a rollout) kopf cancels the daemons, not the worker threads running
    their cycles, and leaves the peering at once: a cycle in flight would write the mesh
    after this replica stopped, over the weights of the peer leading by then."""
    runtime, reader = new_runtime(cluster.kubeconfig, example_mesh())
    in_flight = CycleCounter(runtime)
    exited = threading.Event()
    late_writes: list[str] = []
    write = runtime.mesh.write

    def watched_write(service: MeshService, routes: Any) -> bool:
        if exited.is_set():
            late_writes.append(service.name)
        return write(service, routes)

    runtime.mesh.write = watched_write  # type: ignore[method-assign]

    async def scenario() -> None:
        url = cluster.url
        await create_resources(url, policy_body())
        try:
            async with operating(url, runtime):
                await eventually(outcome_is(runtime, Outcome.APPLIED), what="a first cycle")
                reader.gate.clear()
                reader.held.clear()
                await eventually(is_set(reader.held), what="a cycle held at the gate")
            exited.set()
        finally:
            reader.gate.set()  # the held cycle goes on
        await eventually(in_flight.idle, what="the end of the held cycle")
        assert late_writes == []
        assert runtime.store.latest(KEY) is None  # nor is its report served

    asyncio.run(scenario())
