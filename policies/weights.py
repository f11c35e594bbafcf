"""Turning routing fractions into whole numbers: request counts in the simulator, mesh weights
in the cluster. One rule serves both so that what is trained is what is applied."""

from __future__ import annotations

import numpy as np


def largest_remainder(fractions: np.ndarray, total: np.ndarray | int) -> np.ndarray:
    """Integers proportional to ``fractions`` (last axis) summing exactly to ``total``.

    Floors every share, then hands the leftover units one each to the largest fractional
    parts (ties to the lower index). Fractions need not be normalised; an all-zero row
    puts everything in the first entry so a total is never lost.
    """
    f = np.clip(np.asarray(fractions, dtype=np.float64), 0.0, None)
    with np.errstate(over="ignore"):
        s = f.sum(axis=-1, keepdims=True)
    if not np.isfinite(s).all():  # shares too large to add up: only their proportions count
        top = f.max(axis=-1, keepdims=True)
        finite_top = np.where(np.isfinite(top) & (top > 0), top, 1.0)
        f = np.where(np.isinf(top), np.isinf(f), f / finite_top)
        s = f.sum(axis=-1, keepdims=True)
    first = np.zeros_like(f)
    first[..., 0] = 1.0
    f = np.where(s > 0, f / np.where(s > 0, s, 1.0), first)
    total = np.asarray(total)
    exact = f * total[..., None]
    base = np.floor(exact + 1e-9).astype(np.int64)
    leftover = (total - base.sum(axis=-1)).astype(np.int64)
    remainder = exact - base
    rank = np.argsort(np.argsort(-remainder, axis=-1, kind="stable"), axis=-1, kind="stable")
    return base + (rank < leftover[..., None])


def reference_counts(fractions: np.ndarray, total: np.ndarray) -> np.ndarray:
    """The DFaaS reference rounding: truncate each share, give *all* leftover requests to the
    single largest fractional part (first on ties). Kept for faithful reproduction."""
    f = np.asarray(fractions, dtype=np.float64)
    total = np.asarray(total)
    exact = f * total[..., None]
    base = exact.astype(np.int64)  # truncates toward zero, like the reference's int()
    leftover = total - np.einsum("...k->...", base)
    winner = first_argmax(exact - base)
    bonus = np.where(
        np.arange(f.shape[-1]) == winner[..., None], np.maximum(leftover, 0)[..., None], 0
    )
    return base + bonus


def first_argmax(x: np.ndarray) -> np.ndarray:
    """``np.argmax(x, axis=-1)`` (first index on ties) for a short last axis, such as an
    action's few entries: one pass per entry, several times faster than numpy's per-row
    reduction over a handful of elements."""
    best = x[..., 0]
    index = np.zeros(best.shape, np.intp)
    for j in range(1, x.shape[-1]):
        better = x[..., j] > best
        best = np.where(better, x[..., j], best)
        index = np.where(better, j, index)
    return index


def mesh_weights(fractions: np.ndarray, total: int = 100) -> np.ndarray:
    """Integer weights summing to ``total`` (100 for Istio), never all zero."""
    return largest_remainder(fractions, np.full(np.shape(fractions)[:-1], total))
