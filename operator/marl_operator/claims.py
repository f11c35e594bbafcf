"""Which RoutingPolicy governs an EdgeService when more than one names it.

Two policies writing the same VirtualService would fight over its weights every interval,
and deleting either would give back routes the other still drives. So each service has one
governor: the oldest policy naming it (by creation time, then name), kept until it is gone
altogether, its deletion included, so that its routes are given back before another policy
takes the service over. The others are Invalid for as long as they name it, and write and
restore nothing of it.

The claims come from a kopf index over every RoutingPolicy the operator watches: it is kept
from the watch stream, costs no API call, and is complete before any handler runs, so a
restart cannot let the younger policy write first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Claim = tuple[str, str]  # (creationTimestamp, policy name): sorts oldest first


def claims_of(namespace: str, name: str, spec: Mapping[str, Any], meta: Mapping[str, Any]):
    """The index entries of one policy: ``(namespace, service) -> (created, name)``."""
    created = str(meta.get("creationTimestamp") or "")
    return {(namespace, str(service)): (created, name) for service in spec.get("services") or ()}


def governors(
    index: Mapping[tuple[str, str], Iterable[Claim]],
    namespace: str,
    services: Iterable[str] | None = None,
) -> dict[str, str]:
    """``service -> name`` of the policy governing each of ``services`` that any policy
    claims (by default every service claimed in ``namespace``: what a cycle needs to know
    whether a service its policy stopped naming is another's now)."""
    if services is None:
        services = [service for where, service in index if where == namespace]
    out = {}
    for service in services:
        claims = list(index.get((namespace, str(service)), ()))
        if claims:
            out[str(service)] = min(claims)[1]
    return out


def conflict(name: str, namespace: str, governed_by: Mapping[str, str]) -> str | None:
    """Why the policy ``name`` may not run, as the problem with its ``spec.services`` (None:
    it governs every service it names)."""
    taken = {s: other for s, other in sorted(governed_by.items()) if other != name}
    if not taken:
        return None
    which = ", ".join(f"{s} (by {namespace}/{other})" for s, other in taken.items())
    return (
        f"already governed by an older RoutingPolicy: {which}; remove "
        f"{'them' if len(taken) > 1 else 'it'} from spec.services, or delete the other "
        "policy, and this one takes over once it is gone"
    )
