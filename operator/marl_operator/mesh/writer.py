"""The one interface every mesh provider implements.

A writer only builds and reads objects; the reconcile loop gets live objects, diffs them with
:mod:`marl_operator.mesh.patching` and patches only when something changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from marl_operator.mesh.model import Manifest, MeshNode, MeshRoutes, MeshService


class MeshWriter(Protocol):
    """Writes per-source-node weights of one service into a provider's objects."""

    provider: str
    """The ``spec.mesh.provider`` value of an EdgeService that selects this writer."""

    owned: Mapping[str, tuple[str, ...]]
    """Per kind, in the order :meth:`desired` applies them, the spec fields it writes: what
    taking an object over changes, and so all that deleting the policy gives back (the
    owner's later edits elsewhere stay)."""

    def desired(self, service: MeshService, routes: MeshRoutes) -> list[Manifest]:
        """Every object the provider needs for these routes, complete (with the values the API
        server would default, so a live copy compares equal), in the order to apply them."""
        ...

    def keep(self, service: MeshService, desired: Manifest, live: Manifest | None) -> Manifest:
        """``desired`` (one of :meth:`desired`'s objects) with what ``live``, the object as it
        is, carries besides the operator's routes: a taken-over object's own hosts, rules,
        parents and subsets, which the patch would otherwise replace with the owned lists."""
        ...

    def make_before_break(
        self, service: MeshService, desired: Sequence[Manifest], lives: Sequence[Manifest | None]
    ) -> list[Manifest]:
        """:meth:`desired`'s objects, given the ``lives`` (each one's live copy, or None),
        still holding what a live route names: an object a route sends traffic to loses that
        target only in a write after the routes left it, so no moment of the change routes
        to nothing."""
        ...

    def read(
        self, service: MeshService, nodes: Sequence[MeshNode], objects: Sequence[Manifest]
    ) -> MeshRoutes:
        """The weights the live objects carry, as written or edited by hand (not checked
        against the sum of 100). The owner's own rules are skipped, and so are routes to,
        and the rules of clients on, edge nodes not among ``nodes`` (nodes the policy no
        longer governs: what they carried has left them). Raises
        :class:`~marl_operator.mesh.model.MeshError` when an object is not in the shape this
        writer generates."""
        ...

    def routed_targets(self, live: Manifest) -> set[str]:
        """What the routes of ``live``, one of the kinds this writer owns, send traffic to
        that another object of its own defines (Istio: a VirtualService's subsets; empty for
        a kind whose routes need none): given back, such an object must not take away what
        routes left in place still name."""
        ...

    def targets_given_up(self, live: Manifest, patch: Mapping[str, Any] | None) -> set[str]:
        """The targets (as :meth:`routed_targets` names them) that giving ``live`` back
        takes away: by ``patch`` (see :func:`~marl_operator.mesh.patching.restore_patch`),
        or by deleting it for None."""
        ...
