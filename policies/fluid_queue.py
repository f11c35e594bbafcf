"""What a node's queue does over one control interval, as a fluid: arithmetic, not learning.

Queued work grows by ``(utilisation - 1)`` seconds per second while a node is overloaded and
drains at the same rate otherwise, and the interval's requests, arriving evenly, find it at
its time average. Both models of a node build on it: the queueing-theory prior
(:mod:`policies.queueing`) adds a textbook sojourn time, and the learned system model
(:mod:`policies.system_model`) learns only what the fluid misses. The fluid needs no data:
what it explains, a few hundred rows need not teach, and a forest's leaves, each the mean of
rows with unlike queues, would flatten it.
"""

from __future__ import annotations

import numpy as np


def backlog_after(util: np.ndarray, backlog: np.ndarray, interval_s: float) -> np.ndarray:
    """Seconds of work queued at the end of the interval."""
    return np.maximum(backlog + (util - 1.0) * interval_s, 0.0)


def fluid_mean_backlog(
    util: np.ndarray, backlog: np.ndarray, after: np.ndarray, interval_s: float
) -> np.ndarray:
    """The fluid queue's time average over the interval (what a request arriving at a random
    moment waits for): the mean of its start and end while it lasts, and where it empties
    before the interval ends, the triangle it drains in spread over the whole interval."""
    drain = np.maximum(1.0 - util, 0.0)  # seconds of work per second
    emptied = backlog < drain * interval_s
    emptied_after = backlog / np.where(emptied, drain, 1.0)  # where it empties, else unused
    return np.where(emptied, backlog * emptied_after / (2.0 * interval_s), (backlog + after) / 2)


def fluid_p95_backlog(util: np.ndarray, backlog: np.ndarray, interval_s: float) -> np.ndarray:
    """The fluid queue 95% of the interval's arrivals find no longer: at 5% of the way
    through while it drains (its first arrivals wait the longest), at 95% while it grows."""
    moment = np.where(util < 1.0, 0.05, 0.95) * interval_s
    return np.maximum(backlog + (util - 1.0) * moment, 0.0)


def fluid_wait(
    util: np.ndarray, backlog: np.ndarray, interval_s: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seconds the interval's requests wait on average and at the 95th percentile, and the
    backlog left at its end, from the utilisation and the backlog at its start."""
    backlog = np.maximum(backlog, 0.0)
    after = backlog_after(util, backlog, interval_s)
    mean = fluid_mean_backlog(util, backlog, after, interval_s)
    return mean, fluid_p95_backlog(util, backlog, interval_s), after
