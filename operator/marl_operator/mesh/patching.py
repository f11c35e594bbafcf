"""JSON merge patches (RFC 7386) that move a live mesh object to the desired one, or back.

Only the fields the writer generates are owned: a merge patch replaces each owned list whole
(``http``, ``rules``, ``subsets``...), which corrects any out-of-band edit of the routes, and
leaves every other field alone (a user's ``trafficPolicy``, ``gateways``, other annotations).
An empty patch means the object is already as desired: nothing to send.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from marl_operator.mesh.ownership import (
    MANAGED_BY_LABEL,
    ORIGINAL_SPEC_ANNOTATION,
    SERVICE_ANNOTATION,
    SOURCE_KEY_ANNOTATION,
    check_adoptable,
    is_managed,
    original_spec,
    original_spec_annotation,
)


def merge_diff(live: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that sets every field of ``desired`` on ``live`` (recursing into
    objects, replacing lists and scalars whole) and removes nothing ``desired`` omits."""
    patch: dict[str, Any] = {}
    for key, want in desired.items():
        have = live.get(key)
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            sub = merge_diff(have, want)
            if sub:
                patch[key] = sub
        elif key not in live or have != want:
            patch[key] = copy.deepcopy(want)
    return patch


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """``target`` with ``patch`` applied as RFC 7386 says (None deletes a key); a new value."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(copy.deepcopy(target)) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = apply_merge_patch(out.get(key), value)
    return out


def reconcile_patch(live: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The patch that brings ``live`` to ``desired``'s labels, annotations and spec, or ``{}``.

    Taking over an object that marl-operator does not manage yet also saves its spec in the
    original-spec annotation (once: a saved spec is never overwritten). A non-empty patch
    carries the live ``resourceVersion``, so the server refuses it (409) if the object changed
    since it was read, instead of silently undoing a concurrent edit.
    """
    meta_live = live.get("metadata", {})
    meta_want = desired.get("metadata", {})
    metadata: dict[str, Any] = {}
    for field in ("labels", "annotations"):
        diff = merge_diff(meta_live.get(field) or {}, meta_want.get(field) or {})
        if diff:
            metadata[field] = diff
    saved = (meta_live.get("annotations") or {}).get(ORIGINAL_SPEC_ANNOTATION)
    if not is_managed(live):
        check_adoptable(live)
        if saved is None:
            metadata.setdefault("annotations", {}).update(original_spec_annotation(live))
    patch: dict[str, Any] = {}
    spec = merge_diff(live.get("spec") or {}, desired.get("spec") or {})
    if spec:
        patch["spec"] = spec
    if metadata:
        patch["metadata"] = metadata
    if patch and meta_live.get("resourceVersion"):
        patch.setdefault("metadata", {})["resourceVersion"] = meta_live["resourceVersion"]
    return patch


def restore_patch(live: Mapping[str, Any], owned: Iterable[str]) -> dict[str, Any] | None:
    """The patch that gives a taken-over object back the ``owned`` spec fields it had (those
    the operator writes: an edit of the owner's elsewhere since is kept) and removes
    marl-operator's marks, or None when marl-operator created the object (delete it)."""
    original = original_spec(live)
    if original is None:
        return None
    current = live.get("spec") or {}
    spec: dict[str, Any] = {
        key: copy.deepcopy(original.get(key))
        for key in owned
        if (key in original, original.get(key)) != (key in current, current.get(key))
    }
    patch: dict[str, Any] = {
        "metadata": {
            "labels": {MANAGED_BY_LABEL: None},
            "annotations": {
                SERVICE_ANNOTATION: None,
                ORIGINAL_SPEC_ANNOTATION: None,
                SOURCE_KEY_ANNOTATION: None,
            },
        }
    }
    if spec:
        patch["spec"] = spec
    if live.get("metadata", {}).get("resourceVersion"):
        patch["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
    return patch
