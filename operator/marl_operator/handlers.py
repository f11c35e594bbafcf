"""kopf handlers, kept thin: they schedule cycles and deletions; :mod:`runtime` does the work.

One daemon per RoutingPolicy runs its control loop at the spec's ``intervalSeconds`` (a kopf
timer's interval is fixed when the handler is registered, a daemon can follow the spec). kopf
keeps the daemon's ``body`` current, so a spec change starts a cycle within a second, where
the runtime sees the new generation and rebuilds the controller. Deletion is held by a
finalizer until the original routes are restored.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from marl_operator.claims import Claim, claims_of, governors
from marl_operator.mesh.model import RestoreIncomplete
from marl_operator.mesh.ownership import (
    MANAGED_BY_LABEL,
    ORIGINAL_SPEC_ANNOTATION,
    SERVICE_ANNOTATION,
)
from marl_operator.report import CycleReport, Outcome
from marl_operator.runtime import DELETE_WAIT_S, Runtime, Term
from marl_operator.status import status_of

GROUP, VERSION, PLURAL = "marl.dev", "v1alpha1", "routingpolicies"
INVALID_RETRY_S = 10.0
"""How soon an invalid policy is read again (its EdgeServices may be created meanwhile)."""

EDIT_POLL_S = 1.0
"""How often a daemon waiting out its interval looks for an edit of its policy's spec."""

log = logging.getLogger(__name__)

EVENTS: dict[Outcome, tuple[str, str]] = {
    # outcome -> (event type, CamelCase reason), posted when the outcome changes
    Outcome.APPLIED: ("Normal", "WeightsApplied"),
    Outcome.UNCHANGED: ("Normal", "WeightsApplied"),
    Outcome.DRY_RUN: ("Normal", "DryRunDecision"),
    Outcome.HELD: ("Warning", "WeightsHeld"),
    Outcome.FALLBACK: ("Warning", "FallbackActivated"),
    Outcome.SUSPENDED: ("Normal", "Suspended"),
    Outcome.INVALID: ("Warning", "InvalidSpec"),
}
FORBIDDEN_EVENT = ("Warning", "Forbidden")
"""Posted when a cycle's mesh call, or a read the policy is built from, is refused (403), or
refused for another rule than before; its message names the verb, the resource, the namespace
(or the cluster scope) and the RBAC rule to grant."""


def configure(settings: kopf.OperatorSettings) -> None:
    """The operator's kopf settings: its own finalizer and annotation prefix, so that it
    never collides with another kopf-based operator on the same objects."""
    settings.persistence.finalizer = "marl.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="marl.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="marl.dev", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # events come from the handlers, not kopf's log


LEAVING = kopf.DaemonStoppingReason.OPERATOR_PAUSING | kopf.DaemonStoppingReason.OPERATOR_EXITING
"""Why a daemon stops when its policy is left to others: a peer of higher priority, or the
process exiting (kopf leaves the peering at once, so a peer may lead before a cycle in
flight, whose worker thread kopf cannot cancel, would have written)."""

CYCLE_WORKERS = 4
"""Cycles of different policies that may run at once."""


def register(
    registry: kopf.OperatorRegistry,
    runtime: Runtime,
    login: Callable[[], kopf.ConnectionInfo] | None = None,
) -> None:
    """Attach the handlers to ``registry``, closing over ``runtime``; ``login`` gives kopf
    its connection (tests attach their own login handler instead)."""

    if login is not None:
        # A registry made by hand has none of kopf's default login handlers: kopf connects
        # with the credentials the operator's own client was configured with.
        @kopf.on.login(registry=registry)
        def connect(**_: Any) -> kopf.ConnectionInfo:
            return login()

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings)

    # The cycle each policy's daemon runs now, kept apart from the daemon's task: on deletion
    # kopf stops the daemon (cancelling it at once: there is no cancellation_backoff) while the
    # delete handler runs, but a cancelled daemon's cycle goes on in its worker thread. The
    # delete handler waits for that cycle, or its write would take the restored objects over
    # again after the policy is gone.
    cycles: dict[str, asyncio.Future[CycleReport]] = {}
    # Cycles wait on Prometheus and the API server for most of their time and hold the GIL for
    # the rest (numpy, the decision): a few workers overlap the waits, more would only contend
    # for the GIL. The event loop stays free for kopf.
    worker = ThreadPoolExecutor(max_workers=CYCLE_WORKERS, thread_name_prefix="marl-cycle")

    @kopf.index(GROUP, VERSION, PLURAL, registry=registry, id="service_claims")
    def service_claims(
        namespace: str, name: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any
    ) -> dict[tuple[str, str], Claim]:
        return claims_of(namespace, name, spec, meta)

    @kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, cancellation_timeout=30.0)
    async def control_loop(
        body: kopf.Body,
        name: str,
        namespace: str,
        stopped: kopf.DaemonStopped,
        service_claims: kopf.Index,
        **_: Any,
    ) -> None:
        key = f"{namespace}/{name}"
        # Every cycle of this daemon is asked for in the policy's term as it starts: one still
        # waiting for a worker when the policy is deleted or left to a peer then never runs.
        term = runtime.term(key)
        try:
            await run_cycles(key, body, name, namespace, stopped, service_claims, term)
        finally:
            # kopf cancels a stopped daemon at once, so this runs in the cancellation too. In
            # a thread: it waits for a lock the EdgeNode statuses' API calls hold, and kopf's
            # own work on this loop (keep-alives, shutdown) must not wait for them. Shielded:
            # cancelled again before a thread took it, it would never run.
            if stopped.reason and stopped.reason & LEAVING:
                loop = asyncio.get_running_loop()
                await asyncio.shield(loop.run_in_executor(None, runtime.stand_down, key))

    async def run_cycles(
        key: str,
        body: kopf.Body,
        name: str,
        namespace: str,
        stopped: kopf.DaemonStopped,
        index: kopf.Index,
        term: Term,
    ) -> None:
        previous: CycleReport | None = None
        loop = asyncio.get_running_loop()

        async def pause(seconds: float, generation: Any) -> None:
            """Wait ``seconds``, but not past an edit of the spec (``body`` is kept current
            by kopf): one shortening a long interval, or suspending the policy, is acted on
            at once."""
            deadline = loop.time() + seconds
            while not stopped and body.metadata.get("generation") == generation:
                if (left := deadline - loop.time()) <= 0:
                    return
                await stopped.wait(min(EDIT_POLL_S, left))

        while not stopped:
            started = loop.time()
            # The status's services name the mesh objects written before: a rebuild gives
            # back those no longer written, even when this process never ran the policy; its
            # failures in a row go on counting.
            services = copy.deepcopy(list(body.status.get("services") or ()))
            generation = body.metadata.get("generation")
            snapshot = {
                "metadata": dict(body.metadata),
                "spec": dict(body.spec),
                "status": {
                    "services": services,
                    "consecutiveFailures": body.status.get("consecutiveFailures"),
                },
            }
            owners = governors(index, namespace)
            running = loop.run_in_executor(worker, runtime.cycle, key, snapshot, owners, term)
            cycles[key] = running
            report = await asyncio.shield(running)
            if report is None:
                # Skipped: a cycle of this policy started before this daemon still runs (the
                # runtime counted and logged it); it reports for itself. Or the policy's term
                # ended (deleted, left to a peer): this daemon is stopping. Try again next
                # interval.
                await pause(runtime.interval(key) - (loop.time() - started), generation)
                continue
            status = status_of(report, dict(body.status))
            try:
                await asyncio.to_thread(runtime.kube.patch_policy_status, namespace, name, status)
            except Exception as error:
                # A transient refusal (503, a timeout) must not end the daemon: kopf would
                # restart it only after its backoff, a minute without cycles. The next cycle
                # writes a newer status; the weights were already decided and written.
                log.warning(
                    "status of %s not written: %s", key, error, extra={"fields": {"policy": key}}
                )
            if previous is None or previous.outcome != report.outcome:
                kind, reason = EVENTS[report.outcome]
                kopf.event(body, type=kind, reason=reason, message=report.reason[:1000])
            if report.forbidden and (previous is None or previous.forbidden != report.forbidden):
                kind, reason = FORBIDDEN_EVENT
                kopf.event(body, type=kind, reason=reason, message=report.forbidden[:1000])
            previous = report
            wait = INVALID_RETRY_S if report.outcome == Outcome.INVALID else runtime.interval(key)
            # The interval runs from the cycle's start, so a slow cycle does not stretch it.
            await pause(wait - (loop.time() - started), generation)

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    async def restore_routes(
        body: kopf.Body, name: str, namespace: str, service_claims: kopf.Index, **_: Any
    ) -> None:
        key = f"{namespace}/{name}"
        # Every service claimed here, not only those of its spec: the status may name one an
        # edit dropped, which another policy may govern by now.
        owners = governors(service_claims, namespace)
        # The status too: it names the mesh objects of a policy that can no longer be built.
        snapshot = {
            "metadata": dict(body.metadata),
            "spec": dict(body.spec),
            "status": copy.deepcopy(dict(body.status)),
        }
        running = cycles.pop(key, None)
        deadline = asyncio.get_running_loop().time() + DELETE_WAIT_S
        if running is not None:
            # How it ended is the daemon's to report; one that outlasts the wait is left to
            # runtime.delete, which waits for it only for what is left of the same deadline.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(running), DELETE_WAIT_S)
        left = max(0.0, deadline - asyncio.get_running_loop().time())
        failure: RestoreIncomplete | None = None
        try:
            done = await asyncio.to_thread(runtime.delete, key, snapshot, owners, left)
        except RestoreIncomplete as error:
            done, failure = error.done, error
        if done:
            # kopf.event, not kopf.info: configure() raises kopf's posting level to WARNING,
            # which silently drops kopf.info.
            kopf.event(body, type="Normal", reason="RoutesRestored", message="; ".join(done))
        if failure is not None:
            # Retrying cannot read a spec that is unreadable: kopf would retry for ever and
            # the policy stay Terminating. Say what is left to do by hand, and let it go.
            message = (
                f"not given back: {failure}; set their spec by hand and remove the "
                f"{MANAGED_BY_LABEL} label and the {SERVICE_ANNOTATION} and "
                f"{ORIGINAL_SPEC_ANNOTATION} annotations"
            )
            kopf.event(body, type="Warning", reason="RoutesNotRestored", message=message[:1000])
            raise kopf.PermanentError(message) from failure
