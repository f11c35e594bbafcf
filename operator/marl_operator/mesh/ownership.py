"""Marks on the mesh objects marl-operator writes, and the user's own spec kept aside.

A user may already have a VirtualService or HTTPRoute for the service. The operator takes it
over only if its owner says so with the ``marl.dev/adopt: "true"`` annotation: whoever may
create EdgeServices in a namespace must not thereby rewrite any route there. It then takes
over the fields it writes, but first stores the whole spec it found in an annotation, so that
deleting the RoutingPolicy can put the object back as the user left it. Objects the operator
created itself carry no such annotation and are deleted instead.

Ownership is a label (``marl.dev/managed-by``), so that ``kubectl get -l`` and watches can
select the managed objects; ``app.kubernetes.io/managed-by`` is left alone because tools such
as Helm claim adopted objects through it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from marl_operator.mesh.model import MeshError, MeshService

MANAGED_BY_LABEL = "marl.dev/managed-by"
MANAGER = "marl-operator"
SERVICE_ANNOTATION = "marl.dev/edge-service"
"""``namespace/name`` of the EdgeService whose routes the object carries."""
ORIGINAL_SPEC_ANNOTATION = "marl.dev/original-spec"
"""JSON of the spec the object had before marl-operator took it over."""

ADOPT_ANNOTATION = "marl.dev/adopt"
"""``"true"`` on an existing mesh object: its owner lets marl-operator take over its routes."""

ANNOTATIONS_LIMIT = 256 * 1024
"""The API server refuses objects whose annotations total more bytes than this."""


SOURCE_KEY_ANNOTATION = "marl.dev/source-key"
"""On a route object: the pod label (Istio) or header (Gateway API) its source rules match
on, as last written. Only those rules are the operator's in an object it took over: after
the key changes, the rules on the former one; an owner's rule of the same shape on any
other key is the owner's."""


def managed_metadata(service: MeshService, source_key: str | None = None) -> dict[str, dict]:
    """Labels and annotations every generated object carries (and a route object, the key
    its source rules match on)."""
    annotations = {SERVICE_ANNOTATION: service.ref}
    if source_key is not None:
        annotations[SOURCE_KEY_ANNOTATION] = source_key
    return {"labels": {MANAGED_BY_LABEL: MANAGER}, "annotations": annotations}


def written_source_key(live: Mapping[str, Any]) -> str | None:
    """The key a route object's source rules were last written on (None: not recorded, as
    by a version before the annotation)."""
    return (live.get("metadata", {}).get("annotations") or {}).get(SOURCE_KEY_ANNOTATION)


def is_managed(obj: Mapping[str, Any]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return labels.get(MANAGED_BY_LABEL) == MANAGER


def created_by_operator(live: Mapping[str, Any]) -> bool:
    """Whether marl-operator created ``live`` (it manages it and kept no owner's spec):
    nothing in it is an owner's, whatever its shape."""
    annotations = live.get("metadata", {}).get("annotations") or {}
    return is_managed(live) and ORIGINAL_SPEC_ANNOTATION not in annotations


def check_adoptable(live: Mapping[str, Any]) -> None:
    """MeshError unless ``live``, an object marl-operator does not manage, may be taken over:
    its owner opted in with :data:`ADOPT_ANNOTATION` (whatever else it carries, such as an
    original spec left from an earlier takeover)."""
    meta = live.get("metadata", {})
    if (meta.get("annotations") or {}).get(ADOPT_ANNOTATION) != "true":
        kind, name = live.get("kind", "object"), meta.get("name", "?")
        raise MeshError(
            f"{kind} {meta.get('namespace', '?')}/{name} exists and marl-operator did not "
            f"create it: to hand its routes over, annotate it {ADOPT_ANNOTATION}=true (its "
            "spec is kept and given back when the policy goes), or name another object in "
            "the EdgeService's spec.mesh"
        )


def original_spec_annotation(live: Mapping[str, Any]) -> dict[str, str]:
    """The annotation that keeps ``live``'s current spec, to be added when taking it over."""
    text = json.dumps(live.get("spec", {}), separators=(",", ":"), sort_keys=True)
    annotations = live.get("metadata", {}).get("annotations") or {}
    used = sum(len(k) + len(v) for k, v in annotations.items() if k != ORIGINAL_SPEC_ANNOTATION)
    if used + len(ORIGINAL_SPEC_ANNOTATION) + len(text.encode()) > ANNOTATIONS_LIMIT:
        name = live.get("metadata", {}).get("name", "?")
        raise MeshError(
            f"the spec of {live.get('kind', 'object')} {name!r} is too large to keep in the "
            f"{ORIGINAL_SPEC_ANNOTATION} annotation ({ANNOTATIONS_LIMIT} bytes for all "
            "annotations): give the EdgeService its own mesh object name instead"
        )
    return {ORIGINAL_SPEC_ANNOTATION: text}


def owners_spec(live: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The spec the owner gave ``live``: the one saved when it was taken over, or its own if
    it is not taken over yet; empty for an object the operator created (or whose saved spec
    cannot be read). What a write keeps of the owner's hosts and parents comes from here, so
    that one the operator wrote (a host since changed) is not kept for good."""
    if live is None:
        return {}
    if not is_managed(live):
        return live.get("spec") or {}
    try:
        return original_spec(live) or {}
    except MeshError:
        return {}


def original_spec(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """The spec saved before takeover, or None if marl-operator created the object."""
    annotations = obj.get("metadata", {}).get("annotations") or {}
    text = annotations.get(ORIGINAL_SPEC_ANNOTATION)
    if text is None:
        return None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as error:
        raise MeshError(f"annotation {ORIGINAL_SPEC_ANNOTATION} is not JSON: {error}") from error
    if not isinstance(spec, dict):
        raise MeshError(f"annotation {ORIGINAL_SPEC_ANNOTATION} does not hold an object spec")
    return spec
