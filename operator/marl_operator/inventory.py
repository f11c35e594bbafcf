"""The EdgeNodes and EdgeServices policies are built from, read for all of them at once.

A policy's controller is built from these objects and must be built again when they change (a
node added or removed, its capacity or neighbours edited, a service's target moved); without
that the operator goes on routing to a node that is gone, and only a restart would notice.
Reading them at every cycle of every policy would double the operator's calls to the API
server, so they are read at most once per ``refresh_s`` for every policy together: a change
reaches each policy within that time and one interval. The Kubernetes nodes, and the pods of
each service, are read the same way, for whether each edge node is up and serves each service
(:mod:`liveness`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from marl_operator.kube import Forbidden
from marl_operator.problem import select_nodes
from marl_operator.spec import PolicySpec, SpecError

log = logging.getLogger(__name__)

INVENTORY_REFRESH_S = 10.0
"""How old the EdgeNodes and EdgeServices a cycle compares its policy with may be."""

FORGET_AFTER = 30
"""Refreshes after which a read nobody asked for again is dropped."""


class InventorySource(Protocol):
    """What the inventory reads (``Kube``'s calls of the same names)."""

    def edge_nodes(self) -> list[dict[str, Any]]: ...

    def kubernetes_nodes(self) -> list[dict[str, Any]]: ...

    def service_pods(self, namespace: str, name: str) -> list[dict[str, Any]]: ...

    def edge_services(self, namespace: str, names: tuple[str, ...]) -> dict[str, dict]: ...


class Inventory:
    """EdgeNodes, Kubernetes nodes, services' pods and EdgeServices as last read, read again
    once older than ``refresh_s``. A failed read of the EdgeNodes or EdgeServices is not
    remembered: a cycle gets the last good read instead (a node going down meanwhile is still
    routed around), a build (``fresh``) and a refusal (403) get the error. One of the
    Kubernetes nodes or of a service's pods is remembered as long as a good one would be
    (every policy asks every cycle). What nobody asked for in ``FORGET_AFTER`` refreshes (a
    service no policy routes any more) is forgotten."""

    def __init__(
        self,
        source: InventorySource,
        refresh_s: float = INVENTORY_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.source, self.refresh_s, self.clock = source, refresh_s, clock
        self._lists: dict[tuple, tuple[float, list[dict[str, Any]] | Exception]] = {}
        self._services: dict[tuple[str, str], tuple[float, dict | None]] = {}
        self._lock = threading.Lock()

    def edge_nodes(self, fresh: bool = False) -> list[dict[str, Any]]:
        """Every EdgeNode; ``fresh`` reads them now whatever the age of the last read."""
        return self._list("edge_nodes", fresh)

    def kubernetes_nodes(self) -> list[dict[str, Any]]:
        """Every Kubernetes Node: whether an edge node is up (:mod:`liveness`) is as old as
        this read, ``refresh_s`` at most. A failed read is raised again for as long as a good
        one would be kept: each policy asks every cycle, and a refused cluster-wide list
        repeated that often is load on the API server for nothing."""
        return self._list("kubernetes_nodes", False, keep_errors=True)

    def service_pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """The pods the Kubernetes Service ``namespace/name`` selects, read and remembered as
        the Kubernetes nodes are (every policy routing the service asks every cycle)."""
        return self._list("service_pods", False, (namespace, name), keep_errors=True)

    def _list(
        self, call: str, fresh: bool, args: tuple = (), keep_errors: bool = False
    ) -> list[dict[str, Any]]:
        key = (call, *args)
        with self._lock:
            cached = self._lists.get(key)
        if not fresh and cached is not None and self.clock() - cached[0] < self.refresh_s:
            if isinstance(cached[1], Exception):
                raise cached[1]
            return cached[1]
        now = self.clock()
        try:
            items = getattr(self.source, call)(*args)
        except Exception as error:
            if keep_errors:
                self._store(self._lists, now, {key: error})
            elif not fresh and _transient(error) and _good(cached):
                # Standing for another refresh: asked again by every cycle, a failing API
                # server would get every policy's reads.
                log.warning("%s not read again (%s): the last read stands", call, error)
                self._store(self._lists, now, {key: cached[1]})
                return cached[1]
            raise
        self._store(self._lists, now, {key: items})
        return items

    def _store(self, store: dict, now: float, values: Mapping[Any, Any]) -> None:
        """Keep each of ``values``, read at ``now``, unless a read that started later is kept
        already (policies refresh at once on several workers, and a slow read can end last);
        forget what nobody asked for in ``FORGET_AFTER`` refreshes."""
        with self._lock:
            for key, value in values.items():
                if (kept := store.get(key)) is None or kept[0] <= now:
                    store[key] = (now, value)
            horizon = now - FORGET_AFTER * self.refresh_s
            for old in [k for k, (when, _) in store.items() if when < horizon]:
                del store[old]

    def edge_services(
        self, namespace: str, names: tuple[str, ...], fresh: bool = False
    ) -> dict[str, dict]:
        """The named EdgeServices that exist, as :meth:`Kube.edge_services` answers."""
        now = self.clock()
        with self._lock:
            known = {n: self._services.get((namespace, n)) for n in names}
        missing = tuple(
            n
            for n, seen in known.items()
            if fresh or seen is None or now - seen[0] >= self.refresh_s
        )
        if missing:
            try:
                found = self.source.edge_services(namespace, missing)
            except Exception as error:
                if fresh or not _transient(error) or not all(known.values()):
                    raise
                log.warning("EdgeServices not read again (%s): the last read stands", error)
                stands = {(namespace, name): known[name][1] for name in missing}
                self._store(self._services, now, stands)
            else:
                known |= {name: (now, found.get(name)) for name in missing}
                self._store(self._services, now, {(namespace, n): found.get(n) for n in missing})
        return {name: seen[1] for name, seen in known.items() if seen and seen[1] is not None}


def _transient(error: Exception) -> bool:
    """Whether a failed read may pass when asked again: not a refusal (403), which a last good
    read must not hide."""
    return not isinstance(error, Forbidden)


def _good(cached: tuple[float, Any] | None) -> bool:
    return cached is not None and not isinstance(cached[1], Exception)


def fingerprint(
    spec: PolicySpec,
    edge_nodes: Sequence[Mapping[str, Any]],
    edge_services: Mapping[str, Mapping[str, Any]],
) -> str:
    """What of the EdgeNodes and EdgeServices a policy is built from: the nodes it selects
    and the services it names, each by name and spec. A change elsewhere (another policy's
    node, an object's status) leaves it as it was, so that policy keeps its learned model."""
    try:
        nodes = select_nodes(spec, edge_nodes)
    except SpecError as error:  # a named node is gone: that is a change too
        return f"unbuildable: {error}"
    parts = {
        "nodes": [(n["metadata"]["name"], n.get("spec")) for n in nodes],
        "services": [(s, (edge_services.get(s) or {}).get("spec")) for s in spec.services],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
