"""Pick the mesh writer for an EdgeService's ``spec.mesh.provider``.

An unknown provider is an error, never a silent fall-back to another mesh: writing Istio
objects into a Gateway API cluster would do nothing and say nothing.
"""

from __future__ import annotations

from marl_operator.mesh.gatewayapi import GatewayAPIWriter
from marl_operator.mesh.istio import IstioWriter
from marl_operator.mesh.model import MeshError, MeshNode, MeshService
from marl_operator.mesh.routing import TOTAL, build_routes
from marl_operator.mesh.writer import MeshWriter

_WRITERS: dict[str, type[MeshWriter]] = {
    IstioWriter.provider: IstioWriter,
    GatewayAPIWriter.provider: GatewayAPIWriter,
}

PROVIDERS = tuple(_WRITERS)

OWNED_FIELDS: dict[str, tuple[str, ...]] = {
    kind: fields for writer in _WRITERS.values() for kind, fields in writer.owned.items()
}
"""Per kind of mesh object, the spec fields the operator writes (see ``MeshWriter.owned``)."""

GIVE_BACK_ORDER: tuple[str, ...] = tuple(
    kind for writer in _WRITERS.values() for kind in reversed(tuple(writer.owned))
)
"""Kinds of mesh object in the order a policy's deletion gives them back: the reverse of the
order they are written in, so that routes leave before what they route to."""


def writer_of_kind(kind: str) -> MeshWriter:
    """The writer that owns objects of ``kind`` (a kind of :data:`OWNED_FIELDS`)."""
    return next(writer() for writer in _WRITERS.values() if kind in writer.owned)


def writer_for(provider: str) -> MeshWriter:
    """The writer for ``provider`` (``istio`` or ``gateway-api``)."""
    try:
        return _WRITERS[provider]()
    except KeyError:
        raise MeshError(
            f"unknown mesh provider {provider!r}: choose one of {', '.join(PROVIDERS)}"
        ) from None


def managed_objects(service: MeshService, nodes: tuple[MeshNode, ...]) -> list[tuple[str, str]]:
    """(kind, name) of every object the service's writer manages: what a cycle reads and
    writes, and what the policy's deletion gives back. Built with a rule for every node's
    clients, as cycles write them, so that a provider's limit (an HTTPRoute's 16 rules)
    refuses the policy now, not every cycle's write."""
    every_source = build_routes({n.name: {n.name: TOTAL} for n in nodes}, nodes)
    return [
        (m["kind"], m["metadata"]["name"])
        for m in writer_for(service.provider).desired(service, every_source)
    ]
