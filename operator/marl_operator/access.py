"""Who may read what the HTTP API serves: the Kubernetes API server decides, as RBAC says.

A policy's report tells its weights, the metrics it read and why it decided: what the
RoutingPolicy's status shows. So the API serves it to whoever may read that RoutingPolicy,
and asks the cluster, as kube-rbac-proxy and a kubelet do for their own endpoints: a
TokenReview says whose a bearer token is, a SubjectAccessReview whether that user may do
what the request amounts to. Granting a team ``get`` on its RoutingPolicies thus grants it
their reports, and nothing else needs managing.

Tokens are asked for an audience of the API's own (``marl-operator`` by default: ``kubectl
create token NAME --audience marl-operator``). Unless it serves HTTPS
(:mod:`marl_operator.tls`) the API speaks plain HTTP inside the cluster, and a token made for
it alone is worth nothing to whoever overhears it: the API server refuses it for anything
else.

Answers are kept for ``ttl_s`` (a minute; never past a token's own expiry), so a dashboard
polling every few seconds costs the API server nothing; a revoked grant or token therefore
still works for up to that long, as with kube-rbac-proxy's cache. A refused token is kept
apart and shorter (a failing authenticator refuses tokens too), so junk tokens can neither
push the known callers out nor reach the API server more than once each. At most
``max_in_flight`` reviews wait on the API server at once: beyond that a request is answered
503 at once, so a flood of junk tokens cannot hold every worker thread. Tokens are kept
only as their SHA-256.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

DEFAULT_AUDIENCE = "marl-operator"

T = TypeVar("T")


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
    ``resource``, in ``namespace`` (every one if empty), optionally of one ``name``), or on a
    non-resource URL ``path``."""

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
        where = f'in the namespace "{self.namespace}"' if self.namespace else "in every namespace"
        return f"{self.verb} {qualified}{named} {where}"


class Reviewer(Protocol):
    """The two questions the API server answers (:class:`marl_operator.kube.Kube` asks
    them). Each raises :class:`AccessUnavailable` when it cannot get an answer."""

    def review_token(self, token: str, audience: str) -> Caller | None:
        """The token's owner; None for a token the API server does not accept for
        ``audience`` (empty: the API server's own)."""
        ...

    def review_access(self, caller: Caller, permission: Permission) -> bool: ...


class AccessUnavailable(RuntimeError):
    """The API server could not be asked, or could not tell (unreachable, the operator may
    not ask it, an authorizer failed, too many questions waiting): the request can be
    neither allowed nor refused."""


class _Expiring:
    """A bounded map whose entries expire a while after they were put."""

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

    def put(self, key: Hashable, value: object, ttl_s: float | None = None) -> None:
        ttl = self.ttl_s if ttl_s is None else min(ttl_s, self.ttl_s)
        if ttl <= 0:
            return
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = (self.clock() + ttl, value)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)  # the oldest

    def __len__(self) -> int:
        return len(self._entries)


def seconds_left(token: str, now: float) -> float | None:
    """Seconds until a JSON Web Token's ``exp``, read without checking its signature (only
    ever to keep an answer shorter); None for a token that says nothing of it."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        exp = payload["exp"]
    except (ValueError, binascii.Error, KeyError, TypeError):
        return None
    return float(exp) - now if isinstance(exp, int | float) else None


class Access:
    """The reviewer's answers, kept a while: who a token is, what a user may do."""

    def __init__(
        self,
        reviewer: Reviewer,
        audience: str = DEFAULT_AUDIENCE,
        ttl_s: float = 60.0,
        refused_ttl_s: float = 10.0,
        max_entries: int = 4096,
        max_in_flight: int = 8,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.reviewer = reviewer
        self.audience = audience
        self.wall_clock = wall_clock
        self._callers = _Expiring(ttl_s, max_entries, clock)
        self._refused = _Expiring(refused_ttl_s, max_entries // 4, clock)
        self._decisions = _Expiring(ttl_s, max_entries, clock)
        self._in_flight = threading.BoundedSemaphore(max_in_flight)

    def caller(self, token: str) -> Caller | None:
        key = hashlib.sha256(token.encode()).hexdigest()
        for kept in (self._callers, self._refused):
            known, caller = kept.get(key)
            if known:
                return caller  # type: ignore[return-value]
        caller = self._ask(self.reviewer.review_token, token, self.audience)
        if caller is None:
            self._refused.put(key, None)
        else:
            self._callers.put(key, caller, seconds_left(token, self.wall_clock()))
        return caller

    def allows(self, caller: Caller, permission: Permission) -> bool:
        key = (caller, permission)
        known, allowed = self._decisions.get(key)
        if not known:
            allowed = self._ask(self.reviewer.review_access, caller, permission)
            self._decisions.put(key, allowed)
        return bool(allowed)

    def _ask(self, question: Callable[..., T], *args: object) -> T:
        if not self._in_flight.acquire(blocking=False):
            raise AccessUnavailable("too many questions to the API server are waiting")
        try:
            return question(*args)
        finally:
            self._in_flight.release()
