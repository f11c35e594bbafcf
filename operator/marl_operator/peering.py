"""Which replica acts, read from kopf's peering object by the rule kopf pauses by.

kopf keeps the pause to itself, and a replica that stands by stays Ready (a rolling update
waits for new pods to be Ready, and a new pod may draw a lower priority than the one it
replaces). So the chart's Service may send an API request to a standby, which has nothing to
report; ``/api/v1/replica`` says which one it reached. The rule: a replica stands by while a
live peer (seen within its lifetime) has a higher priority.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes.client.rest import ApiException

from marl_operator.kube import Kube


@dataclass(frozen=True)
class ReplicaRole:
    """What this process is among the replicas; ``acting`` is None when it could not tell."""

    peering: str | None  # the peering object's name; None when standalone
    priority: int | None
    acting: bool | None
    outranked_by: tuple[str, ...] = ()  # live peers of higher priority
    error: str | None = None


def outranking_peers(status: Mapping[str, Any], priority: int, now: datetime.datetime) -> list[str]:
    """The peers of a peering object's status that pause a replica of ``priority``. A peer
    whose priority, lifetime or lastseen cannot be read raises ValueError naming it: whether
    it outranks this replica is then unknown, not no."""
    found = []
    for peer, seen in status.items():
        if not isinstance(seen, Mapping):
            continue
        try:
            if int(seen.get("priority", 0)) <= priority:
                continue
            lastseen = datetime.datetime.fromisoformat(str(seen.get("lastseen", "")))
            lifetime = datetime.timedelta(seconds=int(seen.get("lifetime", 60)))
        except (TypeError, ValueError) as error:
            raise ValueError(f"peer {peer!r} has an unreadable status: {error}") from None
        if lastseen.tzinfo is None:
            lastseen = lastseen.replace(tzinfo=datetime.UTC)
        if lastseen + lifetime > now:
            found.append(peer)
    return sorted(found)


class PeeringView:
    """This replica's role, read at most every ``ttl_s`` (the API may be polled often)."""

    def __init__(
        self,
        kube: Kube,
        name: str,
        namespaces: Sequence[str],
        priority: int,
        ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.kube, self.name, self.namespaces = kube, name, tuple(namespaces)
        self.priority, self.ttl_s, self.clock = priority, ttl_s, clock
        self._lock = threading.Lock()
        self._cached: tuple[float, ReplicaRole] | None = None

    def __call__(self) -> ReplicaRole:
        with self._lock:
            if self._cached is None or self.clock() - self._cached[0] >= self.ttl_s:
                self._cached = (self.clock(), self._read())
            return self._cached[1]

    def _read(self) -> ReplicaRole:
        try:
            statuses = self.kube.peering_statuses(self.name, self.namespaces)
        except ApiException as error:  # refused, or the API server failing: said, not raised
            problem = f"reading the peering object: {error.status} {error.reason}"
            return ReplicaRole(self.name, self.priority, None, error=problem)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            problem = f"reading the peering object: {type(error).__name__}"
            return ReplicaRole(self.name, self.priority, None, error=problem)
        now = datetime.datetime.now(datetime.UTC)
        try:
            peers = sorted({p for s in statuses for p in outranking_peers(s, self.priority, now)})
        except ValueError as error:
            problem = f"reading the peering object: {error}"
            return ReplicaRole(self.name, self.priority, None, error=problem)
        return ReplicaRole(self.name, self.priority, not peers, tuple(peers))


def standalone() -> ReplicaRole:
    return ReplicaRole(peering=None, priority=None, acting=True)
