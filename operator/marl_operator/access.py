"""Who may read what the HTTP API serves: the Kubernetes API server decides, as RBAC says.

A policy's report tells its weights, the metrics it read and why it decided: what the
RoutingPolicy's status shows. So the API serves it to whoever may read that RoutingPolicy,
and asks the cluster, as kube-rbac-proxy and a kubelet do for their own endpoints: a
TokenReview says whose a bearer token is, a SubjectAccessReview whether that user may do
what the request amounts to. Granting a team ``get`` on its RoutingPolicies (a Role, or the
``view`` role where it aggregates them) thus grants it their reports, and nothing else
needs managing.

Answers are kept for ``ttl_s`` (a minute), so a dashboard polling every few seconds costs the
API server nothing; a revoked grant or token therefore still works for up to that long, as
with kube-rbac-proxy's cache. Tokens are kept only as their SHA-256.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Caller:
    """Who a token belongs to, as the TokenReview answered."""

    user: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())


@dataclass(frozen=True)
class Permission:
    """What a request amounts to, in RBAC's terms: a verb on a resource (``group``,
    ``resource``, in ``namespace``, optionally of one ``name``), or on a non-resource URL
    ``path``."""

    verb: str
    group: str = ""
    resource: str = ""
    namespace: str = ""
    name: str = ""
    path: str = ""

    def __str__(self) -> str:
        if self.path:
            return f"{self.verb} the URL {self.path}"
        qualified = f"{self.resource}.{self.group}" if self.group else self.resource
        named = f' "{self.name}"' if self.name else ""
        return f'{self.verb} {qualified}{named} in the namespace "{self.namespace}"'


class Reviewer(Protocol):
    """The two questions the API server answers (:class:`marl_operator.kube.Kube` asks
    them). Each raises :class:`AccessUnavailable` when it cannot get an answer."""

    def review_token(self, token: str) -> Caller | None:
        """The token's owner; None for a token the API server does not accept."""
        ...

    def review_access(self, caller: Caller, permission: Permission) -> bool: ...


class AccessUnavailable(RuntimeError):
    """The API server could not be asked (unreachable, or the operator may not ask it):
    the request can be neither allowed nor refused."""


class _Expiring:
    """A bounded map whose entries expire ``ttl_s`` after they were put."""

    def __init__(self, ttl_s: float, max_entries: int, clock: Callable[[], float]):
        self.ttl_s, self.max_entries, self.clock = ttl_s, max_entries, clock
        self._entries: OrderedDict[Hashable, tuple[float, object]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> tuple[bool, object]:
        with self._lock:
            found = self._entries.get(key)
            if found is None or found[0] <= self.clock():
                self._entries.pop(key, None)
                return False, None
            return True, found[1]

    def put(self, key: Hashable, value: object) -> None:
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = (self.clock() + self.ttl_s, value)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)  # the oldest


class Access:
    """The reviewer's answers, kept for ``ttl_s``: who a token is, what a user may do.

    An unknown token is remembered too, so a client retrying a bad token in a loop does not
    pass each attempt on to the API server. A failure to ask is not remembered."""

    def __init__(
        self,
        reviewer: Reviewer,
        ttl_s: float = 60.0,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.reviewer = reviewer
        self._callers = _Expiring(ttl_s, max_entries, clock)
        self._decisions = _Expiring(ttl_s, max_entries, clock)

    def caller(self, token: str) -> Caller | None:
        key = hashlib.sha256(token.encode()).hexdigest()
        known, caller = self._callers.get(key)
        if not known:
            caller = self.reviewer.review_token(token)
            self._callers.put(key, caller)
        return caller  # type: ignore[return-value]

    def allows(self, caller: Caller, permission: Permission) -> bool:
        key = (caller, permission)
        known, allowed = self._decisions.get(key)
        if not known:
            allowed = self.reviewer.review_access(caller, permission)
            self._decisions.put(key, allowed)
        return bool(allowed)
