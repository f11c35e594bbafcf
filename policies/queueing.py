"""A queueing-theory prior for the system model: what one control interval does to a node,
from first principles, before any telemetry has been learned from.

A learned model needs a window of data before it can be trusted (50 rows, several minutes
of a small mesh), and it knows nothing outside that data. A fresh operator, or a node that
just lost half its capacity, needs decisions *now*. The prior answers the same question as
:class:`policies.system_model.SystemModel` (inputs :data:`~policies.system_model.FEATURES`,
outputs :data:`~policies.system_model.TARGETS`) with two textbook approximations:

- the queue is a fluid over the interval (:mod:`policies.fluid_queue`): queued work grows
  by ``(utilisation - 1)`` seconds per second while the node is overloaded and drains at the
  same rate otherwise, and the interval's requests, arriving evenly, wait for its time
  average (its 95th percentile for the p95);
- on top of that, requests see the M/M/1 sojourn time of the load they arrive in, with
  utilisation capped at 0.95 so an overloaded node's term stays finite (the fluid queue
  carries the overload), and the exponential tail's p95 of three means.

It is deliberately simple: it only needs to rank routings the right way round (overloading
a node is bad, and worse the longer it lasts); the learned model replaces it once trusted.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from policies.fluid_queue import fluid_wait
from policies.system_model import (
    BACKLOG,
    BACKLOG_S,
    FEATURES,
    MEAN_MS,
    P95_MS,
    SERVICE_MS,
    SUCCESS,
    TARGETS,
    UTILISATION,
    LatencyTable,
)

MAX_STABLE_UTILISATION = 0.95
P95_OVER_MEAN = 3.0  # exponential sojourn: -ln(0.05) ~= 3.0


def queueing_prior(interval_s: float) -> Callable[[np.ndarray], np.ndarray]:
    """``predict(features (R, F)) -> targets (R, T)`` for intervals of ``interval_s``."""

    def predict(features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=float).reshape(-1, len(FEATURES))
        util, service_ms = x[:, UTILISATION], x[:, SERVICE_MS]
        mean_s, p95_s, after = fluid_wait(util, x[:, BACKLOG], interval_s)
        sojourn_ms = service_ms / (1.0 - np.minimum(util, MAX_STABLE_UTILISATION))
        out = np.empty((len(x), len(TARGETS)))
        out[:, MEAN_MS] = 1000.0 * mean_s + sojourn_ms
        out[:, P95_MS] = 1000.0 * p95_s + P95_OVER_MEAN * sojourn_ms
        out[:, SUCCESS] = 1.0
        out[:, BACKLOG_S] = after
        return out

    return predict


def prior_table(
    interval_s: float, service_ms: np.ndarray, backlog_now: np.ndarray, max_utilisation=3.0
) -> LatencyTable:
    """The prior tabulated for these nodes, on a grid wide enough for the current backlog
    and for utilisations up to ``max_utilisation`` (beyond that a state is outside it)."""
    top = max(5.0, 2.0 * float(np.max(backlog_now, initial=0.0)))
    return LatencyTable.from_function(
        queueing_prior(interval_s),
        np.asarray(service_ms, dtype=float),
        np.linspace(0.0, max_utilisation, 61),
        np.linspace(0.0, top, 17),
    )


def with_prior(learned: LatencyTable, prior: LatencyTable) -> LatencyTable:
    """The learned table where it has data and the prior everywhere else, on the prior's
    (wider) grid, every point known.

    Switching the whole decision to the prior as soon as the base routing leaves the learned
    data throws the learned model away exactly when a change makes it matter; and a decision
    on the learned table alone scores every candidate that pushes a node past its data as
    unusable, so after a surge or a failure it could only shed load (rejecting always stays
    inside the data). Pricing only the unseen states by the prior keeps both: measured on the
    change scenarios, a lower cost after every change (``python -m simulator.adapt``).
    """
    learned = learned.on_grid(prior.utilisation, prior.backlog)
    return LatencyTable(
        prior.utilisation,
        prior.backlog,
        np.where(learned.known[..., None], learned.values, prior.values),
        np.ones_like(prior.known),
    )
